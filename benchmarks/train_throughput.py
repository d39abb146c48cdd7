"""End-to-end images/s of `python -m fsre_lightning.train` (data included) next to the pure
step rate of `benchmarks/train_step.py` at the same shape.

    python benchmarks/train_throughput.py --shape 64x192x2 --workers 0 2 --steps 20   # CPU
    python benchmarks/train_throughput.py --device cuda --shape 192x640x12 \\
        --workers 2 4 8 --precision 32 bf16 --steps 150 --warmup 30

Each configuration (shape x precision x workers) trains in its own process on the built-in
synthetic scenes (`data=synthetic`, frame cache on, generated once into `--work-dir`), with
the model, loss and augmentation of a real run: random init, CSV logger, the data module's
loaders (`data.num_workers` persistent workers, pinned memory on CUDA). A callback
(`ThroughputTimer`) stamps every `on_train_batch_start`; after `--warmup` batches the next
`--steps` are timed (the GPU is synchronised at both ends of the window). Left out of the run
so that the window is steady state: validation during fit, the periodic `last.ckpt` and the
progress bar. Printed per configuration:

- images/s of the training loop: images over the window's wall time (epoch ends included:
  the synthetic epoch is 54 steps at batch 12, KITTI's Eigen-Zhou split 3317; "epoch ends"
  counts them);
- ms/batch: the median batch-to-batch interval, split into "ms in step" (median
  `on_train_batch_start` -> `on_train_batch_end`: forward, loss, backward, optimiser, logging;
  on CUDA the host's share only, as the GPU runs asynchronously) and "ms between steps"
  (median `on_train_batch_end` -> next `on_train_batch_start`: fetching the batch from the
  loader, its copy to the device and the device-side colour jitter). A loader that does not
  keep up shows as a growing "ms between steps";
- CPU ms per image of the main process (all its threads: Python, pinning, on CPU the step
  itself) and of the loader's worker processes (from /proc; n/a if they did not persist);
- the step rate of `train_step.py` (forward + loss + backward + Adam on one fixed batch, no
  data, same shape and precision) and the ratio loop / step: 1.00 means the data pipeline and
  Lightning cost the training loop nothing.

`--step-rate` gives the step rate instead of measuring it (e.g. from an earlier run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
# train_step.py's precision names -> Lightning's.
PRECISIONS = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


def parse_shape(text: str) -> tuple[int, int, int]:
    """'192x640x12' -> (height, width, batch)."""
    try:
        h, w, b = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"shape must be HxWxBATCH, got {text!r}") from err
    return h, w, b


# ----------------------------------------------------------------- in the training process
def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pids(trainer: pl.Trainer) -> list[int]:
    """PIDs of the train loader's worker processes (none with num_workers=0)."""
    loader = trainer.train_dataloader
    iterator = getattr(loader, "_iterator", None)
    return [w.pid for w in getattr(iterator, "_workers", [])]


