"""Helpers of ``test_lmms_eval.py`` that run inside the lmms-eval venv (``.venv-lmms``, which has ``datasets``):

    python lmms_helpers.py dataset OUT_DIR N        # N testbed scenes -> a DatasetDict saved with save_to_disk
    python lmms_helpers.py reference MODEL_DIR DATASET_DIR OUT.json SPEC...   # one-by-one reference answers / NLLs
    python lmms_helpers.py bad-args MODEL_DIR LLM_DIR OUT.json    # the errors of bad --model_args

Each SPEC is ``label=METHOD:BUDGET[:KEY=VALUE...]`` (``none`` for the stock model). The reference runs every
sample alone (batch 1) through plain transformers + ``vtcompress.apply``: greedy answers with ``generate``, and
the continuation's mean NLL through the KV cache (the context's prefill predicts the first continuation token, each
next one is fed through the cache as a chat turn continues), a path independent of the plugin's one forward.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

#: answer groups of the testbed's skills: a multiple-choice question offers its answer's group
GROUPS = (
    ("blue", "green", "orange", "purple", "red", "yellow"),
    ("circle", "cross", "square", "triangle"),
    ("no", "yes"),
    ("zero", "one", "two", "three"),
    ("bottomleft", "bottomright", "topleft", "topright"),
)
MAX_NEW_TOKENS = 3


def choices_of(answer: str) -> list[str]:
    return list(next(g for g in GROUPS if answer in g))


def prompt_text(question: str) -> str:
    """The task's ``doc_to_text``: the testbed's prompt layout after the image."""
    return f"question : {question}"


def make_dataset(out: Path, n: int) -> None:
    import datasets
    from PIL import Image

    from vtcompress.testbed import samples

    rows = {"question": [], "answer": [], "choices": [], "label": [], "image": []}
    for s in samples("test", n):
        rows["question"].append(s.question)
        rows["answer"].append(s.answer)
        rows["choices"].append(choices_of(s.answer))
        rows["label"].append(choices_of(s.answer).index(s.answer))
        rows["image"].append(Image.fromarray(s.image))
    feats = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                               "choices": datasets.Sequence(datasets.Value("string")),
                               "label": datasets.Value("int64"), "image": datasets.Image()})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=feats)}).save_to_disk(str(out))


def _number(v: str):
    return float(v) if "." in v else int(v)


def _method(spec: str):
    """``"none"`` -> ``None``; ``"fastv:0.25:layer=1"`` -> ``[get("fastv", budget=0.25, layer=1)]``."""
    import vtcompress

    if spec == "none":
        return None
    name, budget, *params = spec.split(":")
    kw = {k: _number(v) for k, v in (p.split("=") for p in params)}
    return [vtcompress.get(name, budget=_number(budget), **kw)]


def reference(model_dir: Path, data_dir: Path, out: Path, specs: list[str]) -> None:
    import datasets
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(1)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    tok = processor.tokenizer
    docs = datasets.load_from_disk(str(data_dir))["test"]
    result = {}
    for spec in specs:
        label, _, what = spec.partition("=")
        methods = _method(what)
        answers, nlls, kept, ratios = [], [], [], []
        for doc in docs:
            content = [{"type": "image"}, {"type": "text", "text": prompt_text(doc["question"])}]
            conv = [{"role": "user", "content": content}]
            prompt = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
            inputs = dict(processor(text=[prompt], images=[doc["image"].convert("RGB")], return_tensors="pt"))
            with torch.inference_mode():
                with _block(model, methods) as handle:
                    o = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                       pad_token_id=tok.pad_token_id)
                answers.append(tok.decode(o[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
                if handle is not None:
                    s = handle.summary()
                    kept.append(s.visual_kept[0])
                    ratios.append(s.flops_ratio)
                per_choice = []
                for choice in doc["choices"]:
                    cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
                    with _block(model, methods):
                        per_choice.append(_cached_nll(model, inputs, cont, tok.pad_token_id))
                nlls.append(per_choice)
        result[label] = {"answers": answers, "nll": nlls, "kept": kept, "flops_ratio": ratios}
    out.write_text(json.dumps(result, indent=1))


def _block(model, methods):
    import contextlib

    import vtcompress

    return vtcompress.apply(model, methods) if methods else contextlib.nullcontext()


def _cached_nll(model, inputs: dict, cont: list[int], pad: int) -> float:
    """Mean NLL of ``cont`` after the prompt: the prefill's next-token logits, then one cache step per token."""
    ids = inputs["input_ids"]
    o = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                       output_logits=True, pad_token_id=pad)
    total = -torch.log_softmax(o.logits[0][0].float(), -1)[cont[0]]
    cache = o.past_key_values
    for k in range(1, len(cont)):
        turn = torch.cat([ids, torch.tensor([cont[:k]])], 1)
        o = model.generate(input_ids=turn, attention_mask=torch.ones_like(turn), past_key_values=cache,
                           max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_logits=True,
                           pad_token_id=pad)
        total = total - torch.log_softmax(o.logits[0][0].float(), -1)[cont[k]]
        cache = o.past_key_values
    return float(total / len(cont))


BAD_ARGS = {
    "unknown method": {"method": "visionzipp", "budget": 64},
    "bad budget": {"method": "visionzip", "budget": "lots"},
    "unknown method parameter": {"method": "fastv", "budget": 0.5, "fastv.layerr": 2},
    "parameter of a method not listed": {"method": "fastv", "budget": 0.5, "visionzip.budget": 64},
    "unknown key": {"method": "fastv", "budget": 0.5, "colour": "red"},
    "no method": {},
    "method none with a budget": {"method": "none", "budget": 64},
    "bad dtype": {"method": "fastv", "budget": 0.5, "dtype": "float8"},
}


def bad_args(model_dir: Path, llm_dir: Path, out: Path) -> None:
    """Each bad ``--model_args`` -> the one error message the lmms-eval model raises (nothing is loaded)."""
    from transformers import LlamaConfig

    from vtcompress.integrations.lmms_eval import VTCompressLMM

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, architectures=["LlamaForCausalLM"]).save_pretrained(llm_dir)
    cases = {k: {"pretrained": str(model_dir), **v} for k, v in BAD_ARGS.items()}
    cases["no pretrained"] = {"method": "fastv", "budget": 0.5}
    cases["not a supported family"] = {"pretrained": str(llm_dir), "method": "fastv", "budget": 0.5}
    messages = {}
    for name, args in cases.items():
        try:
            VTCompressLMM(**args)
            messages[name] = None
        except ValueError as e:
            messages[name] = str(e)
    out.write_text(json.dumps(messages, indent=1))


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    if cmd == "dataset":
        make_dataset(Path(rest[0]), int(rest[1]))
    elif cmd == "reference":
        reference(Path(rest[0]), Path(rest[1]), Path(rest[2]), rest[3:])
    elif cmd == "bad-args":
        bad_args(Path(rest[0]), Path(rest[1]), Path(rest[2]))
    else:
        raise SystemExit(f"unknown command {cmd!r}; allowed: dataset, reference, bad-args")
