"""The video (clip) testbed: procedural clips, the OneVision model built from the image testbed, its weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vtcompress
from vtcompress.testbed import clip_model as CM
from vtcompress.testbed import clips as C
from vtcompress.testbed import data as D


def test_clips_deterministic_and_splits_disjoint():
    a, b = C.clip_samples("val", 7, 8), C.clip_samples("val", 7, 8)
    for x, y in zip(a, b, strict=True):
        assert x.question == y.question and x.answer == y.answer and x.skill == y.skill
        assert all(np.array_equal(f, g) for f, g in zip(x.frames, y.frames, strict=True))
    assert [s.skill for s in a] == C.CLIP_SKILLS
    seeds = {sp: {C.clip_seed(sp, i, s) for i in (0, 10**6 - 1) for s in (0, 3)} for sp in C.CLIP_SPLIT_START}
    lo = {sp: min(v) for sp, v in seeds.items()}
    hi = {sp: max(v) for sp, v in seeds.items()}
    order = sorted(C.CLIP_SPLIT_START, key=C.CLIP_SPLIT_START.get)
    for p, q in zip(order, order[1:], strict=False):
        assert hi[p] < lo[q]
    assert hi["val"] < C.CLIP_SPLIT_START["test"] and hi["train"] < C.CLIP_SPLIT_START["val"]
    c = C.make_clip_sample(5, 8)
    assert c.frames[0].shape == (D.IMAGE_SIZE, D.IMAGE_SIZE, 3) and c.frames[0].dtype == np.uint8
    assert not np.array_equal(C.make_clip_sample(6, 8).frames[0], c.frames[0])
    for T in (4, 16):
        assert len(C.make_clip_sample(1, T).frames) == T
    with pytest.raises(ValueError):
        C.make_clip_sample(0, 3)


def test_background_static_and_answers_correct_by_construction():
    for T in (4, 8, 16):
        for s in C.clip_samples("test", 14, T):
            # the answer follows from the per-frame objects alone (an independent derivation)
            derived = {q: a for q, a, _ in C.clip_questions(s.objects)}
            assert derived.get(s.question) == s.answer, (s.skill, s.question)
            # pixels off every object are the same in every frame (one static background)
            off = np.ones((D.IMAGE_SIZE, D.IMAGE_SIZE), bool)
            for objs in s.objects:
                for o in objs:
                    x0, y0, x1, y1 = o["box"]
                    off[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = False
            assert all(np.array_equal(f[off], s.frames[0][off]) for f in s.frames)


def test_direction_and_events_match_positions():
    for s in C.clip_samples("train", 40, 8, skill="direction"):
        c, sh = s.question.split()[4:6]
        track = [o["centre"] for objs in s.objects for o in objs if o["colour"] == c and o["shape"] == sh]
        assert len(track) == 8
        dx, dy = track[-1][0] - track[0][0], track[-1][1] - track[0][1]
        want = {"left": dx < -20, "right": dx > 20, "up": dy < -20, "down": dy > 20}
        assert want[s.answer] and sum(want.values()) == 1
    for s in C.clip_samples("train", 10, 8, skill="appeared"):
        first, last = {o["id"] for o in s.objects[0]}, {o["id"]: o for o in s.objects[-1]}
        new = [o for k, o in last.items() if k not in first]
        assert len(new) == 1 and s.answer in (new[0]["colour"], new[0]["shape"])
    for s in C.clip_samples("train", 10, 8, skill="count_time"):
        first = {o["id"] for o in s.objects[0]}
        n = len({o["id"] for objs in s.objects for o in objs} - first)
        assert s.answer == D.COUNT_WORDS[n]


@pytest.fixture(scope="module")
def clip_testbed():
    torch.set_num_threads(2)
    return CM.load_clip_testbed()


def test_every_answer_a_single_token(clip_testbed):
    _, tok = clip_testbed
    words = CM.clip_answer_words()
    for w in words:
        assert tok(w, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(w)]
        assert tok.convert_tokens_to_ids(w) != tok.unk_token_id
    for s in C.clip_samples("train", 21, 8):
        assert s.answer in words
        assert tok.unk_token_id not in tok(s.question, add_special_tokens=False)["input_ids"]


def test_video_tokens_and_full_budget_evs_is_exact(clip_testbed):
    model, tok = clip_testbed
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert model.config.vision_feature_select_strategy == "default" and model.config.vision_feature_layer == -2
    for T in (4, 8):
        smp = C.clip_samples("test", 3, T)
        enc = CM.encode_clips(tok, smp, model.config)
        assert enc["pixel_values_videos"].shape == (3, T, 3, 96, 96)
        n_vid = (enc["input_ids"] == model.config.video_token_index).sum(1)
        assert n_vid.tolist() == [T * 36 + 1] * 3
        inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values_videos")}
        with torch.no_grad():
            ref = model(**inputs).logits
            with vtcompress.apply(model, vtcompress.get("evs", budget=1.0)):
                got = model(**inputs).logits
        assert torch.equal(got, ref)


def test_shipped_clip_weights_accuracy(clip_testbed):
    """The shipped weights reproduce their card on its 64-clip slices (T = 8 and 16), and the card's 1,000-clip
    test accuracy at both lengths is the 90 % the testbed is held to."""
    import json

    model, tok = clip_testbed
    card = json.loads((CM.CLIP_WEIGHTS_DIR / "card.json").read_text())
    for frames in (8, 16):
        r = CM.evaluate_clips(model, tok, C.clip_samples("test", 64, frames))
        assert r["n"] == 64 and set(r["per_skill"]) == set(C.CLIP_SKILLS)
        assert r["per_skill"] == card[f"test_t{frames}_slice_64"]["per_skill"], (frames, r)
        assert card[f"test_t{frames}"]["n"] == 1000 and card[f"test_t{frames}"]["accuracy"] >= 0.9


def test_skill_weights_steer_the_training_clips(clip_testbed):
    """``train-clips --skill-weights``: the named skills' share of first questions follows the weights; bad
    weights are refused by name."""
    from vtcompress.testbed.train_clips import ClipBatcher, parse_skill_weights

    p = parse_skill_weights("disappeared=3,static_attribute=0")
    w = np.ones(len(C.CLIP_SKILLS))
    w[C.CLIP_SKILLS.index("disappeared")], w[C.CLIP_SKILLS.index("static_attribute")] = 3, 0
    np.testing.assert_allclose(p, w / w.sum())
    assert parse_skill_weights("") is None
    for bad, match in (("colour=2", "skill one of"), ("order=x", "not a number"), ("order=-1", ">= 0"),
                       ("order", "skill=w"), (",".join(f"{s}=0" for s in C.CLIP_SKILLS), "all zero")):
        with pytest.raises(ValueError, match=match):
            parse_skill_weights(bad)
    _, tok = clip_testbed
    only = parse_skill_weights(",".join(f"{s}={int(s == 'static_attribute')}" for s in C.CLIP_SKILLS))
    batcher = ClipBatcher(tok, 0, 1, only)
    batch = batcher.draw(3, 4)
    # max_qa=1: one question per clip, the first one, of the only skill with weight
    first = [tok.convert_ids_to_tokens(int(t)) for t in batch["tgt"]]
    assert len(first) == 3 and set(first) <= set(D.COLOUR_NAMES + D.SHAPES)
    assert all(C.make_clip_sample(batcher.next_seed - 3 + i, 4, "static_attribute").answer == a
               for i, a in enumerate(first))


def test_rewritten_card_keeps_the_training_history(tmp_path, monkeypatch):
    """``train-clips --card-only`` re-evaluates the model and rewrites ``card.json``; the previous card's
    ``stages`` and ``command`` survive, the test results are the new evaluation's."""
    import json
    import shutil

    from vtcompress.testbed import train_clips as TC

    shutil.copytree(CM.CLIP_WEIGHTS_DIR, tmp_path / "clip")
    before = json.loads((tmp_path / "clip" / "card.json").read_text())
    seen = []

    def fake_eval(model, tok, samples):
        seen.append(len(samples))
        return {"n": len(samples), "accuracy": 0.5, "per_skill": dict.fromkeys(C.CLIP_SKILLS, 0.5)}

    monkeypatch.setattr(CM, "evaluate_clips", fake_eval)
    card = TC.write_clip_card(tmp_path / "clip", n_test=3, t16=True)
    assert seen == [3, 64, 3, 64]  # T = 8: the test clips, the slice; then T = 16
    assert card["stages"] == before["stages"] and card["command"] == before["command"]
    assert card["test_t8"] == {"n": 3, "accuracy": 0.5, "per_skill": dict.fromkeys(C.CLIP_SKILLS, 0.5)}
    assert json.loads((tmp_path / "clip" / "card.json").read_text()) == card
