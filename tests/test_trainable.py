"""Trainable compressors (unshuffle_mlp, ldpv2, qformer, perceiver), their checkpoints and training, and FOLDER."""

import json

import pytest
import torch
import torch.nn.functional as F

import vtcompress as vc
from vtcompress import VisualTokens
from vtcompress.checkpoints import from_pretrained
from vtcompress.grid import grid_for_budget
from vtcompress.testbed import data as D
from vtcompress.testbed import model as M
from vtcompress.testbed.train_compressor import compressed_logits, evaluate_compressor, train_compressor
from vtcompress.testbed.train_compressor_cli import train_compressor_main
from vtcompress.trainable import TrainableCompressor

TRAINABLE = ["unshuffle_mlp", "ldpv2", "qformer", "perceiver"]
GRID = (12, 12)
D_MODEL = 32


def _get(name, **kw):
    """A trainable method with random (untrained) weights, asked for explicitly."""
    return vc.get(name, pretrained=False, **kw)


def _tokens(b=2, grid=GRID, d=D_MODEL, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, grid[0] * grid[1], d, generator=gen).to(dtype)
    return VisualTokens.from_features(x, grid=grid)


def _perturb(comp: torch.nn.Module, seed=1):
    """Move every weight off its (partly zero) initialisation, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in comp.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return comp


def _pool(x: torch.Tensor, grid, out) -> torch.Tensor:
    b, _, d = x.shape
    g = x.reshape(b, grid[0], grid[1], d).permute(0, 3, 1, 2)
    return F.adaptive_avg_pool2d(g, out).flatten(2).transpose(1, 2)


# ------------------------------------------------------------------------------------------ registry / shapes
def test_registered_as_trainable():
    info = {r["name"]: r for r in vc.method_info()}
    for name in TRAINABLE:
        assert info[name]["trainable"] is True and info[name]["stage"] == "projector"
        assert isinstance(_get(name, budget=0.25), TrainableCompressor)
    assert info["folder"]["trainable"] is False and info["folder"]["stage"] == "encoder"


@pytest.mark.parametrize("name", TRAINABLE)
@pytest.mark.parametrize("budget,expected", [(0.25, (6, 6)), (0.11, (4, 4)), (20, (4, 5))])
def test_shapes_counts_and_bookkeeping(name, budget, expected):
    if name == "unshuffle_mlp" and budget == 20:
        expected = (4, 4)  # the count follows the unshuffle factor: round(sqrt(144 / 20)) = 3 -> 4x4
    tok = _tokens(b=3)
    out = _get(name, budget=budget, **({"grid": GRID} if isinstance(budget, int) else {}))(tok)
    m = expected[0] * expected[1]
    out.validate()
    assert tuple(out.x.shape) == (3, m, D_MODEL) and out.layout == expected
    assert out.counts.tolist() == [m] * 3
    # every patch goes to exactly one output token; sizes count them and sum to N0
    assert bool((out.assign >= 0).all()) and int(out.assign.max()) == m - 1
    counts = torch.zeros(3, m).scatter_add_(1, out.assign, torch.ones(3, 144))
    assert torch.equal(out.size, counts) and out.size.sum(1).tolist() == [144.0] * 3
    # anchors ascend and point back at their own token
    assert bool((out.pos[:, 1:] > out.pos[:, :-1]).all())
    assert torch.equal(out.assign.gather(1, out.pos), torch.arange(m).expand(3, m))


def test_grid_for_budget_matches_keep_counts():
    for budget, k in [(0.25, 36), (0.11, 16), (0.5, 72), (20, 20), (1.0, 144)]:
        h, w = grid_for_budget(budget, GRID)
        assert h * w == k and h <= 12 and w <= 12
    assert grid_for_budget(64, (24, 24)) == (8, 8)
    with pytest.raises(ValueError, match="200"):
        grid_for_budget(200, GRID)


@pytest.mark.parametrize("name", TRAINABLE)
@pytest.mark.parametrize("budget,out", [(0.25, (6, 6)), (0.11, (4, 4))])
def test_untrained_is_average_pooling(name, budget, out):
    """Zero-initialised residual branches: before training every method is exactly average pooling."""
    tok = _tokens()
    y = _get(name, budget=budget)(tok).x
    torch.testing.assert_close(y, _pool(tok.x, GRID, out), rtol=0, atol=1e-5)


def test_unshuffle_matches_internvl_pixel_shuffle():
    from transformers.models.internvl.modeling_internvl import InternVLModel

    from vtcompress.methods.transform import _unshuffle_grid

    x = torch.randn(2, 8, 8, 5)
    ref = InternVLModel.pixel_shuffle(None, x, scale_factor=0.5)  # [2, 4, 4, 20], stock channel order
    ours = _unshuffle_grid(x.reshape(2, 64, 5), (8, 8), 2)
    assert torch.equal(ours, ref.reshape(2, 16, 20))


@pytest.mark.parametrize("name", TRAINABLE)
def test_batched_equals_one_by_one_and_dtypes(name):
    comp = _perturb(_get(name, budget=0.25, hidden_size=D_MODEL, grid=GRID))
    tok = _tokens(b=3)
    full = comp(tok)
    for b in range(3):
        one = comp(tok.row(b))
        torch.testing.assert_close(one.x[0], full.x[b], rtol=1e-5, atol=1e-5)
        assert torch.equal(one.pos[0], full.pos[b]) and torch.equal(one.assign[0], full.assign[b])
    half = comp(tok.to(torch.bfloat16))
    assert half.x.dtype == torch.bfloat16
    torch.testing.assert_close(half.x.float(), full.x, rtol=0.05, atol=0.05)


def test_lazy_build_is_deterministic_and_checks_inputs():
    a, b = _get("qformer", budget=0.25, seed=3), _get("qformer", budget=0.25, seed=3)
    tok = _tokens()
    torch.testing.assert_close(a(tok).x, b(tok).x)  # built lazily from the first input, same seed
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = _get("qformer", budget=0.25, seed=4, seed_queries=False, hidden_size=D_MODEL, grid=GRID)
    assert not torch.equal(c.query, _get("qformer", budget=0.25, seed=5, seed_queries=False,
                                           hidden_size=D_MODEL, grid=GRID).query)
    with pytest.raises(ValueError, match=r"D=32.*D=48"):
        a(_tokens(d=48))
    with pytest.raises(ValueError, match=r"36 output tokens.*\(8, 8\) needs 16"):
        a(_tokens(grid=(8, 8)))
    # pooling-like methods have no grid-bound weights: any grid works
    assert _get("ldpv2", budget=0.25, hidden_size=D_MODEL, grid=GRID)(_tokens(grid=(8, 8))).x.shape[1] == 16


def test_bad_input_and_fields():
    pruned = _tokens().select(torch.arange(0, 144, 2).expand(2, 72))
    for name in TRAINABLE:
        with pytest.raises(ValueError, match="layout=None"):
            _get(name, budget=0.25)(pruned)
    with pytest.raises(ValueError, match="num_heads=5"):
        _get("perceiver", budget=0.25, num_heads=5)(_tokens())
    with pytest.raises(ValueError, match="num_layers must be a positive int; got 0"):
        _get("qformer", budget=0.25, num_layers=0)
    with pytest.raises(ValueError, match="factor"):
        _get("unshuffle_mlp", budget=0.25, factor=0)
    with pytest.raises(ValueError, match="hidden_size"):
        _get("ldpv2", budget=0.25, hidden_size=-3)
    with pytest.raises(ValueError, match="no weights yet"):
        _get("ldpv2", budget=0.25).save_pretrained("/nonexistent/never-written")


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", TRAINABLE)
def test_save_load_round_trip_identical(name, tmp_path):
    comp = _perturb(_get(name, budget=0.11, hidden_size=D_MODEL, grid=GRID, seed=7)).eval()
    tok = _tokens(b=2)
    ref = comp(tok)
    comp.save_pretrained(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["method"] == name and cfg["fields"]["budget"] == 0.11 and cfg["fields"]["hidden_size"] == D_MODEL
    loaded = type(comp).from_pretrained(tmp_path / "ck")
    assert type(loaded) is type(comp) and not loaded.training
    out = loaded(tok)
    assert torch.equal(out.x, ref.x) and torch.equal(out.pos, ref.pos) and torch.equal(out.size, ref.size)
    # the generic loader resolves the class from the config
    assert torch.equal(from_pretrained(tmp_path / "ck", budget=0.11, hidden_size=D_MODEL)(tok).x, ref.x)


def test_checkpoint_for_another_budget_or_hidden_size_is_refused(tmp_path):
    comp = _get("perceiver", budget=0.25, hidden_size=D_MODEL, grid=GRID)
    comp.save_pretrained(tmp_path / "ck")
    with pytest.raises(ValueError, match=r"budget=0\.25.*budget=0\.11"):
        from_pretrained(tmp_path / "ck", budget=0.11)
    with pytest.raises(ValueError, match=r"D=32.*D=64"):
        from_pretrained(tmp_path / "ck", hidden_size=64)
    loaded = from_pretrained(tmp_path / "ck")
    with pytest.raises(ValueError, match=r"D=32.*D=64"):
        loaded(_tokens(d=64))
    with pytest.raises(ValueError, match="not 'qformer'"):
        _get("qformer", budget=0.25).from_pretrained(tmp_path / "ck")
    with pytest.raises(ValueError, match="no checkpoint"):
        from_pretrained(tmp_path / "missing")


def test_training_free_method_round_trips_its_config(tmp_path):
    folder = vc.get("folder", budget=0.11, layers=2, metric="features")
    folder.save_pretrained(tmp_path / "f")
    assert {p.name for p in (tmp_path / "f").iterdir()} == {"config.json"}
    assert vc.Compressor.from_pretrained(tmp_path / "f") == folder
    with pytest.raises(ValueError, match=r"budget=0\.11.*budget=16"):
        vc.Compressor.from_pretrained(tmp_path / "f", budget=16)


# ------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def tiny():
    tok = M.build_tokenizer()
    model = M.build_model(tok, seed=0, vision_hidden=32, text_hidden=D_MODEL, vision_layers=2, text_layers=1)
    return model.eval(), tok


def _loss(model, comp, enc):
    with torch.no_grad():
        logits = compressed_logits(model, comp, enc)
    return float(F.cross_entropy(logits, enc["answer_ids"]))


@pytest.mark.parametrize("name,distill", [("ldpv2", 0.0), ("qformer", 0.5)])
def test_training_lowers_loss_and_touches_only_the_compressor(tiny, name, distill):
    model, tok = tiny
    batch = D.samples("train", 8, seed=0)
    enc = M.encode(tok, batch, model.config)
    comp = _get(name, budget=0.25, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hist = train_compressor(model, tok, comp, steps=12, lr=1e-2, seed=0, fixed_samples=batch, warmup=1,
                            distill=distill, progress=False)
    assert len(hist["losses"]) == 12 and hist["losses"][-1] < hist["losses"][0]
    if distill == 0:
        assert _loss(model, comp, enc) < hist["losses"][0] - 0.05
    # frozen model: no gradient anywhere, weights untouched; every compressor parameter received one
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is not None for p in comp.parameters())
    # the same seed gives the same run
    comp2 = _get(name, budget=0.25, seed=0)
    hist2 = train_compressor(model, tok, comp2, steps=12, lr=1e-2, seed=0, fixed_samples=batch, warmup=1,
                             distill=distill, progress=False)
    assert hist2["losses"] == hist["losses"]


def test_train_projector_gets_gradients_too(tiny):
    model, tok = tiny
    batch = D.samples("train", 4, seed=1)
    comp = _get("perceiver", budget=0.11, num_layers=1)
    proj_before = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    try:
        train_compressor(model, tok, comp, steps=2, lr=1e-3, fixed_samples=batch, warmup=1, progress=False,
                         train_projector=True)
        proj = set(model.model.multi_modal_projector.parameters())
        assert all(p.grad is not None for p in proj)
        assert all(p.grad is None for p in model.parameters() if p not in proj)
    finally:
        model.model.multi_modal_projector.load_state_dict(proj_before)
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None


def test_apply_evaluation_matches_training_forward(tiny):
    """The bench path (vtcompress.apply + testbed evaluate) predicts what the training forward computes."""
    model, tok = tiny
    comp = _perturb(_get("unshuffle_mlp", budget=0.25, hidden_size=D_MODEL, grid=GRID)).eval()
    samples = D.samples("val", 6, seed=0)
    res = evaluate_compressor(model, tok, comp, samples, batch_size=6)
    enc = M.encode(tok, samples, model.config)
    with torch.no_grad():
        logits = compressed_logits(model, comp, enc)
    ans = torch.tensor(M.answer_token_ids(tok))
    pred = ans[logits[:, ans].argmax(-1)]
    assert res["correct"] == (pred == enc["answer_ids"]).tolist()


def test_cli_trains_saves_and_reloads(tmp_path, capsys):
    out = tmp_path / "ck"
    rc = train_compressor_main(["ldpv2", "--budget", "0.25", "--steps", "2", "--batch-size", "2", "--random-testbed",
                                "--out", str(out), "--eval", "4", "--no-progress"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "train.json"}
    report = json.loads((out / "train.json").read_text())
    assert report["steps"] == 2 and 0.0 <= report["test_accuracy"] <= 1.0
    comp = from_pretrained(out, budget=0.25, hidden_size=128)
    assert comp.out_grid == (6, 6)
    assert train_compressor_main(["fastv", "--budget", "0.25", "--random-testbed"]) == 2
    assert "not trainable" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ FOLDER
def _tome_round_reference(x, metric, size, r):
    """One ToMe round for one row, written with Python loops (float64): A = even, B = odd indices."""
    n = x.shape[0]
    m = metric / metric.norm(dim=-1, keepdim=True)
    a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
    best = [(max((float(m[a] @ m[b]), b) for b in b_idx)) for a in a_idx]
    order = sorted(range(len(a_idx)), key=lambda i: -best[i][0])
    merged = {a_idx[i]: best[i][1] for i in order[:r]}
    keep = [t for t in range(n) if t not in merged]
    groups = {t: [t] for t in keep}
    for a, b in merged.items():
        groups[b].append(a)
    xs = torch.stack([sum(x[t] * size[t] for t in groups[k]) / sum(size[t] for t in groups[k]) for k in keep])
    ms = torch.stack([sum(metric[t] * size[t] for t in groups[k]) / sum(size[t] for t in groups[k]) for k in keep])
    return xs, ms, torch.stack([sum(size[t] for t in groups[k]) for k in keep])


def test_folder_folds_rounds_like_repeated_tome():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 6, generator=gen, dtype=torch.float64)
    keys = torch.randn(2, 64, 4, generator=gen, dtype=torch.float64)
    tok = VisualTokens.from_features(x, grid=(8, 8), keys=keys)
    out = vc.get("folder", budget=0.25)(tok)  # 64 -> 16: rounds of 32 and 16
    assert out.counts.tolist() == [16, 16]
    for b in range(2):
        xs, ms, size = x[b], keys[b], torch.ones(64, dtype=torch.float64)
        for r in (32, 16):
            xs, ms, size = _tome_round_reference(xs, ms, size, r)
        torch.testing.assert_close(out.x[b], xs)
        torch.testing.assert_close(out.size[b].double(), size)
    assert out.size.sum(1).tolist() == [64.0, 64.0]


def test_folder_merges_exact_duplicates():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(1, 72, 16, generator=gen)
    x = base.repeat_interleave(2, dim=1)  # tokens 2i and 2i+1 identical: each A token's best B is its twin
    out = vc.get("folder", budget=0.5, metric="features")(VisualTokens.from_features(x, grid=GRID))
    torch.testing.assert_close(out.x, base)
    assert out.size.tolist() == [[2.0] * 72] and torch.equal(out.pos[0], torch.arange(1, 144, 2))


def test_folder_schedule():
    f = vc.get("folder", budget=0.25)
    assert f.schedule(576, 23) == [0] * 22 + [432]
    assert vc.get("folder", budget=16, layers=2).schedule(144, 3) == [0, 64, 64]
    assert vc.get("folder", budget=15, layers=2).schedule(144, 3) == [0, 65, 64]
    assert vc.get("folder", budget=1.0).schedule(144, 3) == [0, 0, 0]
    with pytest.raises(ValueError, match="layers=0"):
        vc.get("folder", layers=0)
    with pytest.raises(ValueError, match="metric='cosine'"):
        vc.get("folder", metric="cosine")


def test_folder_in_the_vision_tower():
    """Inside the stock tower: only the last layer before the feature layer merges; earlier layers are stock."""
    from vtcompress.models.encoder import encoder_merging

    tok = M.build_tokenizer()
    deeper = M.build_model(tok, seed=0, vision_hidden=32, text_hidden=D_MODEL, vision_layers=4, text_layers=1).eval()
    pv = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    tower = deeper.model.vision_tower
    with torch.no_grad():
        stock = tower(pv, output_hidden_states=True).hidden_states
        with encoder_merging(deeper, None, vc.get("folder", budget=0.11)) as h:
            feats = deeper.model.get_image_features(pixel_values=pv).pooler_output
            merged = tower(pv, output_hidden_states=True).hidden_states
    assert h.schedule == [0, 0, 128] and [f.shape[0] for f in feats] == [16, 16]
    for i in range(3):  # embeddings and the outputs of layers 0, 1: untouched
        assert torch.equal(merged[i], stock[i])
    assert merged[3].shape[1] == 1 + 16 and h.tokens.size.sum(1).tolist() == [144.0, 144.0]


def test_folder_through_apply(tiny):
    """``vtcompress.apply`` routes FOLDER to the encoder stage: full budget == stock model; 0.11 -> 16 tokens."""
    from vtcompress.models.apply import apply, compress_inputs

    model, tok = tiny
    enc = M.encode(tok, D.samples("val", 3, seed=2), model.config)
    kw = {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        ref = model(**kw).logits
        with apply(model, vc.get("folder", budget=1.0)):
            assert torch.equal(model(**kw).logits, ref)
        ci = compress_inputs(model, vc.get("folder", budget=0.11), **kw)
    assert ci.num_tokens[:, 1].tolist() == [16, 16, 16]
    assert ci.inputs["input_ids"].shape[1] == enc["input_ids"].shape[1] - 128


def test_unshuffle_mlp_on_a_grid_not_divisible_by_its_factor():
    tok = _tokens(b=2, grid=(5, 7))
    out = _get("unshuffle_mlp", budget=0.25)(tok)  # factor 2 -> ceil(5/2) x ceil(7/2) = 3 x 4
    assert out.layout == (3, 4) and out.size[0].tolist() == [4, 4, 4, 2, 4, 4, 4, 2, 2, 2, 2, 1]
    g = tok.x.reshape(2, 5, 7, D_MODEL)
    torch.testing.assert_close(out.x[:, 11], g[:, 4, 6])  # the corner cell holds one real patch
    torch.testing.assert_close(out.x[:, 0], g[:, :2, :2].mean((1, 2)))


# ------------------------------------------------------------------------------------------ unshuffle_mlp per view
def _alone_count(budget, grid, d):
    """What a fresh ``unshuffle_mlp`` gives on one view of ``grid`` seen on its own."""
    tok = VisualTokens.from_features(torch.randn(1, grid[0] * grid[1], d), grid=grid)
    return int(_get("unshuffle_mlp", budget=budget)(tok).counts[0])


def test_unshuffle_mlp_each_anyres_view_gets_its_own_count():
    """Regression (issue 12): the base crop fixed the factor, so the high-resolution view got the base crop's
    (4x4 at 0.09 -> factor 4) instead of its own count."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from models_util import tiny_llava_next

    model, make = tiny_llava_next()
    inputs = make(batch=2, images=[2, 2])
    m = _get("unshuffle_mlp", budget=0.09)
    with torch.no_grad():
        ci = vc.compress_inputs(model, m, **inputs)
    views = [t for image in ci.tokens for t in image]
    assert len(views) == 8 and {t.grid for t in views} >= {(4, 4), (6, 8), (8, 4), (8, 8)}
    for t in views:
        assert int(t.counts[0]) == _alone_count(0.09, t.grid, t.x.shape[-1]), t.grid
        f = 3  # round(1 / sqrt(0.09)), whatever the view
        assert int(t.counts[0]) == -(-t.grid[0] // f) * -(-t.grid[1] // f)


def test_unshuffle_mlp_batched_equals_one_by_one_on_qwen2_vl():
    """Regression (issue 12): two images with different grids in one batch used the first image's factor."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from models_util import split_samples, tiny_qwen2_vl

    model, make = tiny_qwen2_vl()
    inputs = make(batch=2, images=[3, 1])  # sample 1's image (grid 4x2) comes after three others
    with torch.no_grad():
        batched = vc.compress_inputs(model, _get("unshuffle_mlp", budget=0.09), **inputs)
        alone = [vc.compress_inputs(model, _get("unshuffle_mlp", budget=0.09), **one) for one in split_samples(inputs)]
    flat = [views for ci in alone for views in ci.tokens]
    assert len(flat) == len(batched.tokens) == 4
    for a, b in zip(flat, batched.tokens, strict=True):
        assert a[0].grid == b[0].grid and torch.equal(a[0].counts, b[0].counts)
        torch.testing.assert_close(a[0].x, b[0].x, rtol=1e-5, atol=1e-5)
        assert torch.equal(a[0].assign, b[0].assign)
    assert torch.equal(batched.num_tokens, torch.cat([ci.num_tokens for ci in alone]))