class ThroughputTimer(pl.Callback):
    """Stamps every training batch; times batches [warmup, warmup + steps) and writes a JSON
    summary to `path` at the end of training."""

    def __init__(self, path: str, warmup: int, steps: int) -> None:
        self.path, self.warmup, self.steps = Path(path), int(warmup), int(steps)
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.sizes: list[int] = []
        self.epochs: list[int] = []
        self.marks: list[dict[str, Any]] = []  # CPU counters at the window's two ends

    def _mark(self, trainer: pl.Trainer, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the window holds the device's work, not queued
        pids = worker_pids(trainer)
        self.marks.append({"time": time.perf_counter(), "main_cpu": time.process_time(),
                           "pids": pids,
                           "workers_cpu": sum(process_cpu_seconds(p) for p in pids)})

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if len(self.starts) in (self.warmup, self.warmup + self.steps):
            self._mark(trainer, pl_module.device)
            self.starts.append(self.marks[-1]["time"])
        else:
            self.starts.append(time.perf_counter())
        frames = batch.get("frames") if isinstance(batch, dict) else None
        self.sizes.append(int(frames.shape[0]) if frames is not None else 0)
        self.epochs.append(trainer.current_epoch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.ends.append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.path.write_text(json.dumps(summarise(self.starts, self.ends, self.sizes,
                                                  self.epochs, self.marks, self.warmup,
                                                  self.steps)))


def summarise(starts: list[float], ends: list[float], sizes: list[int], epochs: list[int],
              marks: list[dict[str, Any]], warmup: int, steps: int) -> dict[str, Any]:
    """The figures of the window of batches [warmup, warmup + steps) (see the docstring)."""
    if len(marks) < 2:
        return {"error": f"{len(starts)} batches ran, the window needs {warmup + steps + 1}"}
    lo, hi = warmup, warmup + steps
    images = sum(sizes[lo:hi])
    wall = marks[1]["time"] - marks[0]["time"]
    intervals = [starts[i + 1] - starts[i] for i in range(lo, hi)]
    in_step = [ends[i] - starts[i] for i in range(lo, hi)]
    gaps = [starts[i + 1] - ends[i] for i in range(lo, hi)]
    persisted = marks[0]["pids"] == marks[1]["pids"]
    workers_cpu = marks[1]["workers_cpu"] - marks[0]["workers_cpu"] if persisted else None
    return {
        "images": images, "wall_s": wall,
        "images_per_s": images / wall,
        "batch_ms": statistics.median(intervals) * 1e3,
        "step_ms": statistics.median(in_step) * 1e3,
        "gap_ms": statistics.median(gaps) * 1e3,
        "main_cpu_ms_per_image": (marks[1]["main_cpu"] - marks[0]["main_cpu"]) / images * 1e3,
        "workers": len(marks[0]["pids"]),
        "workers_cpu_ms_per_image": None if workers_cpu is None else workers_cpu / images * 1e3,
        "epoch_boundaries": epochs[hi] - epochs[lo],
    }


# ------------------------------------------------------------------------- parent process
def train_overrides(cfg: dict[str, Any], args: argparse.Namespace, out: Path) -> list[str]:
    """Hydra overrides of one timed training run."""
    h, w, b = cfg["shape"]
    return [
        "data=synthetic", f"data.height={h}", f"data.width={w}", f"data.batch_size={b}",
        f"data.num_workers={cfg['workers']}",
        f"++data.synthetic.num_drives={args.drives}",
        f"++data.synthetic.frames_per_drive={args.frames_per_drive}",
        "model.network.pretrained=false",
        f"model.channels_last={str(bool(args.channels_last)).lower()}",
        f"model.compile={'step' if args.compile else 'false'}",
        f"model.compile_mode={args.compile_mode if args.compile else 'null'}",
        f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"trainer.precision={PRECISIONS[cfg['precision']]}",
        f"trainer.max_steps={args.warmup + args.steps + 1}", "trainer.max_epochs=100000",
        "trainer.check_val_every_n_epoch=100000",  # no validation inside the window
        "trainer.limit_val_batches=1",  # the entry point's validation after fit
        "trainer.enable_model_summary=false",
        "logger=csv", "~callbacks.last_checkpoint", "callbacks.progress_bar=null",
        "+callbacks.throughput._target_=train_throughput.ThroughputTimer",
        f"+callbacks.throughput.path={out}",
        f"+callbacks.throughput.warmup={args.warmup}",
        f"+callbacks.throughput.steps={args.steps}",
        f"name=throughput_w{cfg['workers']}", *args.override,
    ]


def child_env(args: argparse.Namespace, work: Path) -> dict[str, str]:
    env = {**os.environ, "FSRE_DATA_DIR": str(work / "data"),
           "FSRE_OUTPUT_DIR": str(work / "outputs"), "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HERE),
                                          os.environ.get("PYTHONPATH", "")])}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(args.threads)  # the step's threads, as in train_step.py
    return env


