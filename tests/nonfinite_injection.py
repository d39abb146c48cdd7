"""Non-finite values injected at every stage of whole Lightning training steps (issue 26).

Run by tests/test_nonfinite.py in a child process, because what it looks for is a crash:
before the grid guard (`geometry.sample`), a NaN pose or depth segfaulted PyTorch's CPU
grid_sample backward and took the process with it. One line of JSON per case on stdout,
written before the next case starts, so that a crash names the case it happened in.

    python tests/nonfinite_injection.py eager|aot_eager <folder for the image panels>

Each case: a fresh Trainer fits the same tiny FSRE model (test_resnet encoders, segmentation,
CMA, SGT) for two steps; the value is added at one stage in the first step only. `skip` must
skip and count that step and take the second; `stop` must stop with its message before the
first step is taken.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

import fsre_lightning.objective as objective
from fsre_lightning.data.dataset import collate
from fsre_lightning.data.kitti_layout import KITTI_INTRINSICS
from fsre_lightning.geometry import intrinsics_matrix
from fsre_lightning.module import FSREModule
from fsre_lightning.nonfinite import NonFiniteLossError, NonFinitePolicy
from fsre_lightning.testing import optimiser_configs

H, W = 64, 64
NET = {"_target_": "fsre_lightning.models.FSRENetwork", "encoder": "test_resnet",
       "pretrained": False, "num_heads": 1}
POSE = {"_target_": "fsre_lightning.models.PoseNetwork", "encoder": "test_resnet",
        "pretrained": False}
LOSS = {"sgt_scales": [3, 2]}

# Stages of the step, in the order the data flows; the loss terms are the last four.
STAGES = ("frames", "intrinsics", "features", "disparity", "pose_rotation", "pose_translation",
          "photometric", "smoothness", "segmentation", "sgt")
# The loss term a stop message must name for a value injected at each stage.
NAMED_TERM = {"frames": "photometric", "intrinsics": "photometric", "features": "photometric",
              "disparity": "smoothness", "pose_rotation": "photometric",
              "pose_translation": "photometric", "photometric": "photometric",
              "smoothness": "smoothness", "segmentation": "segmentation", "sgt": "sgt"}
VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
# NaN everywhere; +-inf where it enters coordinates and exponentials.
CASES = [(stage, "nan") for stage in STAGES] + [
    (stage, value) for stage in ("frames", "intrinsics", "disparity", "pose_translation")
    for value in ("inf", "-inf")]
POLICIES = ("skip", "stop")


class Poison:
    """One 0-dim tensor per stage, added where that stage's values pass: 0 leaves every value
    as it is. Tensors (not Python numbers), so a compiled step reads them as inputs and one
    graph serves every case."""

    def __init__(self) -> None:
        self.values = {stage: torch.zeros(()) for stage in STAGES}

    def __call__(self, stage: str, x: torch.Tensor) -> torch.Tensor:
        return x + self.values[stage].to(x.dtype)

    @contextmanager
    def set(self, stage: str, value: float) -> Iterator[None]:
        self.values[stage].fill_(value)
        try:
            yield
        finally:
            self.values[stage].zero_()


def poisoned_module(poison: Poison) -> FSREModule:
    torch.manual_seed(0)
    module = FSREModule(network=NET, pose_network=POSE, loss=LOSS, image_log_every_n_steps=1,
                        compile="step" if torch.compile is not _REAL_COMPILE else False,
                        **optimiser_configs())
    net, pose = module.net, module.pose_net
    net.encoder.register_forward_hook(
        lambda m, args, feats: [poison("features", f) for f in feats])

    def disparity(m: Any, args: Any, out: dict[str, Any]) -> dict[str, Any]:
        return {**out, "disp": {s: poison("disparity", d) for s, d in out["disp"].items()}}

    net.register_forward_hook(disparity)
    pose.register_forward_hook(lambda m, args, out: (poison("pose_rotation", out[0]),
                                                     poison("pose_translation", out[1])))
    real_forward_losses = FSREModule._forward_losses

    def forward_losses(self: FSREModule, frames: torch.Tensor, frames_aug: torch.Tensor,
                       K: torch.Tensor, inv_K: torch.Tensor, labels: Any) -> Any:
        frames, frames_aug = poison("frames", frames), poison("frames", frames_aug)
        K, inv_K = poison("intrinsics", K), poison("intrinsics", inv_K)
        return real_forward_losses(self, frames, frames_aug, K, inv_K, labels)

    module._forward_losses = forward_losses.__get__(module)  # type: ignore[method-assign]
    if module._compiled_step is not None:
        module._compiled_step = torch.compile(forward_losses, dynamic=False)
    return module


def poison_loss_terms(poison: Poison) -> None:
    """Each loss function of the objective returns its term plus that term's poison."""

    def wrap(name: str, stage: str, first_only: bool = False) -> None:
        real: Callable[..., Any] = getattr(objective, name)

        @functools.wraps(real)
        def poisoned(*args: Any, **kwargs: Any) -> Any:
            out = real(*args, **kwargs)
            if first_only:  # (loss, mask)
                return (poison(stage, out[0]), *out[1:])
            return poison(stage, out)

        setattr(objective, name, poisoned)

    wrap("min_reprojection_loss", "photometric", first_only=True)
    wrap("smoothness_loss", "smoothness")
    wrap("segmentation_loss", "segmentation")
    wrap("sgt_loss", "sgt")


