"""Qwen2.5-VL videos carry a time scale (``second_per_grid_ts``) in their M-RoPE temporal index: a call that
compresses its images must build the full sequence's positions with it, as the stock model does (without it the
text after a video gets other positions than the stock model gives it)."""

import pytest
import torch

import vtcompress
from models_util import IMAGE, tiny_qwen2_5_vl

torch.set_num_threads(1)
VIDEO, START, END = 121, 122, 123


def _image_and_video(model, seconds: float):
    cfg = model.config.vision_config
    dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    gen = torch.Generator().manual_seed(0)
    # an image of 4 x 4 patches (4 merged tokens), a video of 2 temporal x 4 x 4 patches (8 merged tokens)
    ids = [5, 6, START] + [IMAGE] * 4 + [END, 7, START] + [VIDEO] * 8 + [END, 8, 9, 10]
    types = [1 if t == IMAGE else 2 if t == VIDEO else 0 for t in ids]
    return dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                mm_token_type_ids=torch.tensor([types]), pixel_values=torch.randn(16, dim, generator=gen),
                image_grid_thw=torch.tensor([[1, 4, 4]]), pixel_values_videos=torch.randn(32, dim, generator=gen),
                video_grid_thw=torch.tensor([[2, 4, 4]]), second_per_grid_ts=torch.tensor([seconds]))


@pytest.mark.parametrize("seconds", [1.0, 3.0])
def test_image_compression_keeps_the_video_time_scale(seconds):
    model, _ = tiny_qwen2_5_vl()
    inputs = _image_and_video(model, seconds)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_ids = model.generate(**inputs, **gen)
        with vtcompress.apply(model, vtcompress.get("random", budget=1.0)):
            got = model(**inputs).logits
            got_ids = model.generate(**inputs, **gen)
    assert torch.equal(ref, got)
    assert torch.equal(ref_ids, got_ids)
