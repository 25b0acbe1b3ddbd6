"""Procedural visual questions for the embedded testbed VLM.

Every sample is a small RGB image (``IMAGE_SIZE`` x ``IMAGE_SIZE`` px, a ``GRID`` x ``GRID`` grid of
``PATCH`` px patches) with a few coloured shapes on a textured background, and a templated question whose
answer is ONE word (one token of the testbed tokenizer). The skills stress token compression differently:

- ``attribute``: colour or shape of a uniquely named object (needs that object's tokens);
- ``exists``: is there a <colour> <shape>? (binding colour and shape; near-miss distractors);
- ``count``: how many <shape>s / <colour> objects (needs every object's tokens);
- ``position``: which quadrant holds the named object (needs token positions);
- ``small``: colour / shape of the one small object of a kind (pooling and merging blur it).

Everything is generated on the fly from an integer seed: the same seed gives the same image bytes and
question. Splits use disjoint seed ranges (see ``SPLIT_START``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 96
PATCH = 8
GRID = IMAGE_SIZE // PATCH  # 12 -> 144 patches
N_PATCHES = GRID * GRID

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 200),
    "orange": (245, 140, 30),
}
COLOUR_NAMES = list(COLOURS)
SHAPES = ["circle", "square", "triangle", "cross"]
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES = ["small", "large"]
QUADRANTS = ["topleft", "topright", "bottomleft", "bottomright"]
COUNT_WORDS = ["zero", "one", "two", "three", "four"]
YES_NO = ["yes", "no"]
SKILLS = ["attribute", "exists", "count", "position", "small"]

# Every answer word; each is a single token of the testbed tokenizer.
ANSWER_WORDS: list[str] = COLOUR_NAMES + SHAPES + YES_NO + COUNT_WORDS + QUADRANTS

# A system-style preamble (18 words) so decoder-stage pruning is not flattered by a tiny prompt.
PREAMBLE = "you are a careful visual assistant . look at the image and answer the question with one word ."

# Radii (half-extent, px) of small and large objects: small ones cover ~2x2 patches, large ones ~3x3 to 4x4.
RADIUS = {"small": (5.0, 6.5), "large": (10.0, 13.0)}
MAX_OBJECTS = 6
# Objects asked about in position questions keep their centre this far (px) from the image midlines.
MIDLINE_MARGIN = 7.0

# Disjoint seed ranges per split; sample i of samples(split, n, seed) uses SPLIT_START[split] + seed * 10**6 + i.
SPLIT_START = {"train": 0, "val": 2_000_000_000, "test": 3_000_000_000}
SPLIT_SEEDS_PER_RUN = 10**6


@dataclass
class Sample:
    """One visual question.

    image: uint8 array (IMAGE_SIZE, IMAGE_SIZE, 3); objects: dicts with shape, colour, size and box
    (x0, y0, x1, y1) in pixels (inclusive-exclusive) plus centre (cx, cy).
    """

    image: np.ndarray
    question: str
    answer: str
    skill: str
    objects: list[dict] = field(default_factory=list)
    seed: int = -1


# ----------------------------------------------------------------------------------------------- drawing


def _shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean mask (IMAGE_SIZE, IMAGE_SIZE) of one shape centred at (cx, cy) with half-extent r (px)."""
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = r * 0.85
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "triangle":
        # Upward isosceles triangle inside the r-box: apex at top, base at the bottom.
        t = (dy + r) / (2 * r)  # 0 at the apex row, 1 at the base row
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    if shape == "cross":
        w = r * 0.38
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise ValueError(shape)


def _background(rng: np.random.Generator) -> np.ndarray:
    """Low-saturation textured background: smooth blobs + stripes + pixel noise, float (H, W, 3)."""
    base = rng.uniform(70, 170)
    tint = rng.uniform(-15, 15, size=3)
    # Smooth noise: coarse random grid upsampled bilinearly.
    k = int(rng.integers(3, 7))
    coarse = rng.normal(0, 18, size=(k, k))
    idx = np.linspace(0, k - 1, IMAGE_SIZE)
    i0 = np.floor(idx).astype(int)
    i1 = np.minimum(i0 + 1, k - 1)
    f = idx - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i1] * f[:, None]
    smooth = rows[:, i0] * (1 - f)[None, :] + rows[:, i1] * f[None, :]
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    ang = rng.uniform(0, np.pi)
    freq = rng.uniform(0.15, 0.6)
    stripes = rng.uniform(0, 10) * np.sin(freq * (np.cos(ang) * xs + np.sin(ang) * ys))
    grey = base + smooth + stripes
    img = grey[:, :, None] + tint[None, None, :]
    img = img + rng.normal(0, 8, size=img.shape)
    return img


