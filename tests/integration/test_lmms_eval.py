"""The real ``lmms-eval`` CLI (0.7.3, in its own venv ``.venv-lmms``: ``make lmms-venv``) end to end, offline.

A tiny LLaVA (the embedded testbed saved as a Hugging Face model directory with a ``LlavaProcessor`` and a chat
template), six testbed scenes saved with ``datasets.save_to_disk``, and three tasks written here and loaded with
``--include_path``: free answers (``generate_until``), the answer among its group's choices (``multiple_choice``,
i.e. ``loglikelihood``) and the question asked twice (``generate_until_multi_round``). ``--model vtcompress`` runs
with a projector-stage method (VisionZip) and a decoder-stage one (FastV) at ``--batch_size 2``, and at budget 1.0
next to lmms-eval's own ``llava_hf`` on the same checkpoint. lmms-eval's CLI exits 0 even when evaluation fails, so
every check reads the files it writes (results and per-sample records).

The reference (``lmms_helpers.py reference``) runs each sample alone through transformers + ``vtcompress.apply``:
greedy answers, and the continuation NLLs through the KV cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LMMS_VENV = ROOT / ".venv-lmms"
HELPERS = Path(__file__).with_name("lmms_helpers.py")
N_DOCS = 6
VISIONZIP_BUDGET = 16  # of 144 image tokens
FASTV = "fastv:0.25:layer=1"  # keep a quarter of the image tokens from decoder layer 1 on

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_quickstart import save_testbed_as_hf_model  # noqa: E402

sys.path.insert(0, str(HELPERS.parent))
from lmms_helpers import MAX_NEW_TOKENS  # noqa: E402

# One user turn, its content a string (lmms-eval's llava_hf: "<image>\n" + context) or a list of parts (the
# structured form the vtcompress model sends): both render the testbed's layout "<s> preamble <image> question : ..."
CHAT_TEMPLATE = (
    "{{ '<s> ' + preamble + ' ' }}{% for message in messages %}{% if message['content'] is string %}"
    "{{ message['content'] + ' ' }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "{{ '<image> ' }}{% endif %}{% endfor %}{% for c in message['content'] %}{% if c['type'] == 'text' %}"
    "{{ c['text'] + ' ' }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'answer :' }}{% endif %}")

UTILS = '''
from lmms_helpers import prompt_text


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return prompt_text(doc["question"])


def doc_to_choice(doc):
    return list(doc["choices"])


def first_word(text):
    words = text.split()
    return words[0] if words else ""


def exact(doc, results):
    return {"exact_match": float(first_word(results[0]) == doc["answer"])}


def twice_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None, previous_round_info=None):
    """Round 0: the question; round 1: the same question again; then stop."""
    if round_idx is None:
        return prompt_text(doc["question"])
    if round_idx == 1:
        return doc_to_visual(doc), prompt_text(doc["question"]), False, previous_output, None
    return None, None, True, previous_output, None


def both_rounds(doc, results):
    rounds = results[0]
    return {"both_right": float(len(rounds) == 2 and all(first_word(r) == doc["answer"] for r in rounds))}
'''

TASK = """task: {name}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
doc_to_visual: !function tb_utils.doc_to_visual
doc_to_target: answer
"""
TASKS = {
    "tb_vqa": """output_type: generate_until
doc_to_text: !function tb_utils.doc_to_text
generation_kwargs:
  max_new_tokens: {max_new}
  until: ["\\n\\n"]
  do_sample: false
  temperature: 0
process_results: !function tb_utils.exact
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    "tb_choice": """output_type: multiple_choice
doc_to_text: !function tb_utils.doc_to_text
doc_to_choice: !function tb_utils.doc_to_choice
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "tb_twice": """output_type: generate_until_multi_round
doc_to_text: !function tb_utils.twice_to_text
generation_kwargs:
  max_new_tokens: {max_new}
  do_sample: false
  temperature: 0
process_results: !function tb_utils.both_rounds
metric_list:
  - metric: both_right
    aggregation: mean
    higher_is_better: true
