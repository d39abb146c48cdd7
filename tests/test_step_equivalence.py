"""The optimised training step does the plain composition's mathematics (float64, tight).

`plain_objective.plain_compute_losses` composes the pure loss functions the straightforward
way (per scale, per source; identity loss and target SSIM statistics recomputed each time).
The optimised `compute_losses` (shared target statistics, identity once, batched warps,
recomputation in backward) and the speed options of FSREModule must give the same total loss,
the same terms and the same gradient for every parameter.
"""

import os
import shutil
from functools import partial

import pytest
import torch

from fsre_lightning import module as module_mod
from fsre_lightning.data.kitti_layout import KITTI_INTRINSICS
from fsre_lightning.geometry import intrinsics_matrix, warp, warp_many
from fsre_lightning.losses import photometric_loss, photometric_losses, ssim_target_stats
from fsre_lightning.models.cma import CrossTaskAttention
from fsre_lightning.module import FSREModule
from fsre_lightning.objective import compute_losses
from fsre_lightning.testing.plain_objective import plain_compute_losses

H, W = 64, 64
FULL = {"_target_": "fsre_lightning.models.FSRENetwork", "encoder": "resnet18"}
POSE = {"_target_": "fsre_lightning.models.PoseNetwork", "encoder": "resnet18"}
TIGHT = {"rtol": 1e-9, "atol": 1e-12}
# torch.compile (Inductor) on CPU generates C++; without a compiler model.compile_loss cannot run.
NEEDS_CXX = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")),
    reason="model.compile_loss needs a C++ compiler on CPU",
)


def make_batch(b: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(b, 3, 3, H, W, generator=g, dtype=torch.float64)
    # A smooth shift between frames, so warps and the auto-mask are not degenerate.
    frames[:, 1] = 0.7 * frames[:, 0] + 0.3 * frames[:, 1]
    frames[:, 2] = frames[:, 0].roll(1, dims=-1)
    K = intrinsics_matrix(H, W, KITTI_INTRINSICS).to(torch.float64).expand(b, 4, 4).clone()
    labels = torch.randint(0, 4, (b, H, W), generator=g)
    labels[:, :4] = 255
    return {"frames": frames, "frames_aug": frames, "K": K, "inv_K": torch.linalg.inv(K),
            "labels": labels}


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize(
    ("network", "loss", "options", "recompute"),
    [
        ({}, {}, {}, True),
        ({}, {"scale_weighting": "monodepth2"},
         {"gradient_checkpointing": True, "channels_last": True}, True),
        ({"segmentation": False, "cma_scales": []},
         {"segmentation_weight": 0.0, "sgt_weight": 0.0, "automask": False}, {}, False),
        pytest.param({"cma_scales": []}, {}, {"compile_loss": True}, True, marks=NEEDS_CXX),
    ],
    ids=["full", "full-monodepth2-weighting-checkpointed-nhwc",
         "monodepth2-no-automask-no-loss-recompute", "ce-sgt-compiled-photometric"],
)
@pytest.mark.slow
def test_optimised_step_matches_plain_composition(
    network, loss, options, recompute, monkeypatch
) -> None:
    # compute_losses recomputes the warps in backward by default; cover the other path too.
    monkeypatch.setattr(module_mod, "compute_losses", partial(compute_losses, recompute=recompute))
    torch.manual_seed(0)
    module = FSREModule(network={**FULL, **network}, pose_network=POSE, loss=loss,
                        image_log_every_n_steps=0, **options).double()
    batch = make_batch(1)

    torch.manual_seed(1)  # the auto-mask's tie-breaking noise
    _, fast = module._step(batch)
    fast["total"].backward()
    fast_grads = grads(module)

    torch.manual_seed(1)
    outputs = module.net(batch["frames_aug"][:, 0])
    plain = plain_compute_losses(outputs, batch["frames"], batch["K"], batch["inv_K"],
                                 module._transforms(batch["frames_aug"]), batch["labels"],
                                 module.loss_cfg)
    plain["total"].backward()
    plain_grads = grads(module)

    assert fast["total"].dtype == torch.float64
    assert float(plain["total"].detach()) > 0
    for name, value in plain.items():
        torch.testing.assert_close(fast[name], value, **TIGHT, msg=name)
    assert fast_grads.keys() == plain_grads.keys()
    # Both networks and the pose network receive gradients (nothing detached by mistake).
    assert any(n.startswith("pose_net.") for n in fast_grads)
    assert any(n.startswith("net.depth_decoder.") for n in fast_grads)
    for name, g in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], g, **TIGHT, msg=name)
    assert sum(float(g.abs().sum()) for g in fast_grads.values()) > 0


