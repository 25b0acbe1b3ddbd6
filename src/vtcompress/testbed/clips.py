"""Procedural video clips for the testbed's video model (``vtcompress.testbed.clip_model``).

Every clip is ``frames`` (default 8, any ``T >= 4``) RGB frames of ``IMAGE_SIZE`` px over ONE static textured
background; a few coloured shapes move, appear, disappear or change colour. A templated question has a ONE-word
answer (one token of the clip tokenizer). Skills (:data:`CLIP_SKILLS`):

- ``direction``: which way does the <colour> <shape> move (left / right / up / down);
- ``order``: which appears first, the <c1> <s1> or the <c2> <s2> (answer: its colour);
- ``appeared``: what colour / shape is the object that appears;
- ``disappeared``: what colour is the object that disappears;
- ``colour_change``: what colour does the <shape> become;
- ``count_time``: how many objects appear during the clip (zero .. four);
- ``static_attribute``: colour / shape of the one object that never moves (the others all move).

Each object keeps its colour tint and pixel noise for the whole clip (noise fixed to the image grid, as in
:func:`vtcompress.testbed.data.make_clip`), so a patch changes between frames only where something happens.
Everything is deterministic from an integer seed; the splits use disjoint seed ranges (``CLIP_SPLIT_START``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import data as D

DIRECTIONS = ["left", "right", "up", "down"]
_DIR_VEC = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
CLIP_SKILLS = ["direction", "order", "appeared", "disappeared", "colour_change", "count_time", "static_attribute"]
# Every answer word of the clips (each a single token of the clip tokenizer).
CLIP_ANSWER_WORDS: list[str] = D.COLOUR_NAMES + D.SHAPES + D.COUNT_WORDS + DIRECTIONS
CLIP_PREAMBLE = "you are a careful visual assistant . look at the video and answer the question with one word ."
# Words the clip prompts add to the image testbed's vocabulary.
NEW_WORDS = sorted(set(DIRECTIONS) | set(
    "which way does move appears first or that disappears become appear during clip never moves video objects".split()))

CLIP_RADIUS = (7.5, 11.0)  # objects are large-ish: a pooled video token covers 16 x 16 px
MAX_FRAMES = 64
# Disjoint from each other and from the image testbed's ranges (data.SPLIT_START).
CLIP_SPLIT_START = {"train": 500_000_000, "val": 2_500_000_000, "test": 3_500_000_000}


@dataclass
class ClipSample:
    """One clip question. frames: ``T`` uint8 arrays (H, W, 3); objects: per frame, the visible objects (dicts
    with id, shape, colour, size, r, centre (cx, cy), box (x0, y0, x1, y1))."""

    frames: list[np.ndarray]
    question: str
    answer: str
    skill: str
    objects: list[list[dict]] = field(default_factory=list)
    seed: int = -1


# ----------------------------------------------------------------------------------------------- tracks


def _track(shape, colour, T, motion="static", disp=0.0, on=0, off=None, change=None, r=None, rng=None):
    return {"shape": shape, "colour": colour, "motion": motion, "disp": disp, "on": on,
            "off": T if off is None else off, "change": change,
            "r": r if r is not None else float(rng.uniform(*CLIP_RADIUS))}


def _lay_out(tracks: list[dict], T: int, rng) -> bool:
    """Choose start centres so every object stays inside the frame and visible objects never overlap."""
    S = D.IMAGE_SIZE
    for _ in range(300):
        ok = True
        for tr in tracks:
            r = tr["r"]
            vx, vy = _DIR_VEC.get(tr["motion"], (0.0, 0.0))
            dx, dy = vx * tr["disp"], vy * tr["disp"]
            lo_x, hi_x = r + 1 - min(0.0, dx), S - r - 1 - max(0.0, dx)
            lo_y, hi_y = r + 1 - min(0.0, dy), S - r - 1 - max(0.0, dy)
            if lo_x >= hi_x or lo_y >= hi_y:
                return False
            x0, y0 = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
            f = np.arange(T) / max(1, T - 1)
            tr["cx"], tr["cy"] = x0 + dx * f, y0 + dy * f
        for i in range(len(tracks)):
            for j in range(i):
                a, b = tracks[i], tracks[j]
                vis = np.zeros(T, bool)
                vis[max(a["on"], b["on"]):min(a["off"], b["off"])] = True
                if vis.any():
                    d = np.hypot(a["cx"] - b["cx"], a["cy"] - b["cy"])[vis]
                    if d.min() <= a["r"] + b["r"] + 2.5:
                        ok = False
                        break
            if not ok:
                break
        if ok:
            return True
    return False


def _colour_at(tr, t):
    if tr["change"] is not None and t >= tr["change"][0]:
        return tr["change"][1]
    return tr["colour"]


def _rand_cs(rng, not_pair=(), not_colour=(), not_shape=()):
    for _ in range(200):
        c = D.COLOUR_NAMES[int(rng.integers(len(D.COLOUR_NAMES)))]
        s = D.SHAPES[int(rng.integers(len(D.SHAPES)))]
        if (c, s) in not_pair or c in not_colour or s in not_shape:
            continue
        return c, s
    raise RuntimeError("no colour/shape satisfies the constraints")


def _moving(rng, T):
    return DIRECTIONS[int(rng.integers(4))], float(rng.uniform(30.0, 52.0))


def _scene(skill: str, T: int, rng) -> tuple[list[dict], str, str]:
    """Tracks and (question, answer) of one skill; the answer is drawn uniformly."""
    events = np.arange(1, T)  # frames at which something can happen
    tr: list[dict] = []

    def distractor(moving_p=0.3, **kw):
        c, s = _rand_cs(rng, **kw)
        if rng.random() < moving_p:
            m, d = _moving(rng, T)
            return _track(s, c, T, m, d, rng=rng)
        return _track(s, c, T, rng=rng)

    if skill == "direction":
        c, s = _rand_cs(rng)
        m, d = _moving(rng, T)
        tr.append(_track(s, c, T, m, d, rng=rng))
        tr += [distractor(0.5, not_pair=((c, s),)) for _ in range(int(rng.integers(1, 4)))]
        q, a = f"which way does the {c} {s} move ?", m
    elif skill == "order":
        (c1, s1), = [_rand_cs(rng)]
        c2, s2 = _rand_cs(rng, not_colour=(c1,))
        t1, t2 = sorted(int(x) for x in rng.choice(events, 2, replace=False))
        tr += [_track(s1, c1, T, on=t1, rng=rng), _track(s2, c2, T, on=t2, rng=rng)]
        tr += [distractor(not_pair=((c1, s1), (c2, s2))) for _ in range(int(rng.integers(0, 3)))]
        named = [(c1, s1), (c2, s2)] if rng.random() < 0.5 else [(c2, s2), (c1, s1)]
        q = f"which appears first the {named[0][0]} {named[0][1]} or the {named[1][0]} {named[1][1]} ?"
        a = c1
    elif skill == "appeared":
        c, s = _rand_cs(rng)
        tr.append(_track(s, c, T, on=int(rng.choice(events)), rng=rng))
        tr += [distractor() for _ in range(int(rng.integers(1, 4)))]
        if rng.random() < 0.5:
            q, a = "what colour is the object that appears ?", c
        else:
            q, a = "what shape is the object that appears ?", s
    elif skill == "disappeared":
        c, s = _rand_cs(rng)
        tr.append(_track(s, c, T, off=int(rng.choice(events)), rng=rng))
        tr += [distractor() for _ in range(int(rng.integers(1, 4)))]
        q, a = "what colour is the object that disappears ?", c
    elif skill == "colour_change":
        c, s = _rand_cs(rng)
        c_new = _rand_cs(rng, not_colour=(c,))[0]
        tr.append(_track(s, c, T, change=(int(rng.choice(events)), c_new), rng=rng))
        tr += [distractor(not_shape=(s,)) for _ in range(int(rng.integers(1, 4)))]
        q, a = f"what colour does the {s} become ?", c_new
    elif skill == "count_time":
        n = int(rng.integers(0, len(D.COUNT_WORDS)))
        for _ in range(n):
            c, s = _rand_cs(rng)
            tr.append(_track(s, c, T, on=int(rng.choice(events)), rng=rng))
        tr += [distractor() for _ in range(int(rng.integers(1, 3)))]
        q, a = "how many objects appear during the clip ?", D.COUNT_WORDS[n]
    elif skill == "static_attribute":
        c, s = _rand_cs(rng)
        tr.append(_track(s, c, T, rng=rng))
        for _ in range(int(rng.integers(2, 4))):
            c2, s2 = _rand_cs(rng)
            m, d = _moving(rng, T)
            tr.append(_track(s2, c2, T, m, d, rng=rng))
        if rng.random() < 0.5:
            q, a = "what colour is the object that never moves ?", c
        else:
            q, a = "what shape is the object that never moves ?", s
    else:
        raise ValueError(f"unknown clip skill {skill!r}; valid: {', '.join(CLIP_SKILLS)}")
    return tr, q, a


def _render(tracks, T, rng) -> tuple[list[np.ndarray], list[list[dict]]]:
    background = D._background(rng)
    for tr in tracks:
        tr["noise"] = rng.normal(0, 6, size=background.shape)
        cols = [tr["colour"]] + ([tr["change"][1]] if tr["change"] else [])  # a list: draws in a fixed order
        tr["tint"] = {c: rng.normal(0, 10, size=3) for c in cols}
    frames, objects = [], []
    for t in range(T):
        img = background.copy()
        vis = []
        for k, tr in enumerate(tracks):
            if not tr["on"] <= t < tr["off"]:
                continue
            cx, cy, r = float(tr["cx"][t]), float(tr["cy"][t]), tr["r"]
            col = _colour_at(tr, t)
            m = D._shape_mask(tr["shape"], cx, cy, r)
            img[m] = (np.array(D.COLOURS[col], dtype=np.float64) + tr["tint"][col])[None, :] + tr["noise"][m]
            vis.append({"id": k, "shape": tr["shape"], "colour": col, "size": "large", "r": r, "centre": (cx, cy),
                        "box": (int(max(0, np.floor(cx - r))), int(max(0, np.floor(cy - r))),
                                int(min(D.IMAGE_SIZE, np.ceil(cx + r))), int(min(D.IMAGE_SIZE, np.ceil(cy + r))))})
        frames.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
        objects.append(vis)
    return frames, objects


def make_clip_sample(seed: int, frames: int = 8, skill: str | None = None) -> ClipSample:
    """The clip question of one integer seed (``frames`` frames; the skill is drawn from the seed unless given)."""
    if isinstance(frames, bool) or not isinstance(frames, int) or not 4 <= frames <= MAX_FRAMES:
        raise ValueError(f"frames must be an int in [4, {MAX_FRAMES}]; got {frames!r}")
    rng = np.random.default_rng([seed, frames])
    skill = skill or CLIP_SKILLS[int(rng.integers(len(CLIP_SKILLS)))]
    if skill not in CLIP_SKILLS:
        raise ValueError(f"unknown clip skill {skill!r}; valid: {', '.join(CLIP_SKILLS)}")
    for _ in range(200):
        tracks, q, a = _scene(skill, frames, rng)
        order = rng.permutation(len(tracks))  # the target is not always laid out first
        tracks = [tracks[i] for i in order]
        if _lay_out(tracks, frames, rng):
            break
    else:
        raise RuntimeError(f"could not lay out clip for seed {seed}")
    fr, objs = _render(tracks, frames, rng)
    return ClipSample(frames=fr, question=q, answer=a, skill=skill, objects=objs, seed=seed)


def clip_seed(split: str, i: int, seed: int = 0) -> int:
    if i >= D.SPLIT_SEEDS_PER_RUN:
        raise ValueError("at most 10**6 clips per (split, seed)")
    return CLIP_SPLIT_START[split] + seed * D.SPLIT_SEEDS_PER_RUN + i


def clip_samples(split: str, n: int, frames: int = 8, seed: int = 0, skill: str | None = None) -> list[ClipSample]:
    """``n`` deterministic clips of a split ("train", "val" or "test"); skills cycle so each gets n / 7."""
    return [make_clip_sample(clip_seed(split, i, seed), frames, skill or CLIP_SKILLS[i % len(CLIP_SKILLS)])
            for i in range(n)]


def clip_vocabulary() -> list[str]:
    """Words the clip prompts use beyond the image testbed's vocabulary."""
    return [w for w in NEW_WORDS if w not in set(D.vocabulary())]