def run_training(cfg: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / f"timer_{len(list(work.glob('timer_*.json')))}.json"
    command = [sys.executable, "-m", "fsre_lightning.train", *train_overrides(cfg, args, out)]
    proc = subprocess.run(command, env=child_env(args, work), capture_output=True, text=True,
                          cwd=work)
    if proc.returncode != 0 or not out.is_file():
        return {"error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}"}
    return json.loads(out.read_text())


def measure_step_rate(shape: tuple[int, int, int], precision: str,
                      args: argparse.Namespace) -> float | None:
    """images/s of train_step.py at this shape and precision (its table's median)."""
    h, w, b = shape
    command = [sys.executable, str(HERE / "train_step.py"), "--shape", f"{h}x{w}x{b}",
               "--precision", precision, "--device", args.device, "--rounds", "1",
               "--steps", str(args.step_steps), "--warmup", str(args.step_warmup),
               "--channels-last", str(int(args.channels_last)),
               "--compile", "step" if args.compile else "none",
               "--compile-mode", args.compile_mode]
    if args.device == "cpu":  # as the training runs' OMP_NUM_THREADS (child_env)
        command += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    return parse_step_table(proc.stdout) if proc.returncode == 0 else None


def parse_step_table(text: str) -> float | None:
    """The images/s cell of the first row of train_step.py's table."""
    header: list[str] | None = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None and "images/s" in cells:
            header = cells
        elif header is not None and len(cells) == len(header) and cells[0] != "---":
            try:
                return float(cells[header.index("images/s")])
            except ValueError:
                return None
    return None


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", type=parse_shape, default=[(64, 192, 2)],
                        help="HxWxBATCH, e.g. 192x640x12")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2],
                        help="data.num_workers values")
    parser.add_argument("--precision", nargs="+", choices=sorted(PRECISIONS), default=["32"])
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed batches")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--channels-last", action="store_true", help="model.channels_last")
    parser.add_argument("--compile", action="store_true",
                        help="model.compile=step (the whole training step)")
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune",
                                 "max-autotune-no-cudagraphs"],
                        help="model.compile_mode with --compile (reduce-overhead: CUDA graphs; "
                             "with --precision bf16 --channels-last: trainer=gpu_fast)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--drives", type=int, default=8,
                        help="synthetic drives (all but 2 are training drives)")
    parser.add_argument("--frames-per-drive", type=int, default=110)
    parser.add_argument("--step-rate", type=float,
                        help="train_step.py's images/s, instead of measuring it")
    parser.add_argument("--step-steps", type=int, default=5, help="train_step.py --steps")
    parser.add_argument("--step-warmup", type=int, default=2, help="train_step.py --warmup")
    parser.add_argument("--work-dir", type=Path,
                        help="scenes, caches and runs (kept; default: a temporary folder)")
    parser.add_argument("--override", nargs="*", default=[],
                        help="more Hydra overrides for the training runs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fsre_throughput_") as tmp:
        work = args.work_dir.resolve() if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for shape, precision in itertools.product(args.shape, args.precision):
            step = args.step_rate if args.step_rate is not None else measure_step_rate(
                shape, precision, args)
            print(f"{shape} {precision}: train_step.py {fmt(step)} images/s", file=sys.stderr,
                  flush=True)
            for workers in args.workers:
                cfg = {"shape": shape, "precision": precision, "workers": workers}
                result = run_training(cfg, args, work)
                if "error" in result:
                    print(f"[{cfg}] failed:\n{result['error']}", file=sys.stderr, flush=True)
                else:
                    print(f"{shape} {precision} workers {workers}: "
                          f"{result['images_per_s']:.2f} images/s", file=sys.stderr, flush=True)
                rows.append((cfg, result, step))

    print(f"\ndevice={args.device} torch={torch.__version__} cpu_cores={os.cpu_count()}"
          f"{f' threads={args.threads}' if args.device == 'cpu' else ''} "
          f"timed batches={args.steps} after {args.warmup}")
    print("| shape | precision | workers | images/s (loop) | ms/batch | ms in step | "
          "ms between steps | main CPU ms/image | worker CPU ms/image | epoch ends | "
          "images/s (train_step) | loop / step |")
    print("|" + "---|" * 12)
    for cfg, r, step in rows:
        h, w, b = cfg["shape"]
        label = f"| {h}x{w} b{b} | {cfg['precision']} | {cfg['workers']} |"
        if "error" in r:
            print(f"{label} failed |" + " |" * 8)
            continue
        ratio = r["images_per_s"] / step if step else None
        print(f"{label} {r['images_per_s']:.2f} | {r['batch_ms']:.1f} | {r['step_ms']:.1f} | "
              f"{r['gap_ms']:.1f} | {r['main_cpu_ms_per_image']:.1f} | "
              f"{fmt(r['workers_cpu_ms_per_image'])} | {r['epoch_boundaries']} | "
              f"{fmt(step)} | {fmt(ratio)} |")


if __name__ == "__main__":
    main()