def _render(objects: list[dict], rng: np.random.Generator) -> np.ndarray:
    img = _background(rng)
    for o in objects:
        m = _shape_mask(o["shape"], o["centre"][0], o["centre"][1], o["r"])
        col = np.array(COLOURS[o["colour"]], dtype=np.float64) + rng.normal(0, 10, size=3)
        img[m] = col[None, :] + rng.normal(0, 6, size=(int(m.sum()), 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def quadrant_of(cx: float, cy: float) -> str:
    return QUADRANTS[(2 if cy >= IMAGE_SIZE / 2 else 0) + (1 if cx >= IMAGE_SIZE / 2 else 0)]


# ----------------------------------------------------------------------------------------------- scenes


def _place(specs: list[dict], rng: np.random.Generator, quad_for: dict[int, str] | None = None) -> list[dict] | None:
    """Place objects (dicts with colour, shape, size) without overlap; returns None when it fails."""
    placed: list[dict] = []
    quad_for = quad_for or {}
    for i, s in enumerate(specs):
        r = float(rng.uniform(*RADIUS[s["size"]]))
        for _ in range(200):
            q = quad_for.get(i)
            lo, hi = r + 1.0, IMAGE_SIZE - r - 1.0
            if q is None:
                cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
            else:
                qi = QUADRANTS.index(q)
                half = IMAGE_SIZE / 2
                xr = (lo, half - MIDLINE_MARGIN) if qi % 2 == 0 else (half + MIDLINE_MARGIN, hi)
                yr = (lo, half - MIDLINE_MARGIN) if qi < 2 else (half + MIDLINE_MARGIN, hi)
                if xr[0] >= xr[1] or yr[0] >= yr[1]:
                    return None
                cx, cy = rng.uniform(*xr), rng.uniform(*yr)
            ok = all(np.hypot(cx - p["centre"][0], cy - p["centre"][1]) > r + p["r"] + 2.5 for p in placed)
            if ok:
                break
        else:
            return None
        placed.append(
            {
                "shape": s["shape"],
                "colour": s["colour"],
                "size": s["size"],
                "r": r,
                "centre": (float(cx), float(cy)),
                "box": (
                    int(max(0, np.floor(cx - r))),
                    int(max(0, np.floor(cy - r))),
                    int(min(IMAGE_SIZE, np.ceil(cx + r))),
                    int(min(IMAGE_SIZE, np.ceil(cy + r))),
                ),
            }
        )
    return placed


def _rand_obj(rng, colour=None, shape=None, size=None, not_colour=(), not_shape=(), not_pair=()) -> dict:
    """Random object spec, avoiding the given colours / shapes / (colour, shape) pairs."""
    for _ in range(200):
        c = colour or COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
        s = shape or SHAPES[rng.integers(len(SHAPES))]
        z = size or SIZES[rng.integers(2)]
        if c in not_colour or s in not_shape or (c, s) in not_pair:
            continue
        return {"colour": c, "shape": s, "size": z}
    raise RuntimeError("no object satisfies the constraints")


def _scene_for(skill: str, rng: np.random.Generator) -> tuple[list[dict], list[dict], dict[int, str], str, str]:
    """Object specs, a placement constraint and the (question, answer) for one skill, answer drawn uniformly."""
    n_dis = int(rng.integers(1, MAX_OBJECTS - 1))  # distractors besides the target(s)
    quad: dict[int, str] = {}
    if skill == "attribute":
        if rng.random() < 0.5:
            c = COLOUR_NAMES[rng.integers(6)]
            s = SHAPES[rng.integers(4)]
            specs = [_rand_obj(rng, colour=c, shape=s)] + [_rand_obj(rng, not_shape=(s,)) for _ in range(n_dis)]
            q, a = f"what colour is the {s} ?", c
        else:
            c = COLOUR_NAMES[rng.integers(6)]
            s = SHAPES[rng.integers(4)]
            specs = [_rand_obj(rng, colour=c, shape=s)] + [_rand_obj(rng, not_colour=(c,)) for _ in range(n_dis)]
            q, a = f"what shape is the {c} object ?", s
    elif skill == "exists":
        c, s = COLOUR_NAMES[rng.integers(6)], SHAPES[rng.integers(4)]
        yes = rng.random() < 0.5
        # Near misses (same colour or same shape) force the model to bind colour to shape.
        dis = []
        for _ in range(n_dis):
            if rng.random() < 0.6:
                dis.append(
                    _rand_obj(rng, colour=c, not_shape=(s,))
                    if rng.random() < 0.5
                    else _rand_obj(rng, shape=s, not_colour=(c,))
                )
            else:
                dis.append(_rand_obj(rng, not_pair=((c, s),)))
        specs = ([_rand_obj(rng, colour=c, shape=s)] if yes else []) + dis
        q, a = f"is there a {c} {s} ?", "yes" if yes else "no"
    elif skill == "count":
        n = int(rng.integers(0, len(COUNT_WORDS)))
        n_dis = int(rng.integers(0, MAX_OBJECTS - n + 1)) if n < MAX_OBJECTS else 0
        n_dis = max(min(n_dis, 3), 1 if n == 0 else 0)
        if rng.random() < 0.5:
            s = SHAPES[rng.integers(4)]
            specs = [_rand_obj(rng, shape=s) for _ in range(n)] + [_rand_obj(rng, not_shape=(s,)) for _ in range(n_dis)]
            q = f"how many {SHAPE_PLURALS[s]} are there ?"
        else:
            c = COLOUR_NAMES[rng.integers(6)]
            specs = [_rand_obj(rng, colour=c) for _ in range(n)]
            specs += [_rand_obj(rng, not_colour=(c,)) for _ in range(n_dis)]
            q = f"how many {c} objects are there ?"
        a = COUNT_WORDS[n]
    elif skill == "position":
        c, s = COLOUR_NAMES[rng.integers(6)], SHAPES[rng.integers(4)]
        a = QUADRANTS[rng.integers(4)]
        specs = [_rand_obj(rng, colour=c, shape=s)] + [_rand_obj(rng, not_pair=((c, s),)) for _ in range(n_dis)]
        quad = {0: a}
        q = f"where is the {c} {s} ?"
    elif skill == "small":
        # Exactly one small object of the named kind; same-kind distractors are large, so size must be read.
        if rng.random() < 0.5:
            c, s = COLOUR_NAMES[rng.integers(6)], SHAPES[rng.integers(4)]
            dis = []
            for _ in range(n_dis):
                if rng.random() < 0.5:
                    dis.append(_rand_obj(rng, shape=s, size="large", not_colour=(c,)))
                else:
                    dis.append(_rand_obj(rng, not_shape=(s,)))
            specs = [_rand_obj(rng, colour=c, shape=s, size="small")] + dis
            q, a = f"what colour is the small {s} ?", c
        else:
            c, s = COLOUR_NAMES[rng.integers(6)], SHAPES[rng.integers(4)]
            dis = []
            for _ in range(n_dis):
                if rng.random() < 0.5:
                    dis.append(_rand_obj(rng, colour=c, size="large", not_shape=(s,)))
                else:
                    dis.append(_rand_obj(rng, not_colour=(c,)))
            specs = [_rand_obj(rng, colour=c, shape=s, size="small")] + dis
            q, a = f"what shape is the small {c} object ?", s
    else:
        raise ValueError(skill)
    return specs, [], quad, q, a


def _make(seed: int, skill: str | None = None) -> tuple[np.ndarray, list[dict], str, str, str]:
    rng = np.random.default_rng(seed)
    skill = skill or SKILLS[int(rng.integers(len(SKILLS)))]
    for _ in range(100):
        specs, _, quad, q, a = _scene_for(skill, rng)
        # Shuffle object order so the target is not always drawn first (placement order biases crowding).
        order = rng.permutation(len(specs))
        specs = [specs[i] for i in order]
        quad = {int(np.where(order == k)[0][0]): v for k, v in quad.items()}
        # Retry the placement of the same specs first, so hard scenes (many objects) are not under-sampled.
        placed = None
        for _ in range(20):
            placed = _place(specs, rng, quad)
            if placed is not None:
                break
        if placed is not None:
            break
    else:
        raise RuntimeError(f"could not place scene for seed {seed}")
    img = _render(placed, rng)
    objs = [{k: o[k] for k in ("shape", "colour", "size", "box", "centre", "r")} for o in placed]
    return img, objs, q, a, skill


def make_sample(seed: int, skill: str | None = None) -> Sample:
    """The sample of one integer seed (the skill is drawn from the seed unless given)."""
    img, objs, q, a, skill = _make(seed, skill)
    return Sample(image=img, question=q, answer=a, skill=skill, objects=objs, seed=seed)


def sample_seed(split: str, i: int, seed: int = 0) -> int:
    if i >= SPLIT_SEEDS_PER_RUN:
        raise ValueError("at most 10**6 samples per (split, seed)")
    return SPLIT_START[split] + seed * SPLIT_SEEDS_PER_RUN + i


def samples(split: str, n: int, seed: int = 0, skill: str | None = None) -> list[Sample]:
    """``n`` deterministic samples of a split ("train", "val" or "test"); skills cycle so each gets n/5."""
    out = []
    for i in range(n):
        sk = skill or SKILLS[i % len(SKILLS)]
        out.append(make_sample(sample_seed(split, i, seed), sk))
    return out


def make_clip(frames: int, seed: int = 0) -> tuple[list[np.ndarray], list[list[dict]]]:
    """A deterministic ``frames``-frame clip of testbed scenes, for drawing temporal compression.

    One textured background (the same pixels in every frame), one large object moving ``PATCH`` px (one patch)
    to the right per frame (wrapping back to the left edge after 9 steps), and a second large object that
    appears at frame ``frames // 2`` and stays put. Colours and shapes come from ``seed``; each object's pixel
    noise is drawn once, so a patch changes between frames only where an object moves or appears.

    Returns the frames (uint8 ``(IMAGE_SIZE, IMAGE_SIZE, 3)`` each) and, per frame, its objects (dicts as
    :class:`Sample`'s: shape, colour, size, box, centre, r).
    """
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be an int >= 1; got {frames!r}")
    rng = np.random.default_rng(seed)
    background = _background(rng)
    c1, c2 = (COLOUR_NAMES[int(i)] for i in rng.choice(len(COLOUR_NAMES), 2, replace=False))
    s1, s2 = (SHAPES[int(i)] for i in rng.choice(len(SHAPES), 2, replace=False))
    r = 10.0
    noise = rng.normal(0, 6, size=background.shape)
    tints = {c1: rng.normal(0, 10, size=3), c2: rng.normal(0, 10, size=3)}
    out, objects = [], []
    for t in range(frames):
        placed = [{"shape": s1, "colour": c1, "centre": (12.0 + PATCH * (t % 9), 28.0)}]
        if t >= frames // 2:
            placed.append({"shape": s2, "colour": c2, "centre": (68.0, 70.0)})
        img = background.copy()
        for o in placed:
            cx, cy = o["centre"]
            m = _shape_mask(o["shape"], cx, cy, r)
            img[m] = (np.array(COLOURS[o["colour"]], dtype=np.float64) + tints[o["colour"]])[None, :] + noise[m]
            o.update(size="large", r=r, box=(int(cx - r), int(cy - r), int(np.ceil(cx + r)), int(np.ceil(cy + r))))
        out.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
        objects.append(placed)
    return out, objects


# ----------------------------------------------------------------------------------------------- extra QA


def all_questions(objects: list[dict]) -> list[tuple[str, str, str]]:
    """Every (question, answer, skill) the templates can ask unambiguously about a scene (training use)."""
    qs: list[tuple[str, str, str]] = []
    shapes = [o["shape"] for o in objects]
    colours = [o["colour"] for o in objects]
    for o in objects:
        c, s = o["colour"], o["shape"]
        if shapes.count(s) == 1:
            qs.append((f"what colour is the {s} ?", c, "attribute"))
        if colours.count(c) == 1:
            qs.append((f"what shape is the {c} object ?", s, "attribute"))
        same = [p for p in objects if p["colour"] == c and p["shape"] == s]
        if len(same) == 1:
            cx, cy = o["centre"]
            if abs(cx - IMAGE_SIZE / 2) >= MIDLINE_MARGIN and abs(cy - IMAGE_SIZE / 2) >= MIDLINE_MARGIN:
                qs.append((f"where is the {c} {s} ?", quadrant_of(cx, cy), "position"))
        if o["size"] == "small":
            if sum(1 for p in objects if p["shape"] == s and p["size"] == "small") == 1:
                qs.append((f"what colour is the small {s} ?", c, "small"))
            if sum(1 for p in objects if p["colour"] == c and p["size"] == "small") == 1:
                qs.append((f"what shape is the small {c} object ?", s, "small"))
    for c in COLOUR_NAMES:
        for s in SHAPES:
            has = any(o["colour"] == c and o["shape"] == s for o in objects)
            qs.append((f"is there a {c} {s} ?", "yes" if has else "no", "exists"))
    for s in SHAPES:
        n = shapes.count(s)
        if n < len(COUNT_WORDS):
            qs.append((f"how many {SHAPE_PLURALS[s]} are there ?", COUNT_WORDS[n], "count"))
    for c in COLOUR_NAMES:
        n = colours.count(c)
        if n < len(COUNT_WORDS):
            qs.append((f"how many {c} objects are there ?", COUNT_WORDS[n], "count"))
    return qs


def vocabulary() -> list[str]:
    """Every word the prompts and answers use (the tokenizer's regular vocabulary)."""
    words = set(PREAMBLE.split()) | set(ANSWER_WORDS) | set(SHAPE_PLURALS.values()) | set(SIZES)
    words |= set("what colour shape is the object there a how many are where small ? question answer :".split())
    return sorted(words)


# ----------------------------------------------------------------------------------------------- viewing


def save_samples_png(samples_: list[Sample], path: str, cols: int = 4, scale: int = 2) -> None:
    """Save a grid of samples (image + question + answer) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, int(np.ceil(len(samples_) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3 * scale, rows * 1.5 * scale), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, s in zip(axes.ravel(), samples_, strict=False):
        ax.imshow(s.image, interpolation="nearest")
        ax.set_title(f"[{s.skill}] {s.question}\n-> {s.answer}", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
