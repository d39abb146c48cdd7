"""One optimisation step of every model variant, on a batch in the data module's layout."""

from pathlib import Path

import pytest
import torch

from fsre_lightning.config import validate_config
from fsre_lightning.data.kitti_layout import KITTI_INTRINSICS
from fsre_lightning.errors import ConfigError
from fsre_lightning.geometry import intrinsics_matrix
from fsre_lightning.module import FSREModule
from fsre_lightning.testing import compose_config, optimiser_configs
from fsre_lightning.testing.tiny_checkpoints import save_checkpoint

H, W = 64, 192

# timm's 0.4 M-parameter test ResNet: the step, the losses and the optimisers do not depend
# on the encoder (the other families: test_a_training_step_with_other_encoder_families).
FULL = {"_target_": "fsre_lightning.models.FSRENetwork", "encoder": "test_resnet",
        "cma_scales": [4, 3, 2]}
POSE = {"_target_": "fsre_lightning.models.PoseNetwork", "encoder": "test_resnet"}

# (network overrides, loss overrides): the rows of the paper's Table 1b.
VARIANTS = {
    "monodepth2": ({"segmentation": False, "cma_scales": []},
                   {"segmentation_weight": 0.0, "sgt_weight": 0.0}),
    "ce": ({"cma_scales": []}, {"sgt_weight": 0.0}),
    "ce_sgt": ({"cma_scales": []}, {}),
    "ce_cma": ({}, {"sgt_weight": 0.0}),
    "full": ({}, {}),
    "full_monodepth2_weighting": ({}, {"scale_weighting": "monodepth2"}),
}


