"""Channels-last end to end (docs/design.md, "Channels-last"): with weights in channels_last,
every convolution of FSRENetwork and PoseNetwork reads and writes NHWC tensors, in forward and
in backward, eager and as torch.compile plans it, with the NCHW networks' results.

A tensor with C == 1 or H == W == 1 is both NCHW and NHWC; the checks below use B = 2 and
sizes where every checked map has C > 1 and H * W > 1, or say why they skip one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fsre_lightning.models import CrossTaskAttention, FSRENetwork, PoseNetwork
from fsre_lightning.models.decoder import MonodepthDecoder
from fsre_lightning.models.layers import (
    ConvBlock,
    is_channels_last,
    like_weight,
    reflection_pad,
    reflection_pad_nhwc,
)

CL = torch.channels_last
H_IMG, W_IMG = 64, 192
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


# Any attempt to open a connection (e.g. a weight download) fails the test.
pytestmark = pytest.mark.usefixtures("no_network")


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


def test_like_weight_puts_the_input_in_the_weights_format() -> None:
    frames = torch.rand(2, 3, 3, 8, 10)
    image = frames[:, 0]  # a strided NCHW slice, as the training step passes it
    nhwc_weight = torch.empty(4, 3, 3, 3).contiguous(memory_format=CL)
    nchw_weight = torch.empty(4, 3, 3, 3)
    assert _nhwc(like_weight(image, nhwc_weight))
    assert torch.equal(like_weight(image, nhwc_weight), image)
    assert like_weight(image, nchw_weight) is image
    back = like_weight(image.contiguous(memory_format=CL), nchw_weight)
    assert back.is_contiguous() and torch.equal(back, image)


# ------------------------------------------------------------------- hooks on every convolution


def _convs(*models: nn.Module) -> Iterator[tuple[str, nn.Conv2d]]:
    for prefix, model in zip(("net", "pose"), models, strict=False):
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                yield f"{prefix}.{name}", module


class ConvFormats(TorchDispatchMode):
    """Whether every convolution's tensors are NHWC: its input (forward pre-hook), output and
    the gradient its backward receives (forward hook, tensor hook) for every nn.Conv2d, and
    the tensors of every aten convolution and convolution backward that runs (this dispatch
    mode), which also covers CMA's 1x1 convolutions with fused weights (F.conv2d).

    `ambiguous` counts maps that are NCHW and NHWC at once (C == 1: the disparity heads; a
    1 x 1 kernel), where the check proves nothing.
    """

    def __init__(self, *models: nn.Module) -> None:
        super().__init__()
        self.seen: dict[str, set[str]] = {}
        self.bad: list[str] = []
        self.checked = self.ambiguous = 0
        self.aten_calls: dict[str, int] = {"forward": 0, "backward": 0}
        self.handles = []
        for name, conv in _convs(*models):
            self.handles.append(conv.register_forward_pre_hook(self._pre_hook(name)))
            self.handles.append(conv.register_forward_hook(self._hook(name)))

    def _check(self, name: str, what: str, x: torch.Tensor) -> None:
        self.seen.setdefault(name, set()).add(what)
        self.checked += 1
        self.ambiguous += x.is_contiguous()
        if not x.is_contiguous(memory_format=CL):
            self.bad.append(f"{name} {what} {tuple(x.shape)} strides {x.stride()}")

    def _pre_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self._check(name, "input", args[0])

        return hook

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._check(name, "output", output)
            if output.requires_grad:
                # Registered before any in-place activation: it sees the gradient with respect
                # to the convolution's own output, what its backward receives.
                output.register_hook(lambda grad: self._check(name, "grad", grad))

        return hook

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aten = torch.ops.aten
        if func is aten.convolution.default:
            self.aten_calls["forward"] += 1
            for what, x in zip(("input", "weight", "output"), (args[0], args[1], out),
                               strict=True):
                self._check("aten.convolution", what, x)
        elif func is aten.convolution_backward.default:
            self.aten_calls["backward"] += 1
            for what, x in zip(("grad_output", "input", "weight"), args[:3], strict=True):
                self._check("aten.convolution_backward", what, x)
            for what, x in zip(("grad_input", "grad_weight"), out[:2], strict=True):
                if x is not None:
                    self._check("aten.convolution_backward", what, x)
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _outputs(net: FSRENetwork, pose: PoseNetwork, image: torch.Tensor, other: torch.Tensor
             ) -> dict[str, torch.Tensor]:
    out = net(image)
    axisangle, translation = pose(image, other)
    results = {f"disp{s}": d for s, d in out["disp"].items()}
    results |= {f"feat{s}": f for s, f in out["depth_features"].items()}
    return results | {"seg": out["seg_logits"], "axisangle": axisangle,
                      "translation": translation}


def _loss_weights(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Random weights in each output's layout for a weighted sum of the outputs: its gradient
    is the weights, so every gradient a convolution receives is the network's doing. (A mean
    would hand the network a materialised NCHW gradient: the loss's layout, not the
    network's.)"""
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(v.shape, generator=g, dtype=torch.float64).to(v).contiguous(
        memory_format=CL if _nhwc(v) else torch.contiguous_format) for k, v in outputs.items()}