""",
}


def _venv_tool(name: str) -> Path:
    tool = LMMS_VENV / "bin" / name
    if not tool.exists():
        pytest.fail(f"{tool} is missing: these tests run the lmms-eval CLI from its own venv; build it with "
                    "`make lmms-venv` (`make test-lmms` builds it and runs them)")
    return tool


def _env(root: Path) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(root / "hf"),
               WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=str(HELPERS.parent))
    env.pop("LMMS_EVAL_PLUGINS", None)
    return env


def _start(cmd: list, root: Path) -> tuple[list, subprocess.Popen]:
    return cmd, subprocess.Popen([str(c) for c in cmd], cwd=root, env=_env(root), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)


def _finish(started: tuple[list, subprocess.Popen], timeout: int = 600) -> str:
    cmd, proc = started
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{cmd[0]} exited {proc.returncode}:\n{out[-3000:]}\n{err[-6000:]}"
    return err


def _lmms_eval(root: Path, label: str, model: str, model_args: str, tasks: str, batch_size: int):
    """Start one CLI run; :func:`_collect` reads what it wrote."""
    cmd = [_venv_tool("lmms-eval"), "--model", model, "--model_args", model_args, "--tasks", tasks,
           "--include_path", root / "tasks", "--batch_size", batch_size, "--device", "cpu",
           "--output_path", root / "out" / label, "--log_samples"]
    return label, tasks, _start(cmd, root)


def _collect(root: Path, started) -> dict:
    """{"results": the results file, task: [per-sample records in doc order]} of a finished CLI run."""
    label, tasks, proc = started
    err = _finish(proc)  # lmms-eval exits 0 even when evaluation failed: the files tell
    return _read(root / "out" / label, label, tasks, err)


def _read(out: Path, label: str, tasks: str, err: str = "") -> dict:
    found = sorted(out.rglob("*_results.json"))
    assert len(found) == 1, f"{label}: expected one results file under {out}, got {found}\n{err[-6000:]}"
    run = {"results": json.loads(found[0].read_text())}
    for task in tasks.split(","):
        (samples,) = found[0].parent.glob(f"*_samples_{task}.jsonl")
        rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
        run[task] = sorted(rows, key=lambda r: r["doc_id"])
        assert len(run[task]) == N_DOCS, f"{label}/{task}: {len(run[task])} records"
    return run


@pytest.fixture(scope="module")
def lmms(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    python = _venv_tool("python")
    model_dir, data = root / "testbed-hf", root / "data"
    save_testbed_as_hf_model(model_dir)
    from vtcompress.testbed import PREAMBLE

    (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE.replace("' + preamble + '", PREAMBLE))
    _finish(_start([python, HELPERS, "dataset", data, N_DOCS], root))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tb_utils.py").write_text(UTILS)
    for name, body in TASKS.items():
        (tasks / f"{name}.yaml").write_text(TASK.format(name=name, data=data) + body.format(max_new=MAX_NEW_TOKENS))
    base = f"pretrained={model_dir}"
    ref_file = root / "reference.json"
    # the runs are independent: started together, they share the cores
    started = [
        _lmms_eval(root, "llava_hf", "llava_hf", f"{base},device_map=cpu", "tb_vqa", 1),
        _lmms_eval(root, "full", "vtcompress", f"{base},method=visionzip,budget=1.0", "tb_vqa,tb_choice", 2),
        _lmms_eval(root, "visionzip", "vtcompress", f"{base},method=visionzip,budget={VISIONZIP_BUDGET}",
                   "tb_vqa,tb_choice,tb_twice", 2),
        _lmms_eval(root, "fastv", "vtcompress", f"{base},method=fastv,budget=0.25,fastv.layer=1",
                   "tb_vqa,tb_choice", 2),
    ]
    ref = _start([python, HELPERS, "reference", model_dir, data, ref_file, "none=none",
                  f"visionzip=visionzip:{VISIONZIP_BUDGET}", f"fastv={FASTV}"], root)
    bad = _start([python, HELPERS, "bad-args", model_dir, root / "llm", root / "bad.json"], root)
    runs = {s[0]: _collect(root, s) for s in started}
    _finish(ref)
    _finish(bad)
    runs["bad_args"] = json.loads((root / "bad.json").read_text())
    return runs, json.loads(ref_file.read_text())


def _answers(run: dict, task: str = "tb_vqa") -> list[str]:
    return [r["filtered_resps"].strip() for r in run[task]]


def _record(row: dict) -> dict:
    (counts,) = row["token_counts"]
    return counts


def test_budget_one_gives_the_answers_of_lmms_evals_own_llava(lmms):
    runs, ref = lmms
    assert _answers(runs["full"]) == _answers(runs["llava_hf"]) == [a.strip() for a in ref["none"]["answers"]]
    # meaningful answers: the testbed answers its scenes' questions
    acc = runs["full"]["results"]["results"]["tb_vqa"]["exact_match,none"]
    assert acc == runs["llava_hf"]["results"]["results"]["tb_vqa"]["exact_match,none"] >= 0.5
    assert all(_record(r)["image_tokens"] == _record(r)["image_tokens_kept"] == 144 for r in runs["full"]["tb_vqa"])


@pytest.mark.parametrize("label", ["visionzip", "fastv"])
def test_compressed_batches_equal_one_by_one_and_records_show_the_savings(lmms, label):
    runs, ref = lmms
    run = runs[label]
    assert _answers(run) == [a.strip() for a in ref[label]["answers"]]
    kept = [_record(r)["image_tokens_kept"] for r in run["tb_vqa"]]
    assert kept == ref[label]["kept"] and all(k < 144 for k in kept)
    assert [_record(r)["image_tokens"] for r in run["tb_vqa"]] == [144] * N_DOCS
    ratios = [_record(r)["flops_ratio"] for r in run["tb_vqa"]]
    assert ratios == pytest.approx(ref[label]["flops_ratio"], rel=1e-12) and all(0 < r < 1 for r in ratios)
    if label == "visionzip":
        assert kept == [VISIONZIP_BUDGET] * N_DOCS
    method = "visionzip(budget=16)" if label == "visionzip" else "fastv(budget=0.25)"
    assert {_record(r)["method"] for r in run["tb_vqa"]} == {method}
    # the run's results: the model args, averages of the records, versions
    res = run["results"]
    assert f"method={label}" in res["config"]["model_args"] and res["config"]["batch_size"] in (2, "2")
    # lmms-eval averages what each call of the model logged (one call per request type: the multi-round one
    # repeats the free-answer prompts) -> the mean of each type's mean over its requests
    means = [sum(ratios) / N_DOCS]
    if label == "visionzip":
        means.append(sum(ratios) / N_DOCS)
    choice = [c["flops_ratio"] for r in run["tb_choice"] for c in r["token_counts"]]
    means.append(sum(choice) / len(choice))
    thr = res["throughput"]
    assert thr["avg_flops_ratio"] == pytest.approx(sum(means) / len(means), rel=1e-9)
    assert thr["avg_image_tokens_kept"] == pytest.approx(kept[0]) and thr["avg_image_tokens"] == 144
    assert thr["avg_budget"] == (VISIONZIP_BUDGET if label == "visionzip" else 0.25)
    versions = {json.dumps(_record(r)["versions"], sort_keys=True) for r in run["tb_vqa"]}
    (v,) = versions
    assert set(json.loads(v)) == {"vtcompress", "transformers", "torch"}


@pytest.mark.parametrize("label,ref_label", [("full", "none"), ("visionzip", "visionzip"), ("fastv", "fastv")])
def test_loglikelihood_scores_the_continuation_under_compression(lmms, label, ref_label):
    """multiple_choice -> loglikelihood: each choice's mean NLL equals the reference's (the context's prefill and
    the KV cache), uncompressed at budget 1.0 and under both methods; acc is the argmin's."""
    runs, ref = lmms
    rows = runs[label]["tb_choice"]
    # one (NLL, is_greedy) per choice (the samples file writes them as strings)
    got = [[float(nll) for nll, _ in r["filtered_resps"]] for r in rows]
    want = ref[ref_label]["nll"]
    assert [len(g) for g in got] == [len(w) for w in want]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-4)
    right = [min(range(len(w)), key=w.__getitem__) == int(r["target"]) for w, r in zip(want, rows, strict=True)]
    assert runs[label]["results"]["results"]["tb_choice"]["acc,none"] == pytest.approx(sum(right) / N_DOCS)
    kept = {c["image_tokens_kept"] for r in rows for c in r["token_counts"]}
    assert kept == ({144} if label == "full" else {VISIONZIP_BUDGET} if label == "visionzip" else {36})


