"""Fine-tune the testbed's video model (``LlavaOnevisionForConditionalGeneration``) on clip QA, on 2 CPU cores.

Starts from the image testbed's weights (:func:`clip_model.clip_model_from_testbed`) or a saved clip model
(``--init``). The vision tower is frozen and run under ``no_grad``; the projector, ``image_newline``, the language
model (new word embeddings included) and ``lm_head`` are trained with the answer-token cross-entropy, the video
features built exactly as the stock ``get_video_features`` builds them (projector, 2x2 bilinear ``apply_pooling``,
newline). Several questions (:func:`clips.clip_questions`) are packed after one clip; the first is always the
single-question prompt of inference. Each batch holds clips of one length: 16 frames with probability
``--p16``, else 8. The run is time-boxed by ``--minutes``; every ``--eval-every`` minutes it evaluates on val and
saves the best model to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import clip_model as CM
from . import clips as C


@dataclass
class ClipTrainConfig:
    out: str = str(CM.CLIP_WEIGHTS_DIR)
    init: str | None = None  # a saved clip model; default: convert the image testbed
    seed: int = 0
    threads: int = 2
    batch: int = 16
    max_qa: int = 4
    minutes: float = 60.0
    steps: int = 0
    lr: float = 1e-3
    p16: float = 0.0
    eval_every: float = 5.0
    eval_n: int = 280
    # Relative weights of the skills of the first question of each clip, "skill=w,..." (unnamed skills: 1);
    # empty: every skill equally often. Later stages aim at the skills an earlier stage left weak.
    skill_weights: str = ""


def parse_skill_weights(text: str) -> np.ndarray | None:
    """``"disappeared=3,static_attribute=3"`` -> probabilities over :data:`clips.CLIP_SKILLS` (None when empty)."""
    if not text:
        return None
    w = dict.fromkeys(C.CLIP_SKILLS, 1.0)
    for item in text.split(","):
        name, sep, val = item.partition("=")
        name = name.strip()
        if not sep or name not in w:
            raise ValueError(f"skill weight {item!r} must be skill=w with skill one of {', '.join(C.CLIP_SKILLS)}")
        try:
            w[name] = float(val)
        except ValueError:
            raise ValueError(f"skill weight {item!r}: {val!r} is not a number") from None
        if not w[name] >= 0:
            raise ValueError(f"skill weight {item!r} must be >= 0")
    p = np.array([w[k] for k in C.CLIP_SKILLS])
    if p.sum() <= 0:
        raise ValueError(f"skill weights {text!r} are all zero")
    return p / p.sum()


class ClipBatcher:
    """Training clips from the train seed range (deterministic given seed), packed with extra questions."""

    def __init__(self, tokenizer, seed: int, max_qa: int, skill_p: np.ndarray | None = None):
        self.tok = tokenizer
        self.rng = np.random.default_rng(seed + 777)
        self.next_seed = C.CLIP_SPLIT_START["train"] + seed * 50_000_000
        self.max_qa = max_qa
        self.skill_p = skill_p

    def draw(self, n: int, frames: int):
        smp = []
        for _ in range(n):
            skill = None if self.skill_p is None else C.CLIP_SKILLS[int(self.rng.choice(len(C.CLIP_SKILLS),
                                                                                      p=self.skill_p))]
            smp.append(C.make_clip_sample(self.next_seed, frames, skill))
            self.next_seed += 1
        prefix = self.tok(CM.build_clip_prompt("", CM.video_token_count(frames)).rsplit(" question :", 1)[0],
                          add_special_tokens=False)["input_ids"]
        seqs, pos, tgt = [], [], []
        for s in smp:
            qas = [(s.question, s.answer)]
            extra = [(q, a) for q, a, _ in C.clip_questions(s.objects) if q != s.question]
            k = min(len(extra), int(self.rng.integers(0, self.max_qa)))
            qas += [extra[i] for i in self.rng.choice(len(extra), k, replace=False)] if k else []
            seq, p, a_ids = list(prefix), [], []
            for q, a in qas:
                seq += self.tok(f"question : {q} answer :", add_special_tokens=False)["input_ids"]
                p.append(len(seq) - 1)
                a_ids.append(self.tok.convert_tokens_to_ids(a))
                seq.append(a_ids[-1])
            seqs.append(seq)
            pos.append(p)
            tgt.append(a_ids)
        L = max(len(s) for s in seqs)
        ids = torch.full((n, L), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, L), dtype=torch.long)
        rows, cols, tg = [], [], []
        for b, (seq, p, a) in enumerate(zip(seqs, pos, tgt, strict=True)):
            off = L - len(seq)
            ids[b, off:] = torch.tensor(seq)
            mask[b, off:] = 1
            rows += [b] * len(p)
            cols += [x + off for x in p]
            tg += a
        return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": CM.pixel_values_from_clips(smp),
                "rows": torch.tensor(rows), "cols": torch.tensor(cols), "tgt": torch.tensor(tg)}


def video_embeds(model, batch) -> torch.Tensor:
    """Input embeddings with the video placeholders filled as the stock get_video_features does (tower frozen)."""
    mm = model.model
    cfg = model.config
    pv = batch["pixel_values_videos"]
    B, T = pv.shape[:2]
    with torch.no_grad():
        hs = mm.vision_tower(pv.flatten(0, 1), output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            hs = hs[:, 1:]
    feats = mm.apply_pooling(mm.multi_modal_projector(hs)).reshape(B, -1, cfg.text_config.hidden_size)
    feats = torch.cat([feats, mm.image_newline[None, None].expand(B, 1, -1)], dim=1)
    emb = mm.language_model.embed_tokens(batch["input_ids"])
    m = batch["input_ids"] == cfg.video_token_id
    return emb.masked_scatter(m.unsqueeze(-1), feats.to(emb.dtype))


def step_loss(model, batch):
    emb = video_embeds(model, batch)
    h = model.model.language_model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).last_hidden_state
    logits = model.lm_head(h[batch["rows"], batch["cols"]])
    loss = F.cross_entropy(logits, batch["tgt"])
    return loss, float((logits.argmax(-1) == batch["tgt"]).float().mean())


def train_clips(cfg: ClipTrainConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.init:
        model, tok = CM.load_clip_testbed(cfg.init)
    else:
        model, tok = CM.clip_model_from_testbed(seed=cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    mm = model.model
    train_params = (list(mm.multi_modal_projector.parameters()) + [mm.image_newline]
                    + list(mm.language_model.parameters()) + list(model.lm_head.parameters()))
    for p in train_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(train_params, lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    batcher = ClipBatcher(tok, cfg.seed, cfg.max_qa, parse_skill_weights(cfg.skill_weights))
    frng = np.random.default_rng(cfg.seed + 99)
    val8 = C.clip_samples("val", cfg.eval_n, 8)
    val16 = C.clip_samples("val", cfg.eval_n // 2, 16) if cfg.p16 > 0 else []
    curve: list[dict] = []
    evals: dict[str, dict] = {}
    best = {"accuracy": -1.0}

    def progress(step):
        if cfg.steps:
            return step / cfg.steps
        return (time.time() - t0) / (60 * cfg.minutes)

    def evaluate_now(tag):
        model.eval()
        r = CM.evaluate_clips(model, tok, val8)
        rec = {"accuracy": r["accuracy"], "per_skill": r["per_skill"], "n": r["n"]}
        if val16:
            r16 = CM.evaluate_clips(model, tok, val16)
            rec["t16"] = {"accuracy": r16["accuracy"], "per_skill": r16["per_skill"], "n": r16["n"]}
        model.train()
        score = rec["accuracy"] if not val16 else (2 * rec["accuracy"] + rec["t16"]["accuracy"]) / 3
        rec["score"] = score
        rec["time_min"] = round((time.time() - t0) / 60, 2)
        evals[tag] = rec
        print(f"[{tag}] val T=8 {rec['accuracy']:.4f} {json.dumps(r['per_skill'])}"
              + (f" | T=16 {rec['t16']['accuracy']:.4f}" if val16 else ""), flush=True)
        if score > best["accuracy"]:
            best.update(accuracy=score, tag=tag, state=copy.deepcopy(model.state_dict()))
            model.save_pretrained(str(out), safe_serialization=True)
            tok.save_pretrained(str(out))
            print(f"  saved best ({tag}) to {out}", flush=True)
        return rec

    evaluate_now("start")
    model.train()
    step, ema, last_eval, n16 = 0, {}, time.time(), 0
    warmup = 50
    # Other processes may hold a core: with 2 threads on 1 free core a step is several times slower (the threads
    # wait on each other), so every 100 steps time 6 steps at each thread count <= cfg.threads and keep the faster.
    probe: dict[int, list[float]] = {}
    n_threads = cfg.threads
    while progress(step) < 1.0:
        cyc = step % 100
        if cfg.threads > 1 and cyc < 12:
            n_threads = 1 if cyc < 6 else cfg.threads
            if cyc == 0:
                probe = {}
        elif cfg.threads > 1 and cyc == 12 and probe:
            n_threads = min(probe, key=lambda k: float(np.median(probe[k])))
        torch.set_num_threads(n_threads)
        t_step = time.time()
        frames = 16 if frng.random() < cfg.p16 else 8
        n16 += frames == 16
        b = batcher.draw(cfg.batch if frames == 8 else max(1, cfg.batch // 2), frames)
        loss, acc = step_loss(model, b)
        f = min(1.0, progress(step))
        lr = cfg.lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * f)))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(train_params, 1.0)
        opt.step()
        if cfg.threads > 1 and 1 <= cyc < 12 and cyc != 6:  # skip the first step after a switch
            probe.setdefault(n_threads, []).append(time.time() - t_step)  # T=16 batches are half as big: ~same cost
        step += 1
        for k, v in (("loss", float(loss.detach())), ("acc", acc)):
            ema[k] = v if k not in ema else 0.97 * ema[k] + 0.03 * v
        if step % 20 == 0:
            curve.append({"step": step, "time_s": round(time.time() - t0, 1), "lr": lr,
                          **{k: round(v, 4) for k, v in ema.items()}})
            print(f"step {step} t={time.time() - t0:.0f}s lr={lr:.2e} loss={ema['loss']:.4f} acc={ema['acc']:.3f} "
                  f"threads={n_threads}", flush=True)
        if time.time() - last_eval > 60 * cfg.eval_every:
            evaluate_now(f"step{step}")
            last_eval = time.time()
    evaluate_now(f"final_step{step}")
    model.load_state_dict(best["state"])
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    recipe = {
        "args": dataclasses.asdict(cfg),
        "steps": step,
        "steps_t16": int(n16),
        "train_minutes": round((time.time() - t0) / 60, 2),
        "best": best["tag"],
        "best_val": evals[best["tag"]],
        "evals": evals,
        "trained": "projector, image_newline, language model (new embeddings included), lm_head; vision tower frozen",
    }
    (out / "training_log.json").write_text(json.dumps({"recipe": recipe, "curve": curve}, indent=1))
    return recipe


def write_clip_card(path: str | Path, n_test: int = 1000, t16: bool = True, command: str | None = None) -> dict:
    """Evaluate the clip model saved in ``path`` on the first ``n_test`` test clips (T=8, and T=16 when ``t16``)
    and write its ``card.json`` (the previous card's ``command`` unless one is given, and its ``stages``)."""
    path = Path(path)
    model, tok = CM.load_clip_testbed(path)
    log = path / "training_log.json"
    recipe = json.loads(log.read_text())["recipe"] if log.exists() else None
    old = path / "card.json"
    previous = json.loads(old.read_text()) if old.exists() else {}
    if command is None:
        command = previous.get("command")
    card = {
        "model": "LlavaOnevisionForConditionalGeneration (CLIP vision tower with [CLS], 2-layer MLP projector, "
                 "Llama LM), built from the image testbed (vtcompress/testbed/weights)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "video": {"frame_size": 96, "patch": 8, "frame_grid": [12, 12], "pooled_grid": [CM.POOLED_GRID] * 2,
                  "tokens_per_frame": CM.TOKENS_PER_FRAME, "video_tokens": "T * 36 + 1 (one newline per video)"},
        "skills": C.CLIP_SKILLS,
        "recipe": recipe,
    }
    for T in ((8, 16) if t16 else (8,)):
        r = CM.evaluate_clips(model, tok, C.clip_samples("test", n_test, T))
        card[f"test_t{T}"] = {"n": n_test, "accuracy": r["accuracy"], "per_skill": r["per_skill"]}
        r = CM.evaluate_clips(model, tok, C.clip_samples("test", 64, T))
        card[f"test_t{T}_slice_64"] = {"n": 64, "accuracy": r["accuracy"], "per_skill": r["per_skill"]}
    card["command"] = command
    if "stages" in previous:  # the training history (one entry per stage, with its log), kept as it is
        card["stages"] = previous["stages"]
    old.write_text(json.dumps(card, indent=1))
    return card


