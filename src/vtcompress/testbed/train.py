"""Staged training of the testbed VLM (LLaVA-style), on 2 CPU cores.

Stages (each bounded by ``--minutes-sN`` or ``--steps-sN``):

1. vision: pretrain the CLIP vision tower with auxiliary linear heads on the features LLaVA uses
   (``hidden_states[-2]``): per-patch colour / shape / size / object-centre flag / object quadrant /
   patch row and column; on [CLS] (at layer -2 and at the pooled output): presence of every colour-shape pair
   and counts per shape and per colour; plus a loss that puts the layer -2 [CLS] attention on object patches,
   so [CLS]-attention-ranked pruning (FasterVLM, VisionZip, PruMerge) ranks something real.
2. symbolic: train the language model on the questions where each image token is a *symbol* embedding of the
   ground-truth content of its patch (sum of learned colour, shape, size, quadrant and centre embeddings) -
   pure text reasoning, fast. For the first ``--s2-objects-only`` share of the stage the background patches are
   left out (objects keep their positions), which halves the step and gets the LLM past the plateau of
   question-independent guesses sooner; the rest of the stage sees the full 144-patch layout.
3. align: train the projector (vision tower frozen) so each patch's projected feature lands on its symbol
   embedding (MSE + cosine).
4. end to end: fine-tune everything on the real task (images through the stock LLaVA path), keeping the
   auxiliary vision losses at a small weight so the patch features and [CLS] attention stay meaningful.

The recipe is :class:`TrainConfig` run by :func:`train_testbed`; the command lines (``vtcompress testbed train``,
``vtcompress testbed card``) are in :mod:`vtcompress.testbed.cli`.

The auxiliary heads and symbol tables are training-only; the shipped model is a stock
``LlavaForConditionalGeneration`` whose answers come from the LLM reading the image tokens.
Several question/answer pairs are packed after one image in training sequences (the first is always a
single-question prompt identical to inference) to get more supervision per image forward.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as D
from . import model as M

N_COL, N_SHP, N_SIZE, N_QUAD = len(D.COLOUR_NAMES) + 1, len(D.SHAPES) + 1, 3, len(D.QUADRANTS) + 1


# ----------------------------------------------------------------------------------------------- labels


def patch_labels(objects: list[dict]) -> dict[str, np.ndarray]:
    """Per-patch labels (each int64 (N_PATCHES,)): colour/shape/size/quad (0 = background), centre flag, obj id.

    A patch belongs to the object covering most of its pixels if that covers >= 20 % of it; the patch holding
    an object's centre pixel always belongs to it and carries centre=1 (so counting = counting centre patches).
    """
    g = D.GRID
    col = np.zeros(D.N_PATCHES, np.int64)
    shp = np.zeros_like(col)
    size = np.zeros_like(col)
    quad = np.zeros_like(col)
    cen = np.zeros_like(col)
    oid = np.full_like(col, -1)
    best = np.zeros(D.N_PATCHES, np.float64)
    for k, o in enumerate(objects):
        m = D._shape_mask(o["shape"], o["centre"][0], o["centre"][1], o["r"])
        cover = m.reshape(g, D.PATCH, g, D.PATCH).mean(axis=(1, 3)).reshape(-1)
        ci = int(min(g - 1, o["centre"][1] // D.PATCH)) * g + int(min(g - 1, o["centre"][0] // D.PATCH))
        take = (cover >= 0.2) & (cover > best)
        take[ci] = True
        cover = cover.copy()
        cover[ci] = 2.0  # the centre patch stays with this object
        best = np.where(take, cover, best)
        col[take] = D.COLOUR_NAMES.index(o["colour"]) + 1
        shp[take] = D.SHAPES.index(o["shape"]) + 1
        size[take] = D.SIZES.index(o["size"]) + 1
        quad[take] = D.QUADRANTS.index(D.quadrant_of(*o["centre"])) + 1
        oid[take] = k
    for k, o in enumerate(objects):
        ci = int(min(g - 1, o["centre"][1] // D.PATCH)) * g + int(min(g - 1, o["centre"][0] // D.PATCH))
        if oid[ci] == k:
            cen[ci] = 1
    return {"colour": col, "shape": shp, "size": size, "quad": quad, "centre": cen, "oid": oid}


def scene_labels(objects: list[dict]) -> dict[str, np.ndarray]:
    """[CLS] labels: presence (24,) of each colour-shape pair, shape counts (4,), colour counts (6,) clipped at 4."""
    pres = np.zeros(len(D.COLOUR_NAMES) * len(D.SHAPES), np.float32)
    sc = np.zeros(len(D.SHAPES), np.int64)
    cc = np.zeros(len(D.COLOUR_NAMES), np.int64)
    for o in objects:
        ci, si = D.COLOUR_NAMES.index(o["colour"]), D.SHAPES.index(o["shape"])
        pres[ci * len(D.SHAPES) + si] = 1
        sc[si] += 1
        cc[ci] += 1
    return {"presence": pres, "shape_count": np.minimum(sc, 4), "colour_count": np.minimum(cc, 4)}


# ----------------------------------------------------------------------------------------------- batches


class Batcher:
    """Draws training scenes from the train split seed range and builds tensors (deterministic given seed)."""

    # Each stream (a data-loader worker) draws from its own disjoint block of train seeds: 1M scenes per stream
    # (a stage draws ~100k), 49 streams before the next --seed's block.
    SEEDS_PER_STREAM = 1_000_000

    def __init__(self, tokenizer, seed: int, max_qa: int = 4, stream: int = 0):
        self.tok = tokenizer
        self.rng = np.random.default_rng([seed + 12345, stream]) if stream else np.random.default_rng(seed + 12345)
        self.next_seed = D.SPLIT_START["train"] + seed * 50_000_000 + stream * self.SEEDS_PER_STREAM
        self.max_qa = max_qa
        self.seed = seed
        self.next_stream = stream + 1  # the first stream batch_iter's workers may take
        self.prefix = tokenizer(
            M.build_prompt("").rsplit(" question :", 1)[0], add_special_tokens=False
        )["input_ids"]  # <s> preamble <image>*144
        self.img_id = tokenizer.convert_tokens_to_ids(M.IMAGE_TOKEN)

    def _extra_qas(self, objects, k):
        qs = D.all_questions(objects)
        by_skill: dict[str, list] = {}
        for q in qs:
            by_skill.setdefault(q[2], []).append(q)
        out = []
        for _ in range(k):
            sk = D.SKILLS[self.rng.integers(len(D.SKILLS))]
            cand = by_skill.get(sk)
            if not cand:
                continue
            if sk == "exists":  # balance yes / no among the many exists questions
                want = "yes" if self.rng.random() < 0.5 else "no"
                cand = [q for q in cand if q[1] == want] or cand
            out.append(cand[self.rng.integers(len(cand))])
        return out

    def draw(self, n: int, packed: bool = True, need_images: bool = True):
        smp = []
        for _ in range(n):
            smp.append(D.make_sample(self.next_seed))
            self.next_seed += 1
        ids, ans_pos, ans_ids = [], [], []
        for s in smp:
            qas = [(s.question, s.answer)]
            if packed and self.max_qa > 1:
                k = int(self.rng.integers(0, self.max_qa))
                qas += [(q, a) for q, a, _ in self._extra_qas(s.objects, k)]
            seq = list(self.prefix)
            pos, aid = [], []
            for q, a in qas:
                seq += self.tok(f"question : {q} answer :", add_special_tokens=False)["input_ids"]
                pos.append(len(seq) - 1)  # the position whose logits predict the answer
                aid.append(self.tok.convert_tokens_to_ids(a))
                seq.append(aid[-1])
            ids.append(seq)
            ans_pos.append(pos)
            ans_ids.append(aid)
        L = max(len(s) for s in ids)
        input_ids = torch.full((n, L), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, L), dtype=torch.long)
        rows, cols, tgt = [], [], []
        for b, (seq, pos, aid) in enumerate(zip(ids, ans_pos, ans_ids, strict=False)):
            off = L - len(seq)  # LEFT padding, as at inference
            input_ids[b, off:] = torch.tensor(seq)
            mask[b, off:] = 1
            for p, a in zip(pos, aid, strict=False):
                rows.append(b)
                cols.append(p + off)
                tgt.append(a)
        pl = [patch_labels(s.objects) for s in smp]
        sl = [scene_labels(s.objects) for s in smp]
        batch = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "ans_rows": torch.tensor(rows),
            "ans_cols": torch.tensor(cols),
            "ans_tgt": torch.tensor(tgt),
            "patch": {k: torch.from_numpy(np.stack([p[k] for p in pl])) for k in pl[0]},
            "scene": {k: torch.from_numpy(np.stack([p[k] for p in sl])) for k in sl[0]},
        }
        if need_images:
            batch["pixel_values"] = M.pixel_values_from_images([s.image for s in smp])
        return batch


class _BatchStream(torch.utils.data.IterableDataset):
    """Endless training batches of one kind; data-loader worker ``w`` draws from Batcher stream ``first + w``."""

    def __init__(self, tokenizer, seed: int, max_qa: int, first: int, n: int, packed: bool, need_images: bool):
        self.args = (tokenizer, seed, max_qa)
        self.first = first
        self.kind = (n, packed, need_images)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        torch.set_num_threads(1)  # generation is numpy; keep each worker to one core
        b = Batcher(*self.args, stream=self.first + info.id)
        while True:
            yield b.draw(*self.kind)


def batch_iter(batcher: Batcher, n: int, packed: bool, need_images: bool, workers: int = 0, device="cpu"):
    """Endless iterator of training batches (see :meth:`Batcher.draw`) moved to ``device``.

    ``workers=0`` draws in this process from ``batcher`` (the reproducible default on a CPU, where the model
    step dominates); ``workers > 0`` generates batches in that many background processes, each from its own
    disjoint seed stream (fresh streams on every call, so stages never repeat each other's scenes), so an
    accelerator is not left waiting on numpy rendering.
    """
    if workers:
        first = batcher.next_stream
        batcher.next_stream += workers
        if batcher.next_stream * Batcher.SEEDS_PER_STREAM > 50_000_000:
            raise ValueError(f"batch_iter: {batcher.next_stream} streams would reach the next --seed's train seeds")
        tok, seed, max_qa = batcher.tok, batcher.seed, batcher.max_qa
        loader = torch.utils.data.DataLoader(_BatchStream(tok, seed, max_qa, first, n, packed, need_images),
                                             batch_size=None, num_workers=workers, prefetch_factor=4)
        for b in loader:
            yield _to_device(b, device)
    else:
        while True:
            yield _to_device(batcher.draw(n, packed, need_images), device)


def _to_device(x, device):
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x


# ----------------------------------------------------------------------------------------------- aux modules


class VisionHeads(nn.Module):
    """Training-only linear probes on the vision features (never shipped)."""

    def __init__(self, d: int):
        super().__init__()
        self.patch = nn.ModuleDict(
            {
                "colour": nn.Linear(d, N_COL),
                "shape": nn.Linear(d, N_SHP),
                "size": nn.Linear(d, N_SIZE),
                "quad": nn.Linear(d, N_QUAD),
                "centre": nn.Linear(d, 2),
                "row": nn.Linear(d, D.GRID),
                "col": nn.Linear(d, D.GRID),
            }
        )
        n_pairs = len(D.COLOUR_NAMES) * len(D.SHAPES)
        self.cls = nn.ModuleDict(
            {
                "presence": nn.Linear(d, n_pairs),
                "shape_count": nn.Linear(d, len(D.SHAPES) * 5),
                "colour_count": nn.Linear(d, len(D.COLOUR_NAMES) * 5),
            }
        )
        self.cls_pooled = nn.ModuleDict(
            {
                "presence": nn.Linear(d, n_pairs),
                "shape_count": nn.Linear(d, len(D.SHAPES) * 5),
                "colour_count": nn.Linear(d, len(D.COLOUR_NAMES) * 5),
            }
        )


class SymbolTable(nn.Module):
    """Training-only symbol embeddings: one (text_hidden,) vector per patch from its ground-truth labels."""

    def __init__(self, d: int):
        super().__init__()
        self.colour = nn.Embedding(N_COL, d)
        self.shape = nn.Embedding(N_SHP, d)
        self.size = nn.Embedding(N_SIZE, d)
        self.quad = nn.Embedding(N_QUAD, d)
        self.centre = nn.Embedding(2, d)
        for e in (self.colour, self.shape, self.size, self.quad, self.centre):
            nn.init.normal_(e.weight, std=0.5)

    def forward(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """p: patch label dict of (B, N) ints -> (B, N, d)."""
        return (
            self.colour(p["colour"]) + self.shape(p["shape"]) + self.size(p["size"]) + self.quad(p["quad"])
            + self.centre(p["centre"])
        )


def vision_aux_loss(model, heads: VisionHeads, batch, need_attn: bool):
    """Auxiliary vision losses; returns (loss, metrics dict, patch features (B, N, d) from layer -2)."""
    vt = model.model.vision_tower
    out = vt(batch["pixel_values"], output_hidden_states=True, output_attentions=need_attn)
    h = out.hidden_states[model.config.vision_feature_layer]  # (B, 1+N, d)
    feats = h[:, 1:]
    p = batch["patch"]
    B, N, _ = feats.shape
    ridx = torch.arange(N, device=feats.device) // D.GRID
    cidx = torch.arange(N, device=feats.device) % D.GRID
    tg = dict(p)
    tg["row"] = ridx.expand(B, N)
    tg["col"] = cidx.expand(B, N)
    loss = 0.0
    met = {}
    obj = p["colour"] > 0
    for k, head in heads.patch.items():
        logit = head(feats)
        t = tg[k]
        ce = F.cross_entropy(logit.reshape(B * N, -1), t.reshape(-1), reduction="none").reshape(B, N)
        # Object patches are rare (~10 %): up-weight them so features separate objects sharply.
        w = 1.0 + 4.0 * obj.float()
        loss = loss + (ce * w).sum() / w.sum()
        if k in ("colour", "shape", "centre"):
            met[f"p_{k}"] = float((logit.argmax(-1) == t).float()[obj].mean())
    s = batch["scene"]
    for name, cls_vec, hd in (("l2", h[:, 0], heads.cls), ("pool", out.pooler_output, heads.cls_pooled)):
        loss = loss + F.binary_cross_entropy_with_logits(hd["presence"](cls_vec), s["presence"])
        loss = loss + F.cross_entropy(hd["shape_count"](cls_vec).reshape(-1, 5), s["shape_count"].reshape(-1))
        loss = loss + F.cross_entropy(hd["colour_count"](cls_vec).reshape(-1, 5), s["colour_count"].reshape(-1))
        if name == "l2":
            met["cls_count"] = float(
                (hd["shape_count"](cls_vec).reshape(B, -1, 5).argmax(-1) == s["shape_count"]).float().mean()
            )
    if need_attn:
        # [CLS] attention (head mean) of the layer that produces the LLaVA features: put its mass on objects.
        att = out.attentions[model.config.vision_feature_layer][:, :, 0, 1:].mean(1)  # (B, N)
        mass = (att * obj.float()).sum(-1).clamp_min(1e-6)
        loss = loss + 0.3 * (-mass.log()).mean()
        met["cls_obj_mass"] = float(mass.detach().mean())
    return loss, met, feats


def lm_answer_loss(model, embeds, batch, position_ids=None):
    """CE of the answer tokens given input embeddings (B, L, d); returns (loss, accuracy)."""
    h = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                   position_ids=position_ids).last_hidden_state
    hs = h[batch["ans_rows"], batch["ans_cols"]]  # (n_answers, d): only the positions we supervise
    logits = model.lm_head(hs)
    loss = F.cross_entropy(logits, batch["ans_tgt"])
    acc = float((logits.argmax(-1) == batch["ans_tgt"]).float().mean())
    return loss, acc


def drop_background(batch, embeds: torch.Tensor, image_token_id: int):
    """Keep the text and the object patches of each sequence, dropping background image tokens.

    embeds (B, L, d) -> (embeds (B, L', d), batch with attention_mask (B, L') and ans_cols remapped,
    position_ids (B, L')). Kept tokens keep their positions in the full layout (``arange(L)``, as the LLM
    numbers the full left-padded sequence), so what is learned on the short sequence transfers to the full
    one. Background patches all carry one shared symbol; without them a symbolic step is ~2x cheaper and the
    LLM's question-to-patch retrieval forms sooner (stage 2).
    """
    ids, am = batch["input_ids"], batch["attention_mask"].bool()
    img = ids == image_token_id
    obj = torch.zeros_like(img)
    obj[img] = (batch["patch"]["colour"] > 0).reshape(-1)
    keep = (~img | obj) & am
    B, L = ids.shape
    n = int(keep.sum(1).max())
    # Stable sort puts each row's dropped tokens first and its kept ones last, in order: left padding again.
    idx = torch.argsort(keep.int(), dim=1, stable=True)[:, L - n:]
    new_col = torch.full((B, L), -1, dtype=torch.long, device=ids.device)
    new_col.scatter_(1, idx, torch.arange(n, device=ids.device).expand(B, n).contiguous())
    out = dict(batch)
    out["attention_mask"] = keep.long().gather(1, idx)
    out["ans_cols"] = new_col[batch["ans_rows"], batch["ans_cols"]]
    pos = torch.arange(L, device=ids.device).expand(B, L).gather(1, idx)
    return embeds.gather(1, idx[..., None].expand(-1, -1, embeds.shape[-1])), out, pos


def image_embeds(model, batch, image_feats: torch.Tensor) -> torch.Tensor:
    """Token embeddings (B, L, d) with the image placeholders replaced by image_feats (B, N, d)."""
    emb = model.model.language_model.embed_tokens(batch["input_ids"])
    m = batch["input_ids"] == model.config.image_token_id
    emb = emb.masked_scatter(m.unsqueeze(-1), image_feats.to(emb.dtype))
    return emb


# ----------------------------------------------------------------------------------------------- loop


class Stage:
    """Runs an optimisation stage for at most ``steps`` steps or ``minutes`` minutes (cosine lr on progress)."""

    def __init__(self, name, params, lr, steps, minutes, log, warmup=50):
        self.name, self.lr, self.steps, self.minutes, self.log = name, lr, steps, minutes, log
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.t0 = time.time()
        self.step = 0
        self.warmup = warmup

    def progress(self) -> float:
        if self.steps:
            return self.step / self.steps
        return (time.time() - self.t0) / (60 * self.minutes) if self.minutes else 1.0

    def done(self) -> bool:
        return self.progress() >= 1.0

    def update(self, loss):
        f = min(1.0, self.progress())
        lr = self.lr * min(1.0, (self.step + 1) / self.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * f)))
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.step += 1
        return lr


def _pbar(name, st):
    from tqdm import tqdm

    total = st.steps if st.steps else None
    return tqdm(total=total, desc=name, mininterval=5.0, dynamic_ncols=True)


def run_stage(name, st: Stage, step_fn, curve: list, log_every: int = 20):
    bar = _pbar(name, st)
    ema: dict[str, float] = {}
    while not st.done():
        loss, met = step_fn()
        lr = st.update(loss)
        met["loss"] = float(loss.detach())
        for k, v in met.items():
            ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
        bar.update(1)
        if st.step % log_every == 0:
            rec = {"stage": name, "step": st.step, "time_s": round(time.time() - st.t0, 1), "lr": lr}
            rec.update({k: round(v, 4) for k, v in ema.items()})
            curve.append(rec)
            bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items()})
    bar.close()
    return ema


@dataclass
class TrainConfig:
    """The testbed recipe (``vtcompress testbed train``'s options; the defaults are the shipped run).

    Stage ``i`` (1-4) runs ``steps[i - 1]`` steps when > 0, else ``minutes[i - 1]`` minutes, at learning rate
    ``lr[i - 1]``; ``stages`` names the stages to run (``"1234"``); ``s2_objects_only`` is the share of stage 2
    trained without background patches (:func:`drop_background`); ``init`` starts from a saved testbed directory.
    """

    out: str = str(M.WEIGHTS_DIR)
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    workers: int = 0  # background processes generating batches (0: in-process, the reproducible CPU default)
    batch: int = 32
    max_qa: int = 4  # question/answer pairs packed per training image
    minutes: tuple[float, float, float, float] = (25.0, 22.0, 3.0, 35.0)
    steps: tuple[int, int, int, int] = (0, 0, 0, 0)
    lr: tuple[float, float, float, float] = (2e-3, 1e-3, 2e-3, 3e-4)
    s2_objects_only: float = 0.75
    init: str | None = None
    stages: str = "1234"
    eval_n: int = 500


def train_testbed(cfg: TrainConfig) -> dict:
    """Train the testbed in stages (see the module docstring), save it to ``cfg.out`` (weights, tokenizer,
    ``aux_state.pt``, ``training_log.json``) and return the recipe: options, steps done, minutes, final
    validation accuracy."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    tok = M.build_tokenizer()
    if cfg.init:
        model, tok = M.load_testbed(cfg.init)
        model.train()
        aux_path = Path(cfg.init) / "aux_state.pt"
        aux = torch.load(aux_path, map_location="cpu") if aux_path.exists() else None
    else:
        model = M.build_model(tok, seed=cfg.seed)
        aux = None
    model.train()
    dv = model.config.vision_config.hidden_size
    dt = model.config.text_config.hidden_size
    heads = VisionHeads(dv)
    symbols = SymbolTable(dt)
    if aux is not None:
        heads.load_state_dict(aux["heads"])
        symbols.load_state_dict(aux["symbols"])
    dev = torch.device(cfg.device)
    model.to(dev)
    heads.to(dev)
    symbols.to(dev)
    batcher = Batcher(tok, cfg.seed, cfg.max_qa)

    def batches(packed: bool, need_images: bool = True):
        return batch_iter(batcher, cfg.batch, packed, need_images, cfg.workers, dev)
    val = D.samples("val", cfg.eval_n, seed=0)
    curve: list[dict] = []
    evals: dict[str, dict] = {}
    vt = model.model.vision_tower
    proj = model.model.multi_modal_projector
    lm = model.model.language_model

    def evaluate_now(tag):
        model.eval()
        r = M.evaluate(model, tok, val, batch_size=100)
        model.train()
        evals[tag] = {"accuracy": r["accuracy"], "per_skill": r["per_skill"]}
        curve.append({"stage": tag, "eval_val_accuracy": r["accuracy"], "per_skill": r["per_skill"],
                      "time_s": round(time.time() - t_start, 1)})
        print(f"[{tag}] val accuracy {r['accuracy']:.4f} {json.dumps(r['per_skill'])}", flush=True)
        return r

    def set_trainable(mods):
        for p in model.parameters():
            p.requires_grad_(False)
        for mod in mods:
            for p in mod.parameters():
                p.requires_grad_(True)

    steps_done = {}
    if "1" in cfg.stages:
        vt.set_attn_implementation("eager")  # [CLS] attention is supervised in this stage
        set_trainable([vt])
        st = Stage("s1_vision", list(vt.parameters()) + list(heads.parameters()), cfg.lr[0], cfg.steps[0],
                   cfg.minutes[0], curve)

        it = batches(packed=False)

        def s1():
            b = next(it)
            loss, met, _ = vision_aux_loss(model, heads, b, need_attn=True)
            return loss, met

        run_stage("s1_vision", st, s1, curve)
        steps_done["s1"] = st.step
        vt.set_attn_implementation("sdpa")

    if "2" in cfg.stages:
        set_trainable([lm, model.lm_head])
        st = Stage("s2_symbolic", list(lm.parameters()) + list(model.lm_head.parameters()) + list(symbols.parameters()),
                   cfg.lr[1], cfg.steps[1], cfg.minutes[1], curve)

        it = batches(packed=True, need_images=False)

        def s2():
            b = next(it)
            emb = image_embeds(model, b, symbols(b["patch"]))
            if st.progress() < cfg.s2_objects_only:
                emb, b, pos = drop_background(b, emb, model.config.image_token_id)
                loss, acc = lm_answer_loss(model, emb, b, pos)
            else:  # then the full layout, background patches included, as at inference
                loss, acc = lm_answer_loss(model, emb, b)
            return loss, {"acc": acc}

        run_stage("s2_symbolic", st, s2, curve)
        steps_done["s2"] = st.step

    if "3" in cfg.stages:
        set_trainable([proj])
        st = Stage("s3_align", list(proj.parameters()), cfg.lr[2], cfg.steps[2], cfg.minutes[2], curve)

        it = batches(packed=False)

        def s3():
            b = next(it)
            with torch.no_grad():
                out_v = vt(b["pixel_values"], output_hidden_states=True)
                feats = out_v.hidden_states[model.config.vision_feature_layer][:, 1:]
                target = symbols(b["patch"])
            pr = proj(feats)
            mse = F.mse_loss(pr, target)
            cos = 1 - F.cosine_similarity(pr, target, dim=-1).mean()
            return mse + cos, {"mse": float(mse.detach()), "cos": float(1 - cos.detach())}

        run_stage("s3_align", st, s3, curve)
        steps_done["s3"] = st.step
        evaluate_now("after_s3")

    if "4" in cfg.stages:
        set_trainable([model])
        vt.set_attn_implementation("eager")
        groups = [
            {"params": list(vt.parameters()) + list(heads.parameters()), "lr": cfg.lr[3]},
            {"params": list(proj.parameters()), "lr": cfg.lr[3]},
            {"params": list(lm.parameters()) + list(model.lm_head.parameters()), "lr": cfg.lr[3]},
        ]
        st = Stage("s4_e2e", groups, cfg.lr[3], cfg.steps[3], cfg.minutes[3], curve)
        last_eval = [time.time()]

        it = batches(packed=True)

        def s4():
            b = next(it)
            aux_loss, met, feats = vision_aux_loss(model, heads, b, need_attn=True)
            emb = image_embeds(model, b, proj(feats))
            loss, acc = lm_answer_loss(model, emb, b)
            met["acc"] = acc
            if time.time() - last_eval[0] > 600:
                evaluate_now(f"s4_step{st.step}")
                last_eval[0] = time.time()
            return loss + 0.1 * aux_loss, met

        run_stage("s4_e2e", st, s4, curve)
        steps_done["s4"] = st.step
        vt.set_attn_implementation("sdpa")

    model.eval()
    final = evaluate_now("final_val")
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    torch.save({"heads": heads.state_dict(), "symbols": symbols.state_dict()}, out / "aux_state.pt")
    n_params = sum(p.numel() for p in model.parameters())
    recipe = {
        "args": json.loads(json.dumps(dataclasses.asdict(cfg))),  # as training_log.json stores it (lists)
        "steps_done": steps_done,
        "train_minutes": round((time.time() - t_start) / 60, 2),
        "parameters": n_params,
        "final_val": {"accuracy": final["accuracy"], "per_skill": final["per_skill"], "n": len(val)},
        "evals": evals,
    }
    (out / "training_log.json").write_text(json.dumps({"recipe": recipe, "curve": curve}, indent=1))
    return recipe





def write_card(path: str | Path, n_test: int = 2000, n_slice: int = 128, command: str | None = None) -> dict:
    """Evaluate the testbed saved in ``path`` and write its ``card.json``.

    The card states the test accuracy (overall and per skill) on the first ``n_test`` test questions and on
    the first ``n_slice`` (the slice the test suite re-checks), the training recipe from
    ``training_log.json`` when present, and the command that trained it.
    """
    path = Path(path)
    model, tok = M.load_testbed(path)
    log = path / "training_log.json"
    recipe = json.loads(log.read_text())["recipe"] if log.exists() else None
    old = path / "card.json"
    if command is None and old.exists():
        command = json.loads(old.read_text()).get("command")
    test = M.evaluate(model, tok, D.samples("test", n_test), batch_size=100)
    part = M.evaluate(model, tok, D.samples("test", n_slice), batch_size=64)
    vc = model.config.vision_config
    card = {
        "model": "LlavaForConditionalGeneration (CLIP vision tower with [CLS], 2-layer MLP projector, Llama LM)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "image": {"size": vc.image_size, "patch": vc.patch_size, "grid": [D.GRID, D.GRID],
                  "image_tokens": D.N_PATCHES},
        "recipe": recipe,
        "test": {"n": n_test, "accuracy": test["accuracy"], "per_skill": test["per_skill"]},
        f"test_slice_{n_slice}": {"n": n_slice, "accuracy": part["accuracy"], "per_skill": part["per_skill"]},
        "command": command,
    }
    old.write_text(json.dumps(card, indent=1))
    return card