def batches() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    K = intrinsics_matrix(H, W, KITTI_INTRINSICS)
    items = []
    for i in range(4):
        frames = torch.rand(3, 3, H, W, generator=g)
        frames[1] = 0.7 * frames[0] + 0.3 * frames[1]
        labels = torch.randint(0, 4, (H, W), generator=g)
        items.append({"frames": frames, "K": K, "inv_K": torch.linalg.inv(K), "labels": labels,
                      "index": i, "name": f"drive {i} l"})
    return DataLoader(items, batch_size=2, shuffle=False, collate_fn=collate)


class PoisonFirstStep(pl.Callback):
    """The value at its stage during the first training step only; weights after each step."""

    def __init__(self, poison: Poison, stage: str, value: float) -> None:
        self.poison, self.stage, self.value = poison, stage, value
        self.weights: list[torch.Tensor] = []
        self._active: Any = None

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self._active = self.poison.set(self.stage, self.value)
            self._active.__enter__()

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule,
                                 optimizer: Any) -> None:
        if self._active is not None:  # after backward: the value has done its work
            self._active.__exit__(None, None, None)
            self._active = None

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.weights.append(flat_weights(module))

    def teardown(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        if self._active is not None:
            self._active.__exit__(None, None, None)
            self._active = None


def flat_weights(module: pl.LightningModule) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def run_case(module: FSREModule, initial: dict[str, torch.Tensor], poison: Poison, stage: str,
             value: str, policy: str, root: str) -> dict[str, Any]:
    module.load_state_dict(initial)
    module.nonfinite = NonFinitePolicy(policy)
    start = flat_weights(module)
    probe = PoisonFirstStep(poison, stage, VALUES[value])
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False,
                         enable_checkpointing=False, callbacks=[probe], enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, inference_mode=False,
                         default_root_dir=root)  # the image panels go to <root>/images
    result: dict[str, Any] = {"stage": stage, "value": value, "policy": policy}
    try:
        trainer.fit(module, train_dataloaders=batches())
        result["outcome"] = "finished"
    except NonFiniteLossError as err:
        result["outcome"] = "stopped"
        result["message"] = str(err)
    result["skipped"] = module.nonfinite.skipped
    logged = trainer.callback_metrics.get("train/skipped_nonfinite")
    result["logged_skipped"] = None if logged is None else float(logged)
    result["steps"] = trainer.global_step
    after_first = probe.weights[0] if probe.weights else flat_weights(module)
    result["first_step_unchanged"] = bool(torch.equal(after_first, start))
    result["second_step_changed"] = len(probe.weights) > 1 and not torch.equal(
        probe.weights[1], after_first)
    result["weights_finite"] = bool(torch.isfinite(flat_weights(module)).all())
    # Graphs Dynamo has compiled so far: the compiled cases ran the compiled step.
    result["graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return result


_REAL_COMPILE = torch.compile


def main(backend: str, root: str) -> int:
    if backend != "eager":
        torch.compile = functools.partial(_REAL_COMPILE, backend=backend,  # type: ignore
                                          fullgraph=True)
    pl.seed_everything(0)
    poison = Poison()
    poison_loss_terms(poison)
    module = poisoned_module(poison)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    for policy in POLICIES:
        for stage, value in CASES:
            print(json.dumps({"start": [stage, value, policy]}), flush=True)
            result = run_case(module, initial, poison, stage, value, policy, root)
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