def test_multi_round_runs_every_round_batched(lmms):
    runs, ref = lmms
    rounds = [r["filtered_resps"] for r in runs["visionzip"]["tb_twice"]]
    expect = [a.strip() for a in ref["visionzip"]["answers"]]
    assert [list(x) for x in rounds] == [[a, a] for a in expect]


@pytest.mark.parametrize("case,names", [
    ("unknown method", ["'visionzipp'", "did you mean 'visionzip'"]),
    ("bad budget", ["budget='lots'", "float in (0, 1]"]),
    ("unknown method parameter", ["layerr", "its parameters: budget, layer"]),
    ("parameter of a method not listed", ["visionzip.*", "fastv.KEY=VALUE"]),
    ("unknown key", ["colour", "NAME.KEY=VALUE"]),
    ("no method", ["method=NAME", "visionzip"]),
    ("method none with a budget", ["method=none", "budget"]),
    ("bad dtype", ["'float8'", "bfloat16"]),
    ("no pretrained", ["pretrained=DIR_OR_ID"]),
    ("not a supported family", ["LlamaForCausalLM", "LlavaForConditionalGeneration", "Qwen2VLForCondition"]),
])
def test_bad_model_args_raise_one_clear_error(lmms, case, names):
    message = lmms[0]["bad_args"][case]
    assert message is not None, f"{case}: the model was built"
    for name in names:
        assert name in message, message
