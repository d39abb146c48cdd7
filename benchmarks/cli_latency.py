"""How long each console command takes to answer `--help`, `--cfg job` and a usage error, run
from a wheel installed outside the repository (what a user gets from `pip install`).

    python benchmarks/cli_latency.py [--repeats 3] [--wheel-dir /tmp/wheel]

Builds the wheel (`pip wheel --no-deps`), installs it with `pip install --no-deps --target` into
a temporary folder (its console scripts included), and runs every case there with this
environment's dependencies, from an empty working directory, `--repeats` times; prints the
median wall time per case and the exit status. No case may need torch or Lightning: help, usage
errors, config printing and config checks import them only when work starts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# command -> {case: arguments}. "usage error" is a mistake the command answers in one line.
CASES: dict[str, dict[str, list[str]]] = {
    "fsre-train": {"--help": ["--help"], "--cfg job": ["--cfg", "job"],
                   "usage error": ["loss.sgt_kernel_size=4"]},
    "fsre-evaluate": {"--help": ["--help"], "--cfg job": ["ckpt_path=x.ckpt", "--cfg", "job"],
                      "usage error": []},
    "fsre-evaluate-pose": {"--help": ["--help"],
                           "--cfg job": ["ckpt_path=x.ckpt", "odom_root=o", "--cfg", "job"],
                           "usage error": []},
    "fsre-predict": {"--help": ["--help"],
                     "--cfg job": ["ckpt_path=x.ckpt", "input=a.png", "--cfg", "job"],
                     "usage error": []},
    "fsre-export": {"--help": ["--help"], "--cfg job": ["ckpt_path=x.ckpt", "--cfg", "job"],
                    "usage error": []},
    "fsre-export-gt": {"--help": ["--help"], "--cfg job": ["--cfg", "job"],
                       "usage error": ["subset=train"]},
    "fsre-prepare-kitti": {"--help": ["--help"], "--cfg job": ["--cfg", "job"],
                           "usage error": ["data=synthetic"]},
    "fsre-import-reference": {"--help": ["--help"], "usage error": []},
    "fsre-export-reference": {"--help": ["--help"], "usage error": []},
    "fsre-pseudolabel": {"--help": ["--help"], "usage error": []},
    "fsre-report": {"--help": ["--help"], "usage error": []},
}


def install_wheel(target: Path, wheel_dir: Path) -> Path:
    """The wheel of this checkout, installed without its dependencies into `target`."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(wheel_dir), str(ROOT)], check=True)
    (wheel,) = sorted(wheel_dir.glob("fsre_lightning-*.whl"))[-1:]
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True)
    return target


def time_case(script: Path, args: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(script), *args], env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    return time.perf_counter() - start, result.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wheel-dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        target = install_wheel(tmp_path / "site", args.wheel_dir or tmp_path / "wheel")
        work = tmp_path / "work"
        work.mkdir()
        # The installed copy first: the checkout's own (editable) install must not answer.
        env = {**os.environ, "PYTHONPATH": str(target), "WANDB_MODE": "disabled",
               "FSRE_OUTPUT_DIR": str(work / "outputs"), "FSRE_DATA_DIR": str(work / "data")}
        print("| command | case | median s | exit status |\n|---|---|---:|---:|")
        worst = 0.0
        for command, cases in CASES.items():
            script = target / "bin" / command
            for case, case_args in cases.items():
                runs = [time_case(script, case_args, env, work) for _ in range(args.repeats)]
                median = statistics.median(t for t, _ in runs)
                worst = max(worst, median)
                print(f"| {command} | {case} | {median:.2f} | {runs[0][1]} |", flush=True)
        print(f"\nslowest case: {worst:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
