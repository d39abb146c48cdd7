"""Benchmark: the input pipeline per sample, Monodepth2-style decoding vs our caches.

For a KITTI-layout folder at native resolution (by default a generated fixture: one drive of
375 x 1242 random-texture frames, written as PNG and as JPEG, with label-id PNGs and a split
file; or ``--root`` a real folder with ``--split-file``), prints in one run, per source format:

(a) yardstick: the reference data loader's per-sample work, written out here: decode the three
    native frames with PIL, resize each with PIL Lanczos (ANTIALIAS) to 4 scales (192 x 640,
    96 x 320, 48 x 160, 24 x 80, each from the previous one as Monodepth2 does), colour-jitter
    every scale image with torchvision's ColorJitter (p = 0.5, one parameter draw per sample)
    and convert the plain and jittered images to tensors. Samples/s on one core.
(b) our frame cache build (decode + Lanczos resize + write, `build_frame_cache`, one thread):
    frames/s.
(c) our steady-state read: samples/s through KittiDataset + DataLoader (num_workers=0, torch
    threads 1) from the frame and label caches (three frame rows + a label row, to float,
    random flips, intrinsics, collate into batches), after one warm-up epoch; the rate of
    KittiDataset items alone (no collate, like (a)) is printed beside it.
(d) what the device adds per sample, measured here on the CPU (one thread): the data module's
    ``on_after_batch_transfer`` colour jitter (kornia, p = 0.5) plus the image pyramid the
    objective builds (2x, 4x, 8x box downsampling of frame 0 for the smoothness term); then
    the per-core rate counting (c) + (d).

(e) what a DataLoader worker process spends per sample: the training loader itself
    (`KittiDataModule.train_dataloader`: resumable sampler, per-sample seeding, persistent
    workers) with ``--workers`` worker processes, over several epochs after a warm-up one. The
    workers' CPU time (from /proc) per sample covers the cache reads, flips, intrinsics, labels,
    collate and the move of each batch into shared memory; the main process's CPU time per
    sample is what receiving the batches costs it. From the workers' figure: the workers needed
    for ``--target-rate`` images/s with ``--headroom`` (benchmarks/README.md, "Keeping the GPU
    fed"). Also says whether the same worker processes served every epoch (persistent_workers).

The acceptance figure is the ratio (c)+(d) over (a) for PNG at 192 x 640.

    python benchmarks/data_pipeline.py [--frames 14] [--epochs 20] [--height 192 --width 640]
    python benchmarks/data_pipeline.py --root /data/kitti_raw --split-file train_files.txt
    python benchmarks/data_pipeline.py --only-workers --frames 50 --workers 1   # (e) alone
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import ColorJitter
from torchvision.transforms import functional as TF

from fsre_lightning.data import KittiDataModule
from fsre_lightning.data.dataset import collate
from fsre_lightning.data.kitti_layout import read_split, resolve_images
from fsre_lightning.objective import downsample_image

NATIVE = (375, 1242)
DRIVE = "2011_09_26/2011_09_26_drive_0001_sync"
REFERENCE_SCALES = 4


# --------------------------------------------------------------------------- fixture
def texture(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Smooth random colour blobs plus sensor-like noise: compresses roughly like a photo."""
    coarse = rng.integers(0, 256, (size[0] // 12, size[1] // 12, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size[1], size[0]), Image.BICUBIC))
    noise = rng.normal(0.0, 8.0, (*size, 3))
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def make_fixture(folder: Path, frames: int, ext: str, seed: int = 0) -> tuple[Path, Path]:
    """One drive of `frames` native-size frames (and label ids) in the KITTI layout."""
    rng = np.random.default_rng(seed)
    root = folder / ext
    for f in range(frames):
        path = root / DRIVE / "image_02" / "data" / f"{f:010d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(texture(rng, NATIVE))
        # Monodepth2's README converts with ImageMagick's default JPEG quality, 92.
        img.save(path, **({"quality": 92} if ext == "jpg" else {}))
        label = root / "segmentation" / DRIVE / "image_02" / f"{f:010d}.png"
        label.parent.mkdir(parents=True, exist_ok=True)
        ids = rng.choice(np.array([7, 8, 11, 21, 23, 26], np.uint8), (NATIVE[0] // 25, 1))
        Image.fromarray(np.repeat(np.repeat(ids, 25, 0), NATIVE[1], 1)).save(label)
    split_dir = root / "splits"
    split_dir.mkdir(parents=True)
    split = split_dir / "train_files.txt"
    split.write_text("".join(f"{DRIVE} {f} l\n" for f in range(1, frames - 1)))
    return root, split


# --------------------------------------------------------------------------- (a) yardstick
def reference_sample(paths: list[Path], size: tuple[int, int], jitter: ColorJitter,
                     rng: np.random.Generator) -> dict[tuple[int, str, int], torch.Tensor]:
    """Monodepth2's get_item image work for one sample (frames -1, 0, +1), written out."""
    out = {}
    do_aug = rng.random() < 0.5
    if do_aug:
        order, b, c, s, h = ColorJitter.get_params(jitter.brightness, jitter.contrast,
                                                   jitter.saturation, jitter.hue)
    for n, path in enumerate(paths):
        with Image.open(path) as img:
            image = img.convert("RGB")
        for i in range(REFERENCE_SCALES):
            image = image.resize((size[1] // 2**i, size[0] // 2**i), Image.LANCZOS)
            aug = image
            if do_aug:
                for fn in order.tolist():
                    if fn == 0:
                        aug = TF.adjust_brightness(aug, b)
                    elif fn == 1:
                        aug = TF.adjust_contrast(aug, c)
                    elif fn == 2:
                        aug = TF.adjust_saturation(aug, s)
                    else:
                        aug = TF.adjust_hue(aug, h)
            out[(n, "plain", i)] = TF.to_tensor(image)
            out[(n, "aug", i)] = TF.to_tensor(aug)
    return out


def time_yardstick(image_paths: list[list[Path]], size: tuple[int, int], repeats: int) -> float:
    jitter = ColorJitter(0.2, 0.2, 0.2, 0.1)
    rng = np.random.default_rng(0)
    reference_sample(image_paths[0], size, jitter, rng)  # warm-up (file cache, imports)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for paths in image_paths:
            reference_sample(paths, size, jitter, rng)
        times.append((time.perf_counter() - start) / len(image_paths))
    return 1.0 / statistics.median(times)


# --------------------------------------------------------------------------- (b), (c)
def make_dm(root: Path, split: Path, cache_dir: Path, size: tuple[int, int], batch: int,
            labels: bool) -> KittiDataModule:
    split_name = split.stem.removesuffix("_files")
    return KittiDataModule(root, split.parent, height=size[0], width=size[1], batch_size=batch,
                           num_workers=0, use_labels=labels, label_format="label_ids",
                           frame_cache=True, cache_dir=cache_dir, cache_workers=1,
                           train_split=split_name, pin_memory=False)


def time_cache_build(dm: KittiDataModule) -> tuple[float, int]:
    """Frames/s of the frame cache build (one thread), from a data module without labels."""
    start = time.perf_counter()
    dataset = dm.build_dataset("train")
    elapsed = time.perf_counter() - start
    assert dataset.frame_rows is not None
    frames = len(dataset.frame_rows.cache)
    return frames / elapsed, frames


def time_cached_reads(dm: KittiDataModule, epochs: int) -> tuple[float, float]:
    """Samples/s through DataLoader + collate, and through KittiDataset.__getitem__ alone."""
    dataset = dm.build_dataset("train")
    loader = torch.utils.data.DataLoader(dataset, batch_size=dm.batch_size, shuffle=True,
                                         num_workers=0, collate_fn=collate)
    for _ in loader:  # warm-up epoch: page cache, first mappings
        pass
    start = time.perf_counter()
    samples = 0
    for _ in range(epochs):
        for batch in loader:
            samples += batch["frames"].shape[0]
    with_collate = samples / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(epochs):
        for i in range(len(dataset)):
            dataset[i]
    return with_collate, epochs * len(dataset) / (time.perf_counter() - start)


# --------------------------------------------------------------------------- (d)
def time_device_side(dm: KittiDataModule, batch: int, size: tuple[int, int],
                     repeats: int) -> float:
    """Seconds per sample of on_after_batch_transfer's jitter + the objective's pyramid."""
    dm.trainer = SimpleNamespace(training=True)  # the hook jitters only while training
    frames = torch.rand(batch, 3, 3, *size)
    torch.manual_seed(0)  # the same jitter draws in every run
    times = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        out = dm.on_after_batch_transfer({"frames": frames}, 0)
        target = out["frames"][:, 0]
        for s in (1, 2, 3):
            downsample_image(target, s)
        if r:  # the first call is a warm-up
            times.append(time.perf_counter() - start)
    dm.trainer = None
    return statistics.mean(times) / batch  # mean: the expected cost over jitter draws


# --------------------------------------------------------------------------- (e)
def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_worker_reads(dm: KittiDataModule, workers: int, epochs: int,
                      rounds: int) -> dict[str, float | bool]:
    """Per-sample CPU ms in the loader's worker processes and in the main process (medians
    over `rounds` rounds of `epochs` epochs), samples/s, and whether the workers persisted."""
    dm.num_workers = workers
    dm.datasets["train"] = dm.build_dataset("train")
    loader = dm.train_dataloader()
    for _ in loader:  # warm-up epoch: starts the workers, maps the caches
        pass
    iterator = loader._iterator  # persistent workers: the loader keeps its iterator
    pids = [w.pid for w in getattr(iterator, "_workers", [])]
    epoch, rates, worker_ms, main_ms = 1, [], [], []
    for _ in range(rounds):
        workers_cpu = sum(process_cpu_seconds(p) for p in pids)
        main_cpu, start = time.process_time(), time.perf_counter()
        samples = 0
        for _ in range(epochs):
            loader.epoch_sampler.set_epoch(epoch)  # what Lightning does at each epoch start
            epoch += 1
            for batch in loader:
                samples += batch["frames"].shape[0]
        # The sampler is exhausted at an epoch's end: the workers' time is these samples' only.
        rates.append(samples / (time.perf_counter() - start))
        worker_ms.append((sum(process_cpu_seconds(p) for p in pids) - workers_cpu)
                         / samples * 1e3)
        main_ms.append((time.process_time() - main_cpu) / samples * 1e3)
    persisted = bool(pids) and loader._iterator is iterator and pids == [
        w.pid for w in loader._iterator._workers]
    dm.teardown("fit")  # ends the persistent workers
    return {"rate": statistics.median(rates), "worker_ms": statistics.median(worker_ms),
            "main_ms": statistics.median(main_ms), "persisted": persisted}


def workers_needed(images_per_s: float, worker_ms: float, headroom: float) -> int:
    """Worker processes that produce `images_per_s` x `headroom` at `worker_ms` CPU ms each."""
    return max(1, math.ceil(images_per_s * worker_ms / 1e3 * headroom))


def report_workers(dm: KittiDataModule, args: argparse.Namespace) -> dict[str, float | bool]:
    e = time_worker_reads(dm, args.workers, args.epochs, args.worker_rounds)
    print(f"  (e) in {args.workers} loader worker process(es) (persistent, {args.epochs} epochs "
          f"x {args.worker_rounds} rounds): {e['rate']:.1f} samples/s wall;\n"
          f"      CPU per sample: workers {e['worker_ms']:.2f} ms, main process "
          f"{e['main_ms']:.2f} ms; same worker processes in every epoch: {e['persisted']}")
    need = workers_needed(args.target_rate, float(e["worker_ms"]), args.headroom)
    print(f"      {args.target_rate:.0f} images/s take "
          f"{args.target_rate * float(e['worker_ms']) / 1e3:.2f} cores of workers and "
          f"{args.target_rate * float(e['main_ms']) / 1e3:.2f} of the main process; with "
          f"{args.headroom}x headroom: num_workers >= {need} (cores as fast as this one's)")
    return e


# --------------------------------------------------------------------------- main
def run_format(label: str, root: Path, split: Path, work: Path, size: tuple[int, int],
               args: argparse.Namespace) -> dict[str, float]:
    entries = read_split(split)
    image_paths = resolve_images(root, entries, [0, -1, 1], "auto", split.stem)
    files = sorted({p for row in image_paths for p in row})
    mean_kb = statistics.mean(p.stat().st_size for p in files) / 1e3
    print(f"\n[{label}] {len(entries)} samples, {len(files)} frames, "
          f"mean file {mean_kb:.0f} kB, native {Image.open(files[0]).size}")

    a = time_yardstick(image_paths, size, args.repeats)
    print(f"  (a) yardstick (PIL decode + 4 Lanczos scales + ColorJitter + to_tensor): "
          f"{a:8.2f} samples/s/core")
    cache_dir = work / f"cache_{label}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    b, n_frames = time_cache_build(make_dm(root, split, cache_dir, size, args.batch_size,
                                           labels=False))
    print(f"  (b) frame cache build (decode + Lanczos + write, 1 thread):             "
          f"{b:8.2f} frames/s/core   ({n_frames} frames)")
    # the same frame cache, plus the label cache (built here, untimed)
    dm = make_dm(root, split, cache_dir, size, args.batch_size, labels=not args.no_labels)
    c, c_items = time_cached_reads(dm, args.epochs)
    print(f"  (c) cached reads through KittiDataset/DataLoader (workers 0, 1 thread):   "
          f"{c:8.1f} samples/s/core   (items alone, no collate: {c_items:.1f})")
    d = time_device_side(dm, args.batch_size, size, args.device_repeats)
    print(f"  (d) device-side jitter + pyramid, on CPU:                              "
          f"{d * 1e3:8.2f} ms/sample")
    combined = 1.0 / (1.0 / c + d)
    print(f"      ours per core, (c) + (d):                                          "
          f"{combined:8.1f} samples/s/core   = {combined / a:.1f}x the yardstick")
    e = report_workers(dm, args) if args.workers else {}
    return {"a": a, "b": b, "c": c, "c_items": c_items, "d": d, "combined": combined,
            **{f"e_{k}": float(v) for k, v in e.items()}}


def run_workers_only(root: Path, split: Path, work: Path, size: tuple[int, int],
                     args: argparse.Namespace) -> None:
    """(e) alone: build the caches (untimed), then time the loader's worker processes."""
    print(f"\n[{root.name}] {len(read_split(split))} samples")
    dm = make_dm(root, split, work / "cache_workers", size, args.batch_size,
                 labels=not args.no_labels)
    report_workers(dm, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="a real KITTI raw folder (with --split-file)")
    parser.add_argument("--split-file", type=Path, help="split file for --root")
    parser.add_argument("--frames", type=int, default=14, help="fixture frames (samples + 2)")
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=20, help="timed epochs for (c)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes for (a)")
    parser.add_argument("--device-repeats", type=int, default=20,
                        help="timed batches for (d) (p = 0.5 jitter: average many draws)")
    parser.add_argument("--no-labels", action="store_true", help="(c) without the label cache")
    parser.add_argument("--workers", type=int, default=1,
                        help="loader worker processes for (e) (0: skip (e))")
    parser.add_argument("--worker-rounds", type=int, default=3,
                        help="rounds of --epochs epochs for (e) (medians are printed)")
    parser.add_argument("--target-rate", type=float, default=186.0,
                        help="images/s the workers must produce (issue 21: 12 images per "
                             "0.065 s step)")
    parser.add_argument("--headroom", type=float, default=1.5)
    parser.add_argument("--only-workers", action="store_true",
                        help="only (e), on the PNG fixture or --root")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = (args.height, args.width)
    print(f"input {size[0]} x {size[1]}, batch {args.batch_size}, torch threads "
          f"{torch.get_num_threads()}; timings on this machine's CPU")
    with tempfile.TemporaryDirectory(prefix="fsre_pipeline_") as tmp:
        work = Path(tmp)
        results = {}
        if args.root is not None and args.split_file is None:
            parser.error("--root needs --split-file")
        if args.only_workers:
            if args.root is None:
                root, split = make_fixture(work / "fixture", args.frames, "png")
            else:
                root, split = args.root, args.split_file
            run_workers_only(root, split, work, size, args)
            return
        if args.root is not None:
            results["root"] = run_format("root", args.root, args.split_file, work, size, args)
        else:
            for ext in ("png", "jpg"):
                root, split = make_fixture(work / "fixture", args.frames, ext)
                results[ext] = run_format(ext, root, split, work, size, args)
    key = "png" if "png" in results else "root"
    ratio = results[key]["combined"] / results[key]["a"]
    print(f"\nacceptance ({key}, {size[0]} x {size[1]}): ours (c)+(d) / yardstick (a) = "
          f"{ratio:.1f}x (target >= 4x)")


if __name__ == "__main__":
    main()
