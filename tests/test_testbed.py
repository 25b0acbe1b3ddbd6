"""Tests of the embedded testbed: generator, tokenizer/encode, and the shipped weights."""

import collections
import json

import numpy as np
import torch

from vtcompress.testbed import data as D
from vtcompress.testbed import model as M

# Small torch ops are faster single-threaded on this CPU class (a conftest may also set it).
torch.set_num_threads(1)


def test_generator_deterministic():
    a = D.samples("test", 10, seed=0)
    b = D.samples("test", 10, seed=0)
    for x, y in zip(a, b, strict=False):
        assert x.image.dtype == np.uint8 and x.image.shape == (D.IMAGE_SIZE, D.IMAGE_SIZE, 3)
        assert x.image.tobytes() == y.image.tobytes()
        assert (x.question, x.answer, x.skill) == (y.question, y.answer, y.skill)
        assert x.objects == y.objects
    assert D.make_sample(123).image.tobytes() == D.make_sample(123).image.tobytes()


def test_splits_differ():
    tr = D.samples("train", 10)
    va = D.samples("val", 10)
    te = D.samples("test", 10)
    assert len({s.seed for s in tr} | {s.seed for s in va} | {s.seed for s in te}) == 30
    for x, y, z in zip(tr, va, te, strict=False):
        assert x.image.tobytes() != y.image.tobytes() != z.image.tobytes()
    # Seed ranges are disjoint: the train split could never reach the val range.
    assert D.SPLIT_START["train"] + 1000 * D.SPLIT_SEEDS_PER_RUN <= D.SPLIT_START["val"] < D.SPLIT_START["test"]


def test_answers_balanced_and_valid():
    smp = D.samples("val", 500)
    by_skill = collections.defaultdict(collections.Counter)
    for s in smp:
        by_skill[s.skill][s.answer] += 1
        assert s.answer in D.ANSWER_WORDS
        assert 1 <= len(s.objects) <= D.MAX_OBJECTS
        # The answer agrees with the scene the question was asked about.
        assert (s.question, s.answer, s.skill) in D.all_questions(s.objects)
    assert set(by_skill) == set(D.SKILLS)
    for sk, cnt in by_skill.items():
        n_answers = len(cnt)
        assert n_answers >= 2, sk
        # No answer dominates: the most common is below 2.2x its uniform share.
        assert max(cnt.values()) / sum(cnt.values()) < 2.2 / n_answers, (sk, cnt)