def make_batch(b: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(b, 3, 3, H, W, generator=g)
    K = intrinsics_matrix(H, W, KITTI_INTRINSICS).expand(b, 4, 4).clone()
    labels = torch.randint(0, 19, (b, H, W), generator=g)
    labels[:, :4] = 255
    return {"frames": frames, "frames_aug": frames, "K": K, "inv_K": torch.linalg.inv(K),
            "labels": labels, "index": torch.arange(b), "name": [f"x {i} l" for i in range(b)]}


def make_module(variant: str) -> FSREModule:
    net_over, loss_over = VARIANTS[variant]
    return FSREModule(network={**FULL, **net_over}, pose_network=POSE, loss=loss_over,
                      image_log_every_n_steps=0, **optimiser_configs())


def test_lr_schedule_warmup_per_step_then_paper_milestones_per_epoch() -> None:
    module = FSREModule(network={**FULL, "cma_scales": []}, pose_network=POSE,
                        **optimiser_configs(optimizer_args={"lr": 1e-3}, scheduler_args={
                            "milestones": [2], "gamma": 0.1, "warmup_steps": 4}))
    (optimizer,), schedulers = module.configure_optimizers()
    by_interval = {s["interval"]: s["scheduler"] for s in schedulers}
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        by_interval["step"].step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    for _ in range(2):
        by_interval["epoch"].step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    (_,), plain = FSREModule(network={**FULL, "cma_scales": []}, pose_network=POSE,
                             **optimiser_configs()).configure_optimizers()
    assert [s["interval"] for s in plain] == ["epoch"]


def test_adamw_and_cosine_are_selectable_and_a_module_without_them_cannot_train() -> None:
    module = FSREModule(network={**FULL, "cma_scales": []}, pose_network=POSE,
                        **optimiser_configs("adamw", "cosine", scheduler_args={"T_max": 4}))
    (optimizer,), (schedule,) = module.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["weight_decay"] == 1e-2
    assert type(schedule["scheduler"]) is torch.optim.lr_scheduler.CosineAnnealingLR
    for _ in range(4):
        optimizer.step()
        schedule["scheduler"].step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    bare = FSREModule(network={**FULL, "cma_scales": []}, pose_network=POSE)
    with pytest.raises(ConfigError, match=r"model\.optimizer or model\.scheduler"):
        bare.configure_optimizers()


def test_pose_network_gets_its_own_learning_rate() -> None:
    module = FSREModule(network={**FULL, "cma_scales": []}, pose_network=POSE,
                        **optimiser_configs(optimizer_args={"lr": 2e-4, "pose_lr_scale": 5.0}))
    (optimizer,), _ = module.configure_optimizers()
    depth_group, pose_group = optimizer.param_groups
    assert depth_group["lr"] == pytest.approx(2e-4) and pose_group["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in pose_group["params"]} == {id(p) for p in module.pose_net.parameters()}
    n_all = sum(1 for _ in module.parameters())
    assert len(depth_group["params"]) + len(pose_group["params"]) == n_all


@pytest.mark.slow
def test_adam_is_fused_by_default_and_matches_the_per_parameter_loop() -> None:
    module = FSREModule(network={**FULL, "cma_scales": []}, pose_network=POSE,
                        **optimiser_configs())
    (fused,), _ = module.configure_optimizers()
    assert fused.defaults["fused"] is True
    looped_module = FSREModule(network={**FULL, "cma_scales": []}, pose_network=POSE,
                               **optimiser_configs(optimizer_args={"fused": False}))
    looped_module.load_state_dict(module.state_dict())
    (looped,), _ = looped_module.configure_optimizers()
    assert not looped.defaults["fused"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # a few steps, so the moments and the bias correction are exercised
        for a, b in zip(module.parameters(), looped_module.parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        fused.step()
        looped.step()
    for a, b in zip(module.parameters(), looped_module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_training_step_updates_every_used_parameter(variant: str) -> None:
    torch.manual_seed(0)
    module = make_module(variant)
    (optimizer,), _ = module.configure_optimizers()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    loss = module.training_step(make_batch(), 0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [
        n for n, g in grads.items() if g is None
    ]
    optimizer.step()
    changed = [n for n, p in module.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == len(before)
    has_seg = variant != "monodepth2"
    assert (module.net.seg_decoder is not None) == has_seg


@pytest.mark.slow  # the encoder-family smoke runs merged here: 1.5 s each
@pytest.mark.parametrize("encoder", ["convnext_atto", "efficientnet_b0", "regnetx_002"])
def test_a_training_step_with_other_encoder_families(encoder: str, tmp_path: Path) -> None:
    """Full model and pose network on three non-ResNet families (docs/design.md 3.1): the
    smoke experiment with them passes the checks before a run, finite loss, a non-zero
    gradient for every parameter, the step moves every parameter outside the encoders, and
    the checkpoint rebuilds the same networks on its own. (ConvNeXt's layer scale starts at
    1e-6, so the gradients of the norms inside its blocks are ~1e-12 and Adam's first step on
    them is below float32 resolution.)"""
    validate_config(compose_config("train", [
        "+experiment=smoke", f"model.network.encoder={encoder}", "model.network.pretrained=false",
        f"model.pose_network.encoder={encoder}"]), "train")
    torch.manual_seed(0)
    module = FSREModule(network={**FULL, "encoder": encoder},
                        pose_network={**POSE, "encoder": encoder},
                        image_log_every_n_steps=0, **optimiser_configs())
    (optimizer,), _ = module.configure_optimizers()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    _, losses = module._step(make_batch())  # training_step without a Trainer to log to
    loss = losses["total"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in module.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
    assert not missing
    optimizer.step()
    unchanged = [n for n, p in module.named_parameters() if torch.equal(before[n], p)
                 and not n.startswith(("net.encoder.", "pose_net.encoder."))]
    assert not unchanged
    rebuilt = FSREModule.load_from_checkpoint(
        save_checkpoint(module, tmp_path / "last.ckpt"), map_location="cpu")
    assert rebuilt.net.encoder.name == encoder and rebuilt.pose_net.encoder.name == encoder


def test_loss_terms_follow_the_config() -> None:
    module = make_module("full")
    _, losses = module._step(make_batch())
    assert {"photometric", "smoothness", "segmentation", "sgt", "sgt_s3", "sgt_s2", "sgt_s1",
            "total"} <= set(losses)
    cfg = module.loss_cfg
    expected = (losses["photometric"] + cfg.smoothness_weight * losses["smoothness"]
                + cfg.segmentation_weight * losses["segmentation"]
                + cfg.sgt_weight * losses["sgt"])
    assert torch.allclose(losses["total"], expected)
    reference_sgt = sum(losses[f"sgt_s{s}"] / 2**s for s in (3, 2, 1))
    assert torch.allclose(losses["sgt"], reference_sgt)

    baseline = make_module("monodepth2")
    _, base_losses = baseline._step(make_batch())
    assert "segmentation" not in base_losses and "sgt" not in base_losses


def test_identical_frames_give_zero_photometric_loss_with_automask() -> None:
    # With the three frames identical, the identity reprojection is (up to the tie-breaker)
    # zero everywhere, so the minimum is ~0 whatever the network predicts.
    module = make_module("monodepth2")
    batch = make_batch()
    batch["frames"] = batch["frames"][:, :1].expand(-1, 3, -1, -1, -1).contiguous()
    batch["frames_aug"] = batch["frames"]
    _, losses = module._step(batch)
    assert float(losses["photometric"]) < 1e-3
