"""Time one optimisation step (forward + loss + backward + Adam) of FSREModule, no data loading.

    python benchmarks/train_step.py                                  # full model, 96 x 320 x 4
    python benchmarks/train_step.py --shape 96x320x4 192x640x2 --objective optimised plain
    python benchmarks/train_step.py --precision 32 bf16 --channels-last 0 1 --checkpointing 0 1
    python benchmarks/train_step.py --compile-loss 0 1              # model.compile_loss
    python benchmarks/train_step.py --precision bf16 --channels-last 1 --compile step \
        --compile-mode reduce-overhead --device cuda                 # trainer=gpu_fast
    python benchmarks/train_step.py --objective reference --reference-dir /tmp/FSRE-Depth
    python benchmarks/train_step.py --profile                        # top operators

Every option takes several values; the script runs every combination. Each configuration runs
in its own child process (so peak RSS is its own), and the configurations are interleaved
over `--rounds` rounds: on a machine shared with other work, load changes hit every
configuration alike, so compare them as ratios within one run. Prints, per configuration, the
median seconds per step over all rounds, images per second, peak memory (whole-process peak
RSS on CPU as in the reference's figures, max allocated on CUDA) and the memory the step adds
on top of the built model.

Objectives:
- ``optimised``: `fsre_lightning.objective.compute_losses` (what training runs);
- ``plain``: `tests/plain_objective.py`, the same loss functions composed the straightforward
  way (per scale and source, identity loss and SSIM target statistics recomputed, every
  intermediate kept), on the same networks: the saving of the loss code alone;
- ``reference``: the published FSRE-Depth code (`TrainerParallel`), given a local checkout in
  `--reference-dir` (ignored in fp32-only / no-option combinations it cannot run). Random
  init, the paper's training options. Two shims let it run on CPU and current torchvision:
  its auto-mask noise calls `.cuda(device)` (mapped to `.to(device)`), and it calls
  `resnet18(pretrained)` positionally (mapped to `weights=None`). Nothing else is changed.
- ``networks``: the same networks (depth encoder and decoders, CMA, both pose pairs) forward
  and backward with a trivial loss (the mean of every output) and the same Adam step: the
  floor that no loss-side optimisation can go below, since the reference runs the same
  convolutions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
NETWORK = {"_target_": "fsre_lightning.models.FSRENetwork", "encoder": "resnet18"}
POSE = {"_target_": "fsre_lightning.models.PoseNetwork", "encoder": "resnet18"}
# The rows of the paper's Table 1b as (network overrides, loss overrides, reference-code options).
VARIANTS: dict[str, tuple[dict, dict, list[str]]] = {
    "monodepth2": ({"segmentation": False, "cma_scales": []},
                   {"segmentation_weight": 0.0, "sgt_weight": 0.0}, ["--no_cma", "--sgt", "0"]),
    "ce": ({"cma_scales": []}, {"sgt_weight": 0.0}, ["--no_cma", "--sgt", "0"]),
    "ce_sgt": ({"cma_scales": []}, {}, ["--no_cma"]),
    "ce_cma": ({}, {"sgt_weight": 0.0}, ["--sgt", "0"]),
    "full": ({}, {}, []),
}
OBJECTIVES = ("optimised", "plain", "reference", "networks")
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
# Named rows (`--preset`): the option sets worth comparing on a GPU, as `trainer=...` sets them.
PRESETS: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "32", "channels_last": 0, "compile": "none", "compile_mode": "default"},
    "bf16": {"precision": "bf16", "channels_last": 0, "compile": "none",
             "compile_mode": "default"},
    "bf16_nhwc": {"precision": "bf16", "channels_last": 1, "compile": "none",
                  "compile_mode": "default"},
    "bf16_nhwc_step": {"precision": "bf16", "channels_last": 1, "compile": "step",
                       "compile_mode": "default"},
    # trainer=gpu_fast
    "gpu_fast": {"precision": "bf16", "channels_last": 1, "compile": "step",
                 "compile_mode": "reduce-overhead"},
}


def parse_shape(text: str) -> tuple[int, int, int]:
    """'96x320x4' -> (height, width, batch)."""
    try:
        h, w, b = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"shape must be HxWxBATCH, got {text!r}") from err
    return h, w, b


def make_batch(batch: int, height: int, width: int, device: torch.device) -> dict[str, Any]:
    from fsre_lightning.data.kitti_layout import KITTI_INTRINSICS
    from fsre_lightning.geometry import intrinsics_matrix

    g = torch.Generator().manual_seed(0)
    frames = torch.rand(batch, 3, 3, height, width, generator=g)
    K = intrinsics_matrix(height, width, KITTI_INTRINSICS).expand(batch, 4, 4).clone()
    labels = torch.randint(0, 19, (batch, height, width), generator=g)
    out = {"frames": frames, "frames_aug": frames, "K": K, "inv_K": torch.linalg.inv(K),
           "labels": labels}
    return {k: v.to(device) for k, v in out.items()}


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# ----------------------------------------------------------------------------- child process
def _ours(cfg: dict[str, Any], device: torch.device) -> tuple[Any, Any]:
    """(step function, optimizer) for our module with the optimised or the plain objective."""
    from fsre_lightning.module import FSREModule
    from fsre_lightning.testing import optimiser_configs

    net_over, loss_over, _ = VARIANTS[cfg["variant"]]
    module = FSREModule(network={**NETWORK, **net_over}, pose_network=POSE, loss=loss_over,
                        image_log_every_n_steps=0, channels_last=cfg["channels_last"],
                        compile=cfg["compile"] if cfg["compile"] != "none" else False,
                        compile_mode=cfg["compile_mode"],
                        gradient_checkpointing=cfg["checkpointing"],
                        compile_loss=cfg["compile_loss"], **optimiser_configs()).to(device)
    (optimizer,), _ = module.configure_optimizers()
    h, w, b = cfg["shape"]
    batch = make_batch(b, h, w, device)
    if cfg["objective"] == "plain":
        from fsre_lightning.testing.plain_objective import plain_compute_losses

        def losses() -> torch.Tensor:
            image = batch["frames_aug"][:, 0]
            if module.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            outputs = module.net(image)
            return plain_compute_losses(outputs, batch["frames"], batch["K"], batch["inv_K"],
                                        module._transforms(batch["frames_aug"]),
                                        batch["labels"], module.loss_cfg)["total"]
    elif cfg["objective"] == "networks":
        def losses() -> torch.Tensor:
            image = batch["frames_aug"][:, 0]
            if module.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            outputs = module.net(image)
            maps = [*outputs["disp"].values(), outputs.get("seg_logits")]
            poses = module._transforms(batch["frames_aug"])
            return sum(t.mean() for t in [*maps, *poses] if t is not None)
    else:
        def losses() -> torch.Tensor:
            if module._cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            _, terms = module._step(batch, train=True)
            # What training does besides: the terms' finiteness as one flag, read once.
            finite.append(torch.isfinite(torch.stack(
                [v.detach().float() for k, v in terms.items() if v.dim() == 0])).all())
            return terms["total"]
    finite: list[torch.Tensor] = []
    losses.finite = finite  # type: ignore[attr-defined]
    return losses, optimizer


def _reference(cfg: dict[str, Any], device: torch.device) -> tuple[Any, Any]:
    """(step function, optimizer) for the published code's TrainerParallel."""
    import torch.nn.functional as F
    import torchvision.models as tvm

    ref = Path(cfg["reference_dir"]).resolve()
    sys.path.insert(0, str(ref))
    # Shims (see the module docstring): CPU noise device, positional `pretrained` argument.
    torch.Tensor.cuda = lambda self, device=None, *a, **k: self.to(device)  # type: ignore
    for name in ("resnet18", "resnet34", "resnet50"):
        original = getattr(tvm, name)
        setattr(tvm, name, lambda pretrained=False, _f=original, **k: _f(weights=None, **k))
    from options import Options  # the reference's own modules
    from trainer_parallel import TrainerParallel

    h, w, b = cfg["shape"]
    argv = ["--data_path", str(ref), "--height", str(h), "--width", str(w),
            "--batch_size", str(b), "--pretrained", "0", *VARIANTS[cfg["variant"]][2]]
    opt = Options().parser.parse_args(argv)
    if cfg["variant"] == "monodepth2":
        opt.semantic_distil = None
    trainer = TrainerParallel(opt).to(device)
    trainer.train()
    optimizer = torch.optim.Adam(trainer.parameters_to_train, opt.learning_rate)
    ours = make_batch(b, h, w, device)
    inputs: dict[Any, torch.Tensor] = {"K": ours["K"], "inv_K": ours["inv_K"],
                                      ("seg", 0, 0): ours["labels"][:, None].float()}
    for i, f in enumerate(opt.frame_ids):
        inputs[("color", f, 0)] = inputs[("color_aug", f, 0)] = ours["frames"][:, i]
    for s in opt.scales[1:]:
        inputs[("color", 0, s)] = F.avg_pool2d(ours["frames"][:, 0], 2**s)

    def losses() -> torch.Tensor:
        return trainer(inputs)[0]["loss"]
    return losses, optimizer