# ----------------------------------------------------------------------------------------------- extra QA


def clip_questions(objects: list[list[dict]]) -> list[tuple[str, str, str]]:
    """Every (question, answer, skill) the clip templates can ask unambiguously about a clip, derived from its
    per-frame objects alone (training packs several per clip; the tests check each sample's answer with it)."""
    T = len(objects)
    tracks: dict[int, dict] = {}
    for t, objs in enumerate(objects):
        for o in objs:
            tr = tracks.setdefault(o["id"], {"shape": o["shape"], "frames": [], "colours": [], "centres": []})
            tr["frames"].append(t)
            tr["colours"].append(o["colour"])
            tr["centres"].append(o["centre"])
    for tr in tracks.values():
        (x0, y0), (x1, y1) = tr["centres"][0], tr["centres"][-1]
        dx, dy = x1 - x0, y1 - y0
        tr["moves"] = max(abs(dx), abs(dy)) > 10.0
        tr["static"] = max(abs(dx), abs(dy)) < 1e-6
        tr["dir"] = ((("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up"))
                     if tr["moves"] else None)
        tr["first"], tr["last"] = tr["frames"][0], tr["frames"][-1]
        tr["colour"] = tr["colours"][0] if len(set(tr["colours"])) == 1 else None
    trs = list(tracks.values())
    pairs = [(c, tr["shape"]) for tr in trs for c in set(tr["colours"])]
    qs: list[tuple[str, str, str]] = []
    for tr in trs:
        c, s = tr["colour"], tr["shape"]
        if tr["dir"] and c is not None and pairs.count((c, s)) == 1 and len(tr["frames"]) == T:
            qs.append((f"which way does the {c} {s} move ?", tr["dir"], "direction"))
    appear = [tr for tr in trs if tr["first"] > 0]
    if len(appear) < len(D.COUNT_WORDS):
        qs.append(("how many objects appear during the clip ?", D.COUNT_WORDS[len(appear)], "count_time"))
    if len(appear) == 1 and appear[0]["colour"] is not None:
        qs.append(("what colour is the object that appears ?", appear[0]["colour"], "appeared"))
        qs.append(("what shape is the object that appears ?", appear[0]["shape"], "appeared"))
    gone = [tr for tr in trs if tr["last"] < T - 1]
    if len(gone) == 1 and gone[0]["colour"] is not None:
        qs.append(("what colour is the object that disappears ?", gone[0]["colour"], "disappeared"))
    shapes = [tr["shape"] for tr in trs]
    for tr in trs:
        if tr["colour"] is None and len(set(tr["colours"])) == 2 and shapes.count(tr["shape"]) == 1:
            qs.append((f"what colour does the {tr['shape']} become ?", tr["colours"][-1], "colour_change"))
    static = [tr for tr in trs if tr["static"]]
    if len(static) == 1 and all(tr["moves"] for tr in trs if tr is not static[0]) and len(trs) >= 3:
        if static[0]["colour"] is not None:
            qs.append(("what colour is the object that never moves ?", static[0]["colour"], "static_attribute"))
        qs.append(("what shape is the object that never moves ?", static[0]["shape"], "static_attribute"))
    late = [tr for tr in appear if tr["colour"] is not None and pairs.count((tr["colour"], tr["shape"])) == 1]
    for i, a in enumerate(late):
        for b in late[i + 1:]:
            if a["first"] != b["first"] and a["colour"] != b["colour"]:
                first = a if a["first"] < b["first"] else b
                for p, q in ((a, b), (b, a)):
                    named = f"the {p['colour']} {p['shape']} or the {q['colour']} {q['shape']}"
                    qs.append((f"which appears first {named} ?", first["colour"], "order"))
    return qs