def train_clips_main(argv: list[str] | None = None) -> int:
    """CLI: ``vtcompress testbed train-clips [--out DIR] [--minutes M] [--p16 P] [--card] ...``."""
    d = ClipTrainConfig()
    ap = argparse.ArgumentParser(prog="vtcompress testbed train-clips", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=d.out)
    ap.add_argument("--init", default=None, help="start from a saved clip model (default: the image testbed)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--max-qa", type=int, default=d.max_qa)
    ap.add_argument("--minutes", type=float, default=d.minutes, help="time box of the run (default 60)")
    ap.add_argument("--steps", type=int, default=d.steps, help="overrides --minutes when > 0")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--p16", type=float, default=d.p16, help="share of batches of 16-frame clips (else 8)")
    ap.add_argument("--eval-every", type=float, default=d.eval_every, help="minutes between val evaluations")
    ap.add_argument("--eval-n", type=int, default=d.eval_n)
    ap.add_argument("--skill-weights", default=d.skill_weights,
                    help="weights of the first question's skill, e.g. disappeared=3,static_attribute=3 "
                         "(default: equal)")
    ap.add_argument("--card", type=int, default=0, help="then write card.json on this many test clips (0: no)")
    ap.add_argument("--card-only", action="store_true", help="only (re)write card.json for --out")
    ap.add_argument("--command", default=None, help="training command recorded in the card")
    args = vars(ap.parse_args(argv))
    card_n, card_only, command = args.pop("card"), args.pop("card_only"), args.pop("command")
    cfg = ClipTrainConfig(**args)
    if not card_only:
        train_clips(cfg)
    if card_n or card_only:
        torch.set_num_threads(cfg.threads)
        log = Path(cfg.out) / "training_log.json"
        trained16 = log.exists() and json.loads(log.read_text())["recipe"]["args"]["p16"] > 0
        card = write_clip_card(cfg.out, card_n or 1000, t16=trained16 or cfg.p16 > 0, command=command)
        print(json.dumps({k: v for k, v in card.items() if k.startswith("test")}, indent=1))
    return 0


if __name__ == "__main__":
    train_clips_main()
