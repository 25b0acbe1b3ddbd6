"""EVS against vLLM's reference, re-typed: ``vllm-project/vllm`` ``vllm/multimodal/evs.py``
``compute_retained_tokens_count`` and ``compute_retention_mask`` (the code behind ``--video-pruning-rate``)."""

import pytest
import torch

from vtcompress import VisualTokens
from vtcompress.methods.temporal import EVS

torch.set_num_threads(1)


def ref_retained_tokens_count(tokens_per_frame: int, num_frames: int, q: float) -> int:
    """vLLM ``compute_retained_tokens_count``: at least the first frame, else ``int(total * (1 - q))``."""
    return max(tokens_per_frame, int(tokens_per_frame * num_frames * (1 - q)))


def ref_retention_mask(video_embeds: torch.Tensor, thw: tuple[int, int, int], spatial_merge_size: int,
                       q: float) -> torch.Tensor:
    """vLLM ``compute_retention_mask``: ``video_embeds [T * H * W / m^2, D]`` of one video (``thw`` before the
    merge) -> ``[T * H * W / m^2]`` bool retention mask."""
    t, h, w = thw
    emb = video_embeds.reshape(t, h // spatial_merge_size, w // spatial_merge_size, video_embeds.shape[-1])
    per_frame = (h // spatial_merge_size) * (w // spatial_merge_size)
    dissim = 1 - torch.nn.functional.cosine_similarity(emb[1:], emb[:-1], dim=-1)
    dissim = torch.cat([255 * torch.ones_like(emb[:1, :, :, 0]), dissim], dim=0)
    flat = dissim.view(-1)
    order = torch.argsort(flat, dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[: ref_retained_tokens_count(per_frame, t, q)]] = True
    return keep


def _video(t, hw, d, seed, static=0.9):
    """A clip whose tokens mostly repeat the previous frame (``static`` share), the rest new, plus exact repeats
    (ties: the stable sort decides)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, hw, d, generator=g)
    for f in range(1, t):
        same = torch.rand(hw, generator=g) < static
        x[f, same] = x[f - 1, same] + 0.05 * torch.randn(int(same.sum()), d, generator=g)
        x[f, : hw // 4] = x[f - 1, : hw // 4]  # identical tokens: dissimilarity exactly 0 (ties)
    return x


@pytest.mark.parametrize("t,grid,q", [(4, (4, 4), 0.5), (8, (3, 5), 0.75), (6, (2, 2), 0.9), (5, (4, 6), 0.3),
                                      (3, (4, 4), 0.0), (8, (6, 6), 0.95)])
def test_evs_keeps_exactly_the_reference_tokens(t, grid, q):
    hw = grid[0] * grid[1]
    clips = [_video(t, hw, 16, seed) for seed in range(3)]
    tokens = VisualTokens.from_features(torch.stack([c.reshape(t * hw, 16) for c in clips]), grid, frames=t)
    out = EVS(budget=1 - q)(tokens)
    for b, clip in enumerate(clips):
        # the features as vLLM holds them: after a 2 x 2 spatial merge of a (t, 2H, 2W) patch grid
        mask = ref_retention_mask(clip.reshape(t * hw, 16), (t, 2 * grid[0], 2 * grid[1]), 2, q)
        kept = mask.nonzero().squeeze(1)
        row = out.row(b)
        assert torch.equal(row.pos[0], kept), (t, grid, q, b)
        assert torch.equal(row.x[0], clip.reshape(t * hw, 16)[kept])


def test_evs_count_is_vllms_for_every_rate():
    for t in (1, 2, 7, 16):
        for hw in (1, 4, 15, 196):
            for q in (0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 0.9, 0.99):
                assert EVS(budget=1 - q).retained(t, hw) == ref_retained_tokens_count(hw, t, q), (t, hw, q)


def test_evs_bf16_follows_the_reference_in_bf16():
    t, grid = 6, (4, 4)
    clip = _video(t, 16, 32, 7).to(torch.bfloat16)
    out = EVS(budget=0.4)(VisualTokens.from_features(clip.reshape(1, t * 16, 32), grid, frames=t))
    mask = ref_retention_mask(clip.reshape(t * 16, 32), (t, 8, 8), 2, 1 - 0.4)
    assert torch.equal(out.pos[0], mask.nonzero().squeeze(1))