def run_child(cfg: dict[str, Any]) -> None:
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    build = _reference if cfg["objective"] == "reference" else _ours
    losses, optimizer = build(cfg, device)
    dtype = PRECISIONS[cfg["precision"]]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = peak_memory_mib(device) if device.type == "cuda" else _current_rss_mib()
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["precision"] == "16")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            total = losses()
        scaler.scale(total).backward()
        flags = getattr(losses, "finite", None)
        # The training step's one host read (FSREModule.on_before_optimizer_step).
        if flags and not bool(flags.pop()):
            raise FloatingPointError("non-finite loss in the benchmark step")
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(cfg["warmup"]):
        step()
    times, cpu_times = [], []
    for _ in range(cfg["steps"]):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = peak_memory_mib(device)
    print("RESULT " + json.dumps({"times": times, "cpu_times": cpu_times, "peak_mib": peak,
                                  "step_mib": peak - base}), flush=True)
    if cfg["profile"]:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
        sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=cfg["profile_rows"]), flush=True)


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------------------- parent process
def configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.preset:
        return preset_configurations(args)
    out = []
    for variant, shape, objective, precision, cl, comp, mode, ckpt, closs in itertools.product(
            args.variant, args.shape, args.objective, args.precision, args.channels_last,
            args.compile, args.compile_mode, args.checkpointing, args.compile_loss):
        comp = {"0": "none", "1": "step"}.get(comp, comp)
        if comp == "none" and mode != args.compile_mode[0]:
            continue  # the mode means nothing without compilation
        if comp == "step" and objective != "optimised":
            continue  # only the training step of FSREModule is compiled as a whole
        if objective == "reference" and (precision != "32" or cl or comp != "none" or ckpt
                                         or closs):
            continue  # the reference runs as published: fp32, no options
        if closs and objective != "optimised":
            continue  # only the optimised objective calls the compiled photometric maps
        if objective == "reference" and not args.reference_dir:
            raise SystemExit("--objective reference needs --reference-dir (a local checkout)")
        out.append({"variant": variant, "shape": shape, "objective": objective,
                    "precision": precision, "channels_last": bool(cl), "compile": comp,
                    "compile_mode": None if comp == "none" else mode,
                    "checkpointing": bool(ckpt), "compile_loss": bool(closs),
                    "threads": args.threads,
                    "device": args.device, "warmup": args.warmup, "steps": args.steps,
                    "profile": args.profile, "profile_rows": args.profile_rows,
                    "reference_dir": args.reference_dir})
    return out


