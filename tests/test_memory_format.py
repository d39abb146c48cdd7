"""Channels-last end to end (docs/design.md, "Channels-last"): with weights in channels_last,
every convolution of FSRENetwork and PoseNetwork reads and writes NHWC tensors, in forward and
in backward, eager and as torch.compile plans it, with the NCHW networks' results.

A tensor with C == 1 or H == W == 1 is both NCHW and NHWC; the checks below use B = 2 and
sizes where every checked map has C > 1 and H * W > 1, or say why they skip one.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F

from fsre_lightning.models import CrossTaskAttention
from fsre_lightning.models.layers import (
    is_channels_last,
    reflection_pad,
    reflection_pad_nhwc,
)

CL = torch.channels_last
H_IMG, W_IMG = 64, 192
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection (e.g. a weight download) fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted during a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _nhwc(x: torch.Tensor) -> bool:
    """NHWC and unambiguously so (a C == 1 map is both formats and proves nothing)."""
    return is_channels_last(x)


# --------------------------------------------------------------------------- reflection padding


@pytest.mark.parametrize("pad", [reflection_pad, reflection_pad_nhwc], ids=["dispatch", "nhwc"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
def test_reflection_padding_is_f_pad_and_keeps_channels_last(pad, fmt) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
    x.requires_grad_(True)
    expected = F.pad(x, (1, 1, 1, 1), mode="reflect")
    got = pad(x)
    assert torch.equal(got, expected)
    if fmt == CL:
        assert _nhwc(got)
    elif pad is reflection_pad:
        assert got.is_contiguous()
    # Integer-valued upstream gradients: the folded border sums are exact in any order.
    upstream = torch.randint(-8, 9, expected.shape, generator=g).to(x).contiguous(memory_format=fmt)
    (want,) = torch.autograd.grad(expected, x, upstream)
    (grad,) = torch.autograd.grad(got, x, upstream)
    assert torch.equal(grad, want)
    assert float(grad[:, :, 1, 1].abs().sum()) > 0
    if fmt == CL:
        assert _nhwc(grad)


def test_nhwc_padding_is_planned_nhwc_on_the_meta_device() -> None:
    """The meta kernels are what torch.compile plans strides with; reflection_pad2d's returns
    NCHW for an NHWC input (pytorch#96738), the 5-D route NHWC."""
    x = torch.empty(2, 8, 6, 7, device="meta").contiguous(memory_format=CL)
    assert _nhwc(reflection_pad_nhwc(x))
    assert reflection_pad_nhwc(x).shape == (2, 8, 8, 9)


# ------------------------------------------------------------------------------------ CMA


@pytest.mark.parametrize("fused", [True, False], ids=["fused-weights", "literal-q-k-v"])
@pytest.mark.parametrize("heads", [1, 4])
def test_cma_keeps_the_features_memory_format(fused: bool, heads: int) -> None:
    torch.manual_seed(0)
    cma = CrossTaskAttention(16, num_heads=heads).double()
    cma.fused_weights = fused
    g = torch.Generator().manual_seed(2)
    target, reference = torch.randn(2, 2, 16, 5, 7, generator=g, dtype=torch.float64)
    plain = cma(target, reference)
    plain_projected = cma._projected(target, reference)
    assert plain.is_contiguous() and plain_projected.is_contiguous()
    cma.to(memory_format=CL)
    t_cl, r_cl = (x.contiguous(memory_format=CL) for x in (target, reference))
    projected = cma._projected(t_cl, r_cl)
    out = cma(t_cl, r_cl)
    assert _nhwc(projected) and _nhwc(out)
    torch.testing.assert_close(projected, plain_projected, **TIGHT)
    torch.testing.assert_close(out, plain, **TIGHT)