def test_batched_warp_and_photometric_equal_the_single_calls() -> None:
    g = torch.Generator().manual_seed(3)
    b = 2
    target = torch.rand(b, 3, 8, 12, generator=g, dtype=torch.float64)
    sources = torch.rand(2, b, 3, 8, 12, generator=g, dtype=torch.float64)
    depth = 1 + torch.rand(b, 1, 8, 12, generator=g, dtype=torch.float64)
    K = intrinsics_matrix(8, 12, KITTI_INTRINSICS).to(torch.float64).expand(b, 4, 4).clone()
    T = torch.eye(4, dtype=torch.float64).repeat(2, b, 1, 1)
    T[..., 0, 3] = torch.tensor([[0.1, -0.05], [0.02, 0.2]], dtype=torch.float64)
    warped = warp_many(sources, depth, T, K, torch.linalg.inv(K))
    maps = photometric_losses(warped, target, 0.85, ssim_target_stats(target))
    assert maps.shape == (2, b, 1, 8, 12)
    for i in range(2):
        single = warp(sources[i], depth, T[i], K, torch.linalg.inv(K))
        torch.testing.assert_close(warped[i], single, **TIGHT)
        torch.testing.assert_close(maps[i], photometric_loss(single, target, 0.85), **TIGHT)
    torch.testing.assert_close(photometric_losses(warped, target, 0.0)[1],
                               photometric_loss(warped[1], target, 0.0), **TIGHT)
    with pytest.raises(ValueError, match="N x"):
        photometric_losses(warped[0], target)


@pytest.mark.parametrize("heads", [1, 4])
def test_cma_fused_weights_equal_the_literal_q_k_v_formulation(heads: int) -> None:
    torch.manual_seed(0)
    cma = CrossTaskAttention(16, num_heads=heads, ratio=2.0).double()
    target = torch.randn(2, 16, 5, 7, dtype=torch.float64, requires_grad=True)
    reference = torch.randn(2, 16, 5, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    inputs = [target, reference, *cma.parameters()]
    results = []
    for fused in (False, True):
        cma.fused_weights = fused
        out = cma(target, reference)
        results.append((out, torch.autograd.grad((out * weight).sum(), inputs)))
    (literal, literal_grads), (fast, fast_grads) = results
    torch.testing.assert_close(fast, literal, **TIGHT)
    for a, b in zip(fast_grads, literal_grads, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    assert float(literal_grads[0].abs().sum()) > 0


@pytest.mark.slow
def test_speed_options_keep_parameter_names_and_set_the_network_up() -> None:
    net = {**FULL, "segmentation": False, "cma_scales": []}
    plain = FSREModule(network=net, pose_network=POSE)
    tuned = FSREModule(network=net, pose_network=POSE, channels_last=True, compile="networks",
                       gradient_checkpointing=True, compile_loss=True)
    # Checkpoints stay interchangeable between runs with and without the options.
    assert list(tuned.state_dict()) == list(plain.state_dict())
    assert tuned.net.gradient_checkpointing and not plain.net.gradient_checkpointing
    conv = tuned.net.encoder.model.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert tuned.hparams["compile"] and tuned.hparams["channels_last"]
    assert tuned.hparams["compile_loss"] and tuned._photometric is not photometric_losses
    assert plain._photometric is photometric_losses
    # The compiled step includes the photometric maps: nothing compiled separately inside it.
    step = FSREModule(network=net, pose_network=POSE, compile=True, compile_loss=True)
    assert step._compiled_step is not None and step._photometric is photometric_losses
