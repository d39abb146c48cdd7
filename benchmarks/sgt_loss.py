"""Benchmark: semantics-guided triplet loss, ours vs the materialised K^2 formulation.

Forward + backward of
  (a) `fsre_lightning.losses.sgt_loss` (shifted slices, closed-form backward), and
  (b) a "materialised" formulation as in the reference code: F.unfold of the normalised
      features into a B x C*K^2 x h*w neighbourhood copy, multiplied with the anchors
      (another B x C x K^2 x h x w tensor), reduced over channels, autograd backward.

Each variant runs in a fresh child process (`--child --variant NAME`), so its peak resident
memory is its own. Reported peak memory = the child's peak RSS (ru_maxrss) at the end minus
its peak RSS right after setup (inputs built, torch loaded): the extra memory that
forward + backward needed on top of the inputs. On CUDA the same difference is taken with
torch.cuda.max_memory_allocated.

    python benchmarks/sgt_loss.py --batch 2 --channels 128 --height 96 --width 320 \
        --kernel 5 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

VOID = 255
VARIANTS = ("ours", "materialised")


def materialised_sgt_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    kernel_size: int = 5,
    margin: float = 0.3,
    threshold: int | None = None,
    border: str = "reference",
) -> torch.Tensor:
    """The same loss through a B x C x K^2 x h x w neighbourhood copy (reference-style);
    `border=reference` pads the labels with -1 (outside-image pixels are negatives)."""
    b, c, h, w = features.shape
    k2 = kernel_size * kernel_size
    p = kernel_size // 2
    t = kernel_size - 1 if threshold is None else threshold
    fh = F.normalize(features, dim=1, eps=1e-12)
    # im2col copy, zero padded: B x C*K^2 x h*w, viewed as B x C x K^2 x h x w.
    neigh = F.unfold(fh, kernel_size, padding=p).view(b, c, k2, h, w)
    cos = (fh.unsqueeze(2) * neigh).sum(dim=1)  # B x K^2 x h x w
    dist = torch.sqrt(torch.clamp(2 - 2 * cos, min=1e-9))
    lab_pad = F.pad(labels, [p, p, p, p], value=-1 if border == "reference" else VOID)
    lab_neigh = lab_pad.unfold(1, kernel_size, 1).unfold(2, kernel_size, 1)
    lab_neigh = lab_neigh.reshape(b, h, w, k2).permute(0, 3, 1, 2)  # B x K^2 x h x w
    anchor = labels.unsqueeze(1)
    valid = anchor != VOID
    pos = ((lab_neigh == anchor) & valid).to(fh.dtype)
    neg = ((lab_neigh != anchor) & (lab_neigh != VOID) & valid).to(fh.dtype)
    n_pos = pos.sum(1)
    n_neg = neg.sum(1)
    boundary = (n_pos >= t) & (n_neg >= t)
    if not bool(boundary.any()):
        return features.sum() * 0
    d_pos = (dist * pos).sum(1)[boundary] / n_pos[boundary]
    d_neg = (dist * neg).sum(1)[boundary] / n_neg[boundary]
    return torch.relu(d_pos - d_neg + margin).mean()


def make_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features and segmentation-like labels: 19 classes in blocks, some void."""
    gen = torch.Generator().manual_seed(args.seed)
    b, c, h, w = args.batch, args.channels, args.height, args.width
    features = torch.randn(b, c, h, w, generator=gen)
    coarse = torch.randint(0, 19, (b, 1, max(1, h // 8), max(1, w // 8)), generator=gen)
    coarse[torch.rand(coarse.shape, generator=gen) < 0.05] = VOID
    labels = F.interpolate(coarse.float(), size=(h, w), mode="nearest")[:, 0].long()
    device = torch.device(args.device)
    return features.to(device).requires_grad_(), labels.to(device)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    from fsre_lightning.losses import sgt_loss

    fn = sgt_loss if args.variant == "ours" else materialised_sgt_loss
    features, labels = make_inputs(args)
    device = features.device
    _sync(device)
    baseline = _peak_bytes(device)

    times = []
    loss = None
    for i in range(args.repeats + 1):  # the first run is a warm-up, not timed
        features.grad = None
        _sync(device)
        start = time.perf_counter()
        loss = fn(features, labels, kernel_size=args.kernel, border=args.border)
        loss.backward()
        _sync(device)
        if i > 0:
            times.append(time.perf_counter() - start)
    peak = _peak_bytes(device)
    assert loss is not None and features.grad is not None
    if args.grad_out:
        torch.save(features.grad.cpu(), args.grad_out)
    print(
        json.dumps(
            {
                "variant": args.variant,
                "loss": loss.item(),
                "times": times,
                "median_s": statistics.median(times),
                "extra_peak_bytes": peak - baseline,
                "baseline_bytes": baseline,
            }
        )
    )


def _child(args: argparse.Namespace, variant: str, grad_out: Path) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--variant",
        variant,
        "--grad-out",
        str(grad_out),
    ]
    for name in ("batch", "channels", "height", "width", "kernel", "repeats", "threads", "seed"):
        cmd += [f"--{name}", str(getattr(args, name))]
    cmd += ["--device", args.device, "--border", args.border]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {variant} failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_parent(args: argparse.Namespace) -> None:
    shape = f"{args.batch} x {args.channels} x {args.height} x {args.width}"
    print(
        f"SGT loss forward+backward, features {shape}, K={args.kernel}, "
        f"device={args.device}, threads={args.threads}, repeats={args.repeats} (+1 warm-up)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        results = {v: _child(args, v, Path(tmp) / f"{v}.pt") for v in VARIANTS}
        grads = {v: torch.load(Path(tmp) / f"{v}.pt") for v in VARIANTS}
    ours, mat = results["ours"], results["materialised"]
    loss_diff = abs(ours["loss"] - mat["loss"])
    # A float64 value of the same loss (ours, untimed, here in the parent) tells rounding apart:
    # the materialised float32 variant carries the rounding noise of the anchor's distance to
    # itself (2 - 2 <F_hat, F_hat> ~ 1e-7 instead of 0).
    from fsre_lightning.losses import sgt_loss

    f64_args = argparse.Namespace(**{**vars(args), "device": "cpu"})
    features, labels = make_inputs(f64_args)
    with torch.no_grad():
        loss64 = sgt_loss(features.double(), labels, kernel_size=args.kernel,
                          border=args.border).item()
    grad_diff = (grads["ours"] - grads["materialised"]).abs().max().item()
    grad_scale = grads["materialised"].abs().max().item()

    mib = 1024.0**2
    print()
    print(f"{'variant':<14}{'loss':>12}{'median s':>11}{'min s':>9}{'extra peak MiB':>16}")
    for v in VARIANTS:
        r = results[v]
        print(
            f"{v:<14}{r['loss']:>12.6f}{r['median_s']:>11.3f}{min(r['times']):>9.3f}"
            f"{r['extra_peak_bytes'] / mib:>16.1f}"
        )
    speed_ratio = mat["median_s"] / ours["median_s"]
    mem_ratio = ours["extra_peak_bytes"] / max(1, mat["extra_peak_bytes"])
    print()
    print(f"|loss ours - loss materialised|        = {loss_diff:.3e}")
    for v in VARIANTS:
        diff = abs(results[v]["loss"] - loss64)
        print(f"|loss {v} - float64 loss|{' ' * (16 - len(v))}= {diff:.3e}")
    print(f"max |grad ours - grad materialised|    = {grad_diff:.3e} (max |grad| {grad_scale:.3e})")
    print(f"speed ratio (materialised / ours)      = {speed_ratio:.1f}x")
    print(f"memory ratio (ours / materialised)     = {mem_ratio:.3f}")
    print(
        "extra peak MiB = peak RSS of the variant's own child process after the runs minus its "
        "peak RSS after setup (torch imported, inputs built), i.e. what forward + backward "
        "needed beyond the inputs (CUDA: max_memory_allocated, same difference)."
    )
    checks = {
        "ours < 2 s": ours["median_s"] < 2.0,
        ">= 5x faster": speed_ratio >= 5.0,
        "same loss (< 1e-4)": loss_diff < 1e-4,
    }
    print("targets: " + ", ".join(f"{k}: {'yes' if ok else 'NO'}" for k, ok in checks.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--kernel", type=int, default=5)
    parser.add_argument("--border", choices=("reference", "exclude"), default="reference")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", choices=VARIANTS, default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grad-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