def test_every_answer_word_is_one_token():
    tok = M.build_tokenizer()
    for w in D.ANSWER_WORDS + D.vocabulary():
        ids = tok(w, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, w
    pre = tok(D.PREAMBLE, add_special_tokens=False)["input_ids"]
    assert 10 <= len(pre) <= 20


def test_encode_layout():
    tok = M.build_tokenizer()
    smp = [s for s in D.samples("val", 10) if s.skill in ("exists", "small")][:4]
    enc = M.encode(tok, smp)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    img_id = tok.convert_tokens_to_ids(M.IMAGE_TOKEN)
    assert enc["pixel_values"].shape == (len(smp), 3, D.IMAGE_SIZE, D.IMAGE_SIZE)
    assert enc["pixel_values"].dtype == torch.float32
    assert ((ids == img_id).sum(1) == D.N_PATCHES).all()
    lengths = [len(tok(M.build_prompt(s.question), add_special_tokens=False)["input_ids"]) for s in smp]
    assert len(set(lengths)) > 1  # the slice mixes question lengths, so padding is exercised
    for b, n in enumerate(lengths):
        # LEFT padding: zeros first, then n ones; pad ids exactly where the mask is 0.
        assert mask[b].tolist() == [0] * (ids.shape[1] - n) + [1] * n
        assert (ids[b][mask[b] == 0] == tok.pad_token_id).all()
        assert ids[b, -n] == tok.bos_token_id
    assert enc["answer_ids"].tolist() == tok.convert_tokens_to_ids([s.answer for s in smp])


def test_save_samples_png(tmp_path):
    p = tmp_path / "grid.png"
    D.save_samples_png(D.samples("val", 4), str(p))
    assert p.stat().st_size > 1000


def test_shipped_weights_reach_stated_accuracy():
    from transformers import LlavaForConditionalGeneration

    card = json.loads((M.WEIGHTS_DIR / "card.json").read_text())
    model, tok = M.load_testbed()
    assert isinstance(model, LlavaForConditionalGeneration) and not model.training
    assert model.config.vision_feature_select_strategy == "default"
    assert (M.WEIGHTS_DIR / "model.safetensors").stat().st_size <= 10 * 2**20
    smp = D.samples("test", 128)
    res = M.evaluate(model, tok, smp, batch_size=64)
    # The card states the accuracy on this exact slice as well as on the large test set.
    assert abs(res["accuracy"] - card["test_slice_128"]["accuracy"]) < 0.02
    assert res["accuracy"] >= card["test"]["accuracy"] - 0.08
    assert set(res["per_skill"]) == set(D.SKILLS)


def test_generate_matches_forward():
    model, tok = M.load_testbed()
    smp = D.samples("test", 8)
    gen = M.generate_answer(model, tok, smp)
    res = M.evaluate(model, tok, smp, restrict_to_answers=False)
    assert gen == res["predictions"]


def test_batch_streams_disjoint_and_reproducible():
    from vtcompress.testbed import train as T

    tok = M.build_tokenizer()
    a = [next(T.batch_iter(T.Batcher(tok, 0, 2), 3, packed=True, need_images=False))["input_ids"] for _ in range(2)]
    assert torch.equal(a[0], a[1])  # in-process stream: same seed, same batch
    b0 = T.Batcher(tok, 0, 2)
    first = b0.draw(3, packed=False)
    assert b0.next_seed == D.SPLIT_START["train"] + 3
    w1 = T.Batcher(tok, 0, 2, stream=1)
    assert w1.next_seed == D.SPLIT_START["train"] + T.Batcher.SEEDS_PER_STREAM
    assert not torch.equal(w1.draw(3, packed=False)["pixel_values"], first["pixel_values"])
    # Background workers: each draws its own stream; two runs of the loader give the same batches.
    runs = []
    for _ in range(2):
        it = T.batch_iter(T.Batcher(tok, 0, 2), 3, packed=False, need_images=True, workers=2)
        runs.append([next(it) for _ in range(4)])
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and torch.equal(x["input_ids"], y["input_ids"])
    streams = {T.Batcher(tok, 0, 2, stream=k).draw(3, packed=False)["pixel_values"].sum().item() for k in (1, 2)}
    assert {b["pixel_values"].sum().item() for b in runs[0][:2]} == streams
    # A second call on the same batcher (the next stage) takes fresh streams 3 and 4.
    bt = T.Batcher(tok, 0, 2)
    next(T.batch_iter(bt, 3, packed=False, need_images=True, workers=2))
    nxt = next(T.batch_iter(bt, 3, packed=False, need_images=True, workers=2))
    later = {T.Batcher(tok, 0, 2, stream=k).draw(3, packed=False)["pixel_values"].sum().item() for k in (3, 4)}
    assert nxt["pixel_values"].sum().item() in later and bt.next_stream == 5
    assert all(set(b["patch"]) == set(first["patch"]) for b in runs[0])


def test_train_cli_runs_every_stage_and_writes_a_loadable_card(tmp_path):
    from vtcompress.cli import main
    from vtcompress.testbed import cli as train_cli

    out = tmp_path / "tb"
    steps = [a for i in range(1, 5) for a in (f"--steps-s{i}", "2")]
    recipe = train_cli.train_main(["--out", str(out), "--batch", "4", "--threads", "1", "--eval-n", "10", *steps])
    assert recipe["steps_done"] == {"s1": 2, "s2": 2, "s3": 2, "s4": 2}
    log = json.loads((out / "training_log.json").read_text())
    assert {r["stage"] for r in log["curve"]} >= {"after_s3", "final_val"}
    model, tok = M.load_testbed(out)
    assert sum(p.numel() for p in model.parameters()) == recipe["parameters"]
    assert main(["testbed", "card", "--model", str(out), "--n", "20", "--slice", "10", "--command", "smoke"]) == 0
    card = json.loads((out / "card.json").read_text())
    res = M.evaluate(model, tok, D.samples("test", 10))
    assert card["test_slice_10"]["accuracy"] == res["accuracy"] and card["test"]["n"] == 20
    assert card["recipe"] == recipe and card["command"] == "smoke"


def test_drop_background_equals_masking_the_background():
    """Stage 2's short sequences give the LLM exactly what the full layout gives with background masked out."""
    from vtcompress.testbed import train as T

    tok = M.build_tokenizer()
    model = M.build_model(tok, text_hidden=32, vision_hidden=32, text_layers=2, vision_layers=1).eval()
    lm, img_id = model.model.language_model, model.config.image_token_id
    b = T.Batcher(tok, 0, 3).draw(4, packed=True, need_images=False)
    emb = T.image_embeds(model, b, torch.randn(4, D.N_PATCHES, 32))
    short, bs, pos = T.drop_background(b, emb, img_id)
    n_obj = (b["patch"]["colour"] > 0).sum(1)
    n_text = ((b["input_ids"] != img_id) & b["attention_mask"].bool()).sum(1)
    assert bs["attention_mask"].sum(1).tolist() == (n_obj + n_text).tolist()
    assert (bs["attention_mask"][:, -1] == 1).all()  # left padded again
    ids_short = b["input_ids"].gather(1, pos)
    assert (ids_short[bs["ans_rows"], bs["ans_cols"]] == b["input_ids"][b["ans_rows"], b["ans_cols"]]).all()
    with torch.no_grad():
        h_short = lm(inputs_embeds=short, attention_mask=bs["attention_mask"], position_ids=pos).last_hidden_state
        bg = torch.zeros_like(b["attention_mask"])
        bg[b["input_ids"] == img_id] = (b["patch"]["colour"] == 0).long().reshape(-1)
        h_full = lm(inputs_embeds=emb, attention_mask=b["attention_mask"] * (1 - bg)).last_hidden_state
    torch.testing.assert_close(h_short[bs["ans_rows"], bs["ans_cols"]], h_full[b["ans_rows"], b["ans_cols"]],
                               atol=1e-5, rtol=1e-4)
