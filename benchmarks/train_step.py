"""Time one optimisation step of FSREModule (forward + loss + backward + Adam), no data loading.

    python benchmarks/train_step.py --variant full --height 96 --width 320 --batch 4
    python benchmarks/train_step.py --variant ce --profile

Prints median seconds per step, images per second and peak memory (RSS on CPU, max allocated
on CUDA). Compare configurations as ratios within one run on one machine.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from fsre_lightning.geometry import intrinsics_matrix
from fsre_lightning.module import FSREModule

NETWORK = {"_target_": "fsre_lightning.models.FSRENetwork", "encoder": "resnet18"}
POSE = {"_target_": "fsre_lightning.models.PoseNetwork", "encoder": "resnet18"}
# The rows of SPEC section 8 as (network overrides, loss overrides).
VARIANTS = {
    "monodepth2": ({"segmentation": False, "cma_scales": []},
                   {"segmentation_weight": 0.0, "sgt_weight": 0.0}),
    "ce": ({"cma_scales": []}, {"sgt_weight": 0.0}),
    "ce_sgt": ({"cma_scales": []}, {}),
    "ce_cma": ({}, {"sgt_weight": 0.0}),
    "full": ({}, {}),
}


def make_batch(batch: int, height: int, width: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(batch, 3, 3, height, width, generator=g)
    K = intrinsics_matrix(height, width).expand(batch, 4, 4).clone()
    labels = torch.randint(0, 19, (batch, height, width), generator=g)
    out = {"frames": frames, "frames_aug": frames, "K": K, "inv_K": torch.linalg.inv(K),
           "labels": labels}
    return {k: v.to(device) for k, v in out.items()}


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="full")
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--precision", choices=["32", "bf16", "16"], default="32")
    parser.add_argument("--profile", action="store_true", help="print the top operators")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    net_over, loss_over = VARIANTS[args.variant]
    module = FSREModule(network={**NETWORK, **net_over}, pose_network=POSE, loss=loss_over,
                        image_log_every_n_steps=0).to(device)
    if args.channels_last:
        module = module.to(memory_format=torch.channels_last)
    step_module = torch.compile(module) if args.compile else module
    (optimizer,), _ = module.configure_optimizers()
    batch = make_batch(args.batch, args.height, args.width, device)
    dtype = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[args.precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            _, losses = step_module._step(batch)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"variant={args.variant} size={args.height}x{args.width} batch={args.batch} "
          f"device={device} threads={args.threads} precision={args.precision} "
          f"channels_last={args.channels_last} compile={args.compile}")
    print(f"{'s/step (median)':>18} {'images/s':>10} {'peak MiB':>10}")
    print(f"{median:18.3f} {args.batch / median:10.2f} {peak_memory_mib(device):10.0f}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=20))


if __name__ == "__main__":
    main()
