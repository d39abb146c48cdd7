"""Reports that say what they show (issue 29): a single run is a one-row table, every row names
the data it was measured on, the chart's bars carry their values and its legend stays clear of
them, and a wandb group is found without its random tag when that is unambiguous."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fsre_lightning import report as report_cli
from fsre_lightning.sweeps import tables


def _member(folder: Path, overrides: list[str], abs_rel: float, data: dict) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / "config.yaml").write_text(yaml.safe_dump({"name": "table1b", "seed": 0,
                                                        "data": data}))
    (folder / "metrics.json").write_text(json.dumps({"after": {"abs_rel": abs_rel}}))


SYNTHETIC = {"_target_": "fsre_lightning.data.KittiDataModule", "split_dir": "s",
             "synthetic": {"num_drives": 3}}
KITTI = {"_target_": "fsre_lightning.data.KittiDataModule", "split_dir": "/d/eigen_zhou",
         "synthetic": None}


def test_a_single_run_folder_is_a_one_row_table(tmp_path: Path, capsys) -> None:
    run = tmp_path / "outputs" / "train" / "2026-01-01_00-00-00_abc123"
    _member(run, ["seed=0"], 0.25, SYNTHETIC)
    assert report_cli.main([str(run), "--no-png"]) == 0
    text = (run / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| table1b")]
    assert rows == ["| table1b | synthetic scenes, val | 1 | 0.2500 | - | - | - | - | - | - "
                    "| - |"]
    assert text.splitlines()[2].startswith(f"Run `{run}`: 1 run(s)")


def test_rows_name_their_data_and_the_chart_labels_bars_and_keeps_its_legend_clear(
        tmp_path: Path) -> None:
    sweep = tmp_path / "multirun" / "table1b" / "2026-01-01_00-00-00_abc123"
    for i, (variant, abs_rel, data) in enumerate((("baseline", 0.62, SYNTHETIC),
                                                  ("full", 0.11, KITTI))):
        _member(sweep / str(i), [f"+variant={variant}"], abs_rel, data)
    result = tables.report(sweep, png=False)
    assert "| Monodepth2 (baseline) (variant=baseline) | synthetic scenes, val | 1 |" in \
        result["text"]
    assert "| full (CE + SGT + CMA) (variant=full) | KITTI eigen_zhou val | 1 |" in result["text"]
    assert "| paper: full (CE + SGT + CMA) | KITTI Eigen test |" in result["text"]
    fig = tables.chart("table1b", result["rows"])
    fig.canvas.draw()
    ax = fig.axes[0]
    values = sorted(t.get_text() for t in ax.texts if t.get_text())
    assert values == ["0.105", "0.110", "0.114", "0.620"]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "ours (synthetic scenes, val, KITTI eigen_zhou val)", "paper (KITTI Eigen test)"]
    box = legend.get_window_extent()
    assert not any(box.overlaps(bar.get_window_extent()) for bar in ax.patches)


def test_a_wandb_group_without_its_tag_is_found_when_unambiguous(tmp_path: Path) -> None:
    root = tmp_path / "multirun" / "ablation_h"
    _member(root / "2026-01-01_00-00-00_abc123" / "0", ["seed=0"], 0.3, SYNTHETIC)
    assert tables.find_sweep("ablation_h-2026-01-01_00-00-00", tmp_path) == \
        root / "2026-01-01_00-00-00_abc123"
    _member(root / "2026-01-01_00-00-00_def456" / "0", ["seed=0"], 0.3, SYNTHETIC)
    with pytest.raises(tables.ReportError, match="matches 2 sweeps"):
        tables.find_sweep("ablation_h-2026-01-01_00-00-00", tmp_path)