def _weighted_sum(outputs: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]
                  ) -> torch.Tensor:
    return sum((v * weights[k]).sum() for k, v in outputs.items())


def _run(net: FSRENetwork, pose: PoseNetwork, image: torch.Tensor, other: torch.Tensor
         ) -> dict[str, torch.Tensor]:
    """Forward and backward of both networks; the outputs and every parameter's gradient."""
    results = _outputs(net, pose, image, other)
    _weighted_sum(results, _loss_weights(results)).backward()
    results = {k: v.detach() for k, v in results.items()}
    for prefix, model in (("net", net), ("pose", pose)):
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{prefix}.{name} got no gradient"
            results[f"grad {prefix}.{name}"] = p.grad
    return results


# float64: 4 s of a CPU, in make test (slow); float32 in the fast tier too.
@pytest.mark.parametrize("dtype", [pytest.param(torch.float64, marks=pytest.mark.slow),
                                   torch.float32])
def test_channels_last_networks_run_every_convolution_nhwc(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    net = FSRENetwork(encoder="resnet18", pretrained=False).to(dtype).train()
    pose = PoseNetwork(encoder="resnet18", pretrained=False).to(dtype).train()
    net_cl = copy.deepcopy(net).to(memory_format=CL)
    pose_cl = copy.deepcopy(pose).to(memory_format=CL)
    # The networks find their first convolution through the copy (it is not a submodule).
    assert net_cl._stem[0] is net_cl.encoder.model.conv1
    assert pose_cl._stem[0] is pose_cl.encoder.model.conv1
    assert list(net_cl.state_dict()) == list(net.state_dict())
    g = torch.Generator().manual_seed(1)
    # NCHW inputs, as the training step slices them from its frame stack: the networks convert.
    image = torch.rand(2, 3, H_IMG, W_IMG, generator=g).to(dtype)
    other = torch.rand(2, 3, H_IMG, W_IMG, generator=g).to(dtype)

    formats = ConvFormats(net_cl, pose_cl)
    try:
        with formats:
            fast = _run(net_cl, pose_cl, image, other)
    finally:
        formats.remove()
    assert formats.bad == [], "\n".join(formats.bad)
    # CMA with fused weights runs its q, k, v and W as two F.conv2d per module instead.
    cma_modules = [*net_cl.cma_depth.values(), *net_cl.cma_seg.values()]
    fused = {id(m) for c in cma_modules for m in (c.query, c.key, c.value, c.project[0])}
    convs = {n for n, m in _convs(net_cl, pose_cl) if id(m) not in fused}
    assert len(fused) == 4 * len(cma_modules) == 24
    # Two ResNet-18s (20 each), depth decoder and heads (10 + 4), segmentation (10 + 1),
    # CMA's fusion (2 x 6) and the pose decoder (4).
    assert len(convs) == 40 + 14 + 11 + 12 + 4
    assert formats.seen.pop("aten.convolution") == {"input", "weight", "output"}
    assert formats.seen.pop("aten.convolution_backward") == {
        "grad_output", "input", "weight", "grad_input", "grad_weight"}
    assert formats.seen == {n: {"grad", "input", "output"} for n in convs}
    n_aten = len(convs) + 2 * len(cma_modules)
    assert formats.aten_calls == {"forward": n_aten, "backward": n_aten}
    # Nearly every check is meaningful (only C == 1 maps and 1 x 1 kernels are both formats).
    assert formats.ambiguous < 0.2 * formats.checked
    assert _nhwc(fast["seg"]) and _nhwc(fast["feat0"])

    plain = _run(net, pose, image, other)
    assert plain.keys() == fast.keys()
    for key, value in plain.items():
        if dtype == torch.float32 and key.startswith("grad"):
            # Not comparable in float32: a rounding-sized difference at a ReLU's kink in a
            # random network (batch statistics of 2 images) flips whole gradient entries.
            continue
        # Relative to each tensor's scale: summation orders differ between the layouts.
        scale = float(value.abs().max())
        rtol = 1e-10 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(fast[key], value, rtol=rtol, atol=rtol * scale, msg=key)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-weights", "literal-q-k-v"])
@pytest.mark.parametrize("heads", [1, 4])
def test_cma_keeps_the_features_memory_format(fused: bool, heads: int) -> None:
    torch.manual_seed(0)
    cma = CrossTaskAttention(16, num_heads=heads).double()
    cma.fused_weights = fused
    g = torch.Generator().manual_seed(2)
    target, reference = torch.randn(2, 2, 16, 5, 7, generator=g, dtype=torch.float64)
    # Dense folded weights: a strided one would be copied by every convolution call.
    assert all(w.is_contiguous() for w in cma.folded_weights())
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


# ------------------------------------------------------------------------------- torch.compile


def _planned_convolutions(loss: nn.Module, *inputs: Any) -> list[tuple[str, torch.Tensor]]:
    """(role, planned tensor) for every convolution in the forward and backward graphs that
    torch.compile (AOTAutograd, the front end of Inductor) builds for `loss(*inputs)`, a
    scalar; the planned tensors are the fake tensors whose strides the compiled code is
    generated for, on any device."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    planned: list[tuple[str, torch.Tensor]] = []
    aten = torch.ops.aten

    def inspect(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        for node in gm.graph.nodes:
            if node.target is aten.convolution.default:
                planned.append(("input", node.args[0].meta["val"]))
                planned.append(("output", node.meta["val"]))
            elif node.target is aten.convolution_backward.default:
                planned.append(("grad", node.args[0].meta["val"]))
                planned.append(("saved input", node.args[1].meta["val"]))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(loss, backend=aot_autograd(fw_compiler=inspect,
                                                            bw_compiler=inspect))
        compiled(*inputs).backward()
    finally:
        torch._dynamo.reset()
    return planned


class _DecoderWithAttention(nn.Module):
    """The decoder's pieces in one graph: ConvBlock, nearest x2, skip concat, CMA, a head;
    returns a weighted sum of the head's output."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = MonodepthDecoder((16, 16, 24, 32, 48), 3, head_scales=(3,))
        self.cma = CrossTaskAttention(128)

    def forward(self, features: list[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        x = self.decoder.block(4, features[-1], features)
        x = self.decoder.block(3, x, features)
        return (self.decoder.head(3, self.cma(x, x * 0.5 + 1)) * weight).sum()


@pytest.mark.slow  # Dynamo and AOTAutograd: seconds
def test_compiled_convolutions_are_planned_nhwc() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    model = _DecoderWithAttention().to(memory_format=CL)
    sizes = [(16, 32, 64), (16, 16, 32), (24, 8, 16), (32, 4, 8), (48, 2, 4)]
    features = [torch.randn(2, *s, generator=g).contiguous(memory_format=CL) for s in sizes]
    weight = torch.randn(2, 3, 8, 16, generator=g).contiguous(memory_format=CL)
    planned = _planned_convolutions(model, features, weight)
    assert {what for what, _ in planned} == {"input", "output", "grad", "saved input"}
    bad = [(what, tuple(t.shape), t.stride()) for what, t in planned if not _nhwc(t)]
    assert bad == []
    # ConvBlocks at 1/16 and 1/8 (4), CMA's two fused 1x1s and its fusion (2), the head.
    assert sum(what == "input" for what, _ in planned) == 4 + 2 + 2 + 1

    block = ConvBlock(8, 8).to(memory_format=CL)
    x = torch.randn(2, 8, 6, 10, generator=g).contiguous(memory_format=CL).requires_grad_(True)
    out = torch.compile(block, backend="aot_eager")(x)
    assert _nhwc(out)
    torch.testing.assert_close(out, block(x))


class _BothNetworks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = FSRENetwork(encoder="resnet18", pretrained=False)
        self.pose = PoseNetwork(encoder="resnet18", pretrained=False)

    def forward(self, image: torch.Tensor, other: torch.Tensor,
                weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return _weighted_sum(_outputs(self.net, self.pose, image, other), weights)


@pytest.mark.slow
def test_compiled_networks_plan_every_convolution_nhwc() -> None:
    """The whole of both networks under torch.compile (about 15 s of tracing on a CPU)."""
    torch.manual_seed(0)
    model = _BothNetworks().to(memory_format=CL)
    g = torch.Generator().manual_seed(1)
    image, other = torch.rand(2, 2, 3, H_IMG, W_IMG, generator=g)  # NCHW, as in training
    with torch.no_grad():
        weights = _loss_weights(_outputs(model.net, model.pose, image, other))
    planned = _planned_convolutions(model, image, other, weights)
    bad = [(what, tuple(t.shape), t.stride()) for what, t in planned
           if not t.is_contiguous(memory_format=CL)]
    assert bad == []
    # The 81 nn.Conv2d that run (not CMA's fused q, k, v, W) and CMA's 2 x 6 F.conv2d.
    assert sum(what == "input" for what, _ in planned) == 81 + 12
    assert sum(what == "grad" for what, _ in planned) == 81 + 12
    assert sum(t.is_contiguous() for _, t in planned) < 0.1 * len(planned)  # C == 1 maps only
