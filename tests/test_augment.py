"""The frame-consistent jitter applies kornia's ColorJitter formulas, only faster."""

from __future__ import annotations

import pytest
import torch
from kornia.enhance import adjust_hue

from fsre_lightning.data.augment import FrameConsistentColorJitter, apply_color_jitter, shift_hue


def test_hue_shift_matches_the_hsv_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 24, generator=g)
    x[0, :, :4] = 0.5  # grey pixels (no chroma) and ties between channels
    x[1, 0, :4] = x[1, 1, :4]
    turns = torch.tensor([-0.1, 0.05, 0.0, 0.5]).view(4, 1, 1)
    ours = shift_hue(x, turns)
    reference = adjust_hue(x, turns.view(4) * 2 * torch.pi)
    assert torch.allclose(ours, reference, atol=2e-6)


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_jitter_equals_kornia_applied_frame_by_frame(p: float) -> None:
    torch.manual_seed(0)
    frames = torch.rand(6, 3, 3, 24, 40)
    jitter = FrameConsistentColorJitter(0.4, 0.4, 0.4, 0.2, p=p)
    for _ in range(5):  # several draws: different orders and selections
        params = jitter.jitter.forward_parameters(frames[:, 0].shape)
        reference = torch.stack([jitter.jitter(frames[:, i], params=params) for i in range(3)],
                                dim=1).clamp(0.0, 1.0)
        ours = apply_color_jitter(frames, params).clamp(0.0, 1.0)
        assert torch.allclose(ours, reference, atol=2e-6)
        unselected = params["batch_prob"] < 0.5
        assert torch.equal(ours[unselected], frames[unselected])
    # the module draws its parameters exactly as before (same RNG use as kornia's forward)
    torch.manual_seed(1)
    params = jitter.jitter.forward_parameters(frames[:, 0].shape)
    torch.manual_seed(1)
    assert torch.equal(jitter(frames), apply_color_jitter(frames, params).clamp(0.0, 1.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_jitter_on_cuda_matches_cpu() -> None:
    torch.manual_seed(0)
    frames = torch.rand(6, 3, 3, 24, 40)
    jitter = FrameConsistentColorJitter(0.4, 0.4, 0.4, 0.2, p=0.5)
    params = jitter.jitter.forward_parameters(frames[:, 0].shape)
    on_cpu = apply_color_jitter(frames, params)
    on_gpu = apply_color_jitter(frames.cuda(), params)
    assert on_gpu.is_cuda and torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-5)
    out = jitter(frames.cuda())
    assert out.is_cuda and out.shape == frames.shape