def preset_configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`--preset` rows of the optimised step, plus fp32 rows of the other `--objective`s."""
    rows: list[dict[str, Any]] = []
    for variant, shape in itertools.product(args.variant, args.shape):
        here = [{"objective": objective, **PRESETS["fp32"]} for objective in args.objective
                if objective != "optimised"]
        here += [{"objective": "optimised", "preset": name, **PRESETS[name]}
                 for name in args.preset]
        rows += [{**row, "variant": variant, "shape": shape} for row in here]
    out = []
    for row in rows:
        if row["objective"] == "reference" and not args.reference_dir:
            raise SystemExit("--objective reference needs --reference-dir (a local checkout)")
        out.append({**row, "channels_last": bool(row["channels_last"]),
                    "compile_mode": None if row["compile"] == "none" else row["compile_mode"],
                    "checkpointing": False, "compile_loss": False, "threads": args.threads,
                    "device": args.device, "warmup": args.warmup, "steps": args.steps,
                    "profile": args.profile, "profile_rows": args.profile_rows,
                    "reference_dir": args.reference_dir})
    return out


def label(cfg: dict[str, Any]) -> str:
    h, w, b = cfg["shape"]
    compiled = "" if cfg["compile"] == "none" else f"compile-{cfg['compile']}" + (
        f"({cfg['compile_mode']})" if cfg["compile_mode"] not in (None, "default") else "")
    opts = [k for k, v in (("nhwc", cfg["channels_last"]), (compiled, compiled),
                           ("ckpt", cfg["checkpointing"]),
                           ("compile-loss", cfg["compile_loss"])) if v]
    return (f"{cfg['variant']} {h}x{w} b{b} {cfg['objective']} "
            f"{'fp' + cfg['precision'] if cfg['precision'] != 'bf16' else 'bf16'}"
            + (" +" + "+".join(opts) if opts else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", nargs="+", choices=sorted(VARIANTS), default=["full"])
    parser.add_argument("--shape", nargs="+", type=parse_shape, default=[(96, 320, 4)],
                        help="HxWxBATCH, e.g. 96x320x4 192x640x2")
    parser.add_argument("--objective", nargs="+", choices=OBJECTIVES, default=["optimised"])
    parser.add_argument("--precision", nargs="+", choices=sorted(PRECISIONS), default=["32"])
    parser.add_argument("--channels-last", nargs="+", type=int, choices=[0, 1], default=[0])
    parser.add_argument("--compile", nargs="+", choices=["0", "1", "none", "networks", "step"],
                        default=["none"], help="model.compile: none, networks, or step (the "
                                               "whole training step; 1 = step)")
    parser.add_argument("--compile-mode", nargs="+", default=["default"],
                        choices=["default", "reduce-overhead", "max-autotune",
                                 "max-autotune-no-cudagraphs"],
                        help="model.compile_mode; reduce-overhead replays CUDA graphs")
    parser.add_argument("--checkpointing", nargs="+", type=int, choices=[0, 1], default=[0],
                        help="gradient checkpointing of the decoder blocks")
    parser.add_argument("--compile-loss", nargs="+", type=int, choices=[0, 1], default=[0],
                        help="model.compile_loss: torch.compile the photometric maps")
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=[],
                        help="named option sets of the optimised step (e.g. fp32 gpu_fast) "
                             "instead of the product of --precision/--channels-last/--compile; "
                             "other --objective values add their fp32 rows")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per round")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds (one child process per config and round)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reference-dir", default=os.environ.get("FSRE_REFERENCE_DIR"),
                        help="checkout of the published FSRE-Depth code (for --objective "
                             "reference)")
    parser.add_argument("--mmap-threshold", type=int, default=None,
                        help="set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in every child, e.g. "
                             "65536: large buffers go back to the OS when freed instead of "
                             "fragmenting the heap (lowers peak RSS; CPU only)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, print the top operators of one step")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(json.loads(args.child))
        return

    configs = configurations(args)
    if args.profile:
        args.rounds = 1
    results: dict[int, dict[str, Any]] = {i: {"times": [], "cpu": [], "peak": [], "step": []}
                                          for i in range(len(configs))}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    for rnd in range(args.rounds):
        for i, cfg in enumerate(configs):
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)],
                                  capture_output=True, text=True, env=env)
            lines = proc.stdout.splitlines()
            result = next((json.loads(x[7:]) for x in lines if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or result is None:
                print(f"[{label(cfg)}] failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            results[i]["times"] += result["times"]
            results[i]["cpu"] += result.get("cpu_times", [])
            results[i]["peak"].append(result["peak_mib"])
            results[i]["step"].append(result["step_mib"])
            print(f"round {rnd + 1}/{args.rounds} {label(cfg)}: "
                  f"{statistics.median(result['times']):.3f} s/step, "
                  f"peak {result['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
            if args.profile:
                print(f"\n== top operators: {label(cfg)}")
                print("\n".join(x for x in lines if not x.startswith("RESULT ")))

    mem = "max alloc MiB" if args.device.startswith("cuda") else "peak RSS MiB"
    print(f"\ndevice={args.device} threads={args.threads} torch={torch.__version__} "
          f"rounds={args.rounds} steps/round={args.steps} (medians over all timed steps)"
          + (f" MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else ""))
    # CPU seconds of the process: on a shared machine they are much less sensitive than wall
    # time to other work (a preempted process accrues wall time, not CPU time). The best step
    # is the figure least affected by other tenants of a shared host (interference only adds).
    header = (f"| config | s/step | best s/step | images/s | CPU s/step | {mem} | step MiB | "
              f"x base s | x base best s | x base mem |")
    print(header)
    print("|" + "---|" * 10)
    rows: dict[int, tuple[float, float, float, float]] = {}
    for i in range(len(configs)):
        r = results[i]
        if r["times"]:
            rows[i] = (statistics.median(r["times"]), min(r["times"]),
                       statistics.median(r["cpu"]), max(r["peak"]))
    for i, cfg in enumerate(configs):
        if i not in rows:
            print(f"| {label(cfg)} | failed |" + " |" * 8)
            continue
        med, best, cpu, peak = rows[i]
        base = rows[_base_index(configs, i, rows)]
        step_mib = statistics.median(results[i]["step"])
        print(f"| {label(cfg)} | {med:.3f} | {best:.3f} | {cfg['shape'][2] / med:.2f} | "
              f"{cpu:.3f} | {peak:.0f} | {step_mib:.0f} | {med / base[0]:.2f} | "
              f"{best / base[1]:.2f} | {peak / base[3]:.2f} |")
    print("x base: relative to the reference code's row of the same variant and shape where it "
          "was measured, otherwise to the first row.")


def _base_index(configs: list[dict[str, Any]], i: int, rows: dict[int, Any]) -> int:
    """The row a configuration is compared with: the reference code at its variant and shape."""
    for j, other in enumerate(configs):
        if (j in rows and other["objective"] == "reference"
                and other["variant"] == configs[i]["variant"]
                and other["shape"] == configs[i]["shape"]):
            return j
    return min(rows)


if __name__ == "__main__":
    main()
