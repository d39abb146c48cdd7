"""benchmarks/train_throughput.py: the training loop's images/s, data included."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from fsre_lightning.testing import command_env

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_window_figures_from_batch_stamps() -> None:
    bench = load_script()
    # 1 warm-up batch, then 3 timed ones of 2 images: 0.5 s apart, 0.4 s of each in the step.
    starts = [0.0, 1.0, 1.5, 2.0, 2.5]
    ends = [0.9, 1.4, 1.9, 2.4, 2.9]
    marks = [{"time": 1.0, "main_cpu": 10.0, "pids": [7], "workers_cpu": 3.0},
             {"time": 2.5, "main_cpu": 11.2, "pids": [7], "workers_cpu": 3.06}]
    out = bench.summarise(starts, ends, [2] * 5, [0, 0, 0, 1, 1], marks, warmup=1, steps=3)
    assert out["images"] == 6 and out["images_per_s"] == pytest.approx(4.0)
    assert out["batch_ms"] == pytest.approx(500) and out["step_ms"] == pytest.approx(400)
    assert out["gap_ms"] == pytest.approx(100)
    assert out["main_cpu_ms_per_image"] == pytest.approx(200)
    assert out["workers_cpu_ms_per_image"] == pytest.approx(10)
    assert out["epoch_boundaries"] == 1
    # Other worker processes at the end (not persistent): their CPU time is not comparable.
    marks[1]["pids"] = [8]
    out = bench.summarise(starts, ends, [2] * 5, [0] * 5, marks, warmup=1, steps=3)
    assert out["workers_cpu_ms_per_image"] is None
    assert "error" in bench.summarise(starts[:2], ends[:2], [2] * 2, [0] * 2, marks[:1],
                                      warmup=1, steps=3)


def test_step_rate_is_read_from_train_step_table() -> None:
    bench = load_script()
    table = ("device=cpu threads=2\n"
             "| config | s/step | best s/step | images/s | CPU s/step |\n"
             "|---|---|---|---|---|\n"
             "| full 64x192 b2 optimised fp32 | 0.500 | 0.400 | 4.00 | 1.000 |\n")
    assert bench.parse_step_table(table) == pytest.approx(4.0)
    assert bench.parse_step_table("| config | failed |") is None


@pytest.mark.slow
def test_cpu_run_prints_a_numeric_images_per_second(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--shape", "64x192x2",
         "--workers", "1", "--steps", "1", "--warmup", "1", "--drives", "3",
         "--frames-per-drive", "6", "--step-rate", "2.0", "--work-dir", str(tmp_path),
         "--override", "++data.synthetic.height=64", "++data.synthetic.width=192",
         # The smallest full model, no checkpoint: the plumbing of the script is tested.
         "model.network.encoder=test_resnet", "model.pose_network.encoder=test_resnet",
         "model.network.num_heads=1", "final_checkpoint=none",
         "callbacks.best_checkpoint=null"],
        env=command_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 64x192 b2 ")]
    assert len(rows) == 1, result.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1:3] == ["32", "1"]
    assert float(cells[3]) > 0  # images/s of the loop
    # The worker persisted, so its CPU time is known ("n/a" otherwise). Its value may be 0.00:
    # /proc counts 10 ms ticks, and one timed batch of prefetched tiny frames can use less.
    assert cells[8] != "n/a" and float(cells[8]) >= 0
    assert float(cells[10]) == 2.0 and float(cells[11]) == pytest.approx(
        float(cells[3]) / 2.0, abs=0.01)
