"""Result tables of a sweep (`python -m fsre_lightning.report`, fsre_lightning.report).

Collects every member's `metrics.json` (the validation metrics after training) and
`.hydra/overrides.yaml`, and writes the paper's layout: one row per swept value, columns the
seven depth metrics and mIoU, mean and spread (sample standard deviation) over seeds when
several seeds ran. Writes `report.md`, `report.csv` and `abs_rel.png` into the sweep folder
(or `--out`), prints the Markdown, and puts the paper's published row (its Tables 1 and 2) under
each of ours where the paper has one. Members that failed (their `failed.json`) are listed with
the error and the command that reruns each; members without either file as not finished.

The source is a sweep folder (`outputs/multirun/<name>/<time>_<tag>`), a single run's folder
(a one-row table), an experiment's folder of sweeps (`outputs/multirun/<name>`: its newest
sweep), or a wandb group (`<name>-<time>_<tag>`, as `logger=wandb` names the group of a sweep;
without the tag when one sweep of that time matches), looked up under `--outputs` (default
$FSRE_OUTPUT_DIR or ./outputs). Every row says which data its metrics were measured on (from
the members' configs), the paper's rows are KITTI's Eigen test.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fsre_lightning.errors import UserError
from fsre_lightning.scoring.conventions import DISPLAY_NAMES, REPORTED_METRICS
from fsre_lightning.sweeps.members import member_folders, read_failure

METRICS = REPORTED_METRICS
HEADERS = DISPLAY_NAMES
SEED_KEY = "seed"
# What the paper's rows were measured on.
PAPER_DATA = "KITTI Eigen test"


def _row(abs_rel: float, sq_rel: float, rmse: float, rmse_log: float, a1: float, a2: float,
         a3: float, **extra: float) -> dict[str, float]:
    return {"abs_rel": abs_rel, "sq_rel": sq_rel, "rmse": rmse, "rmse_log": rmse_log,
            "a1": a1, "a2": a2, "a3": a3, **extra}


# The paper's results (KITTI Eigen test, 192 x 640, ResNet-18 unless said); mIoU on KITTI 2015 as a
# fraction. Per experiment (the run's `name`): the swept key, then value -> (label, metrics).
# The value is the override's value as YAML, re-serialised (see `canonical`); "" = no sweep.
_FULL = _row(0.105, 0.722, 4.547, 0.182, 0.886, 0.964, 0.984, miou=0.566)
_CE_SGT = _row(0.108, 0.755, 4.618, 0.186, 0.882, 0.962, 0.983)
_CE_CMA = _row(0.107, 0.741, 4.586, 0.184, 0.884, 0.962, 0.983)
PAPER: dict[str, tuple[str, dict[str, tuple[str, dict[str, float]]]]] = {
    "table1b": ("variant", {
        "baseline": ("Monodepth2 (baseline)", _row(0.114, 0.864, 4.817, 0.192, 0.875, 0.959,
                                                    0.981)),
        "ce": ("+ L_CE", _row(0.112, 0.823, 4.705, 0.189, 0.879, 0.961, 0.982)),
        "ce_sgt": ("+ L_CE + L_SGT", _CE_SGT),
        "ce_cma": ("+ L_CE + CMA", _CE_CMA),
        "full": ("full (CE + SGT + CMA)", _FULL),
    }),
    "full_hr": ("", {"": ("full, 320 x 1024", _row(0.102, 0.687, 4.366, 0.178, 0.895, 0.967,
                                                   0.984, miou=0.606))}),
    "full_r50": ("", {"": ("full, ResNet-50", _row(0.102, 0.675, 4.393, 0.178, 0.893, 0.966,
                                                   0.984))}),
    "ablation_sgt_layers": ("loss.sgt_scales", {
        "[4, 3, 2, 1]": ("SGT at l 0-3 (s 4..1)", {"abs_rel": 0.108, "sq_rel": 0.757}),
        "[3, 2, 1]": ("SGT at l 1-3 (s 3..1)", {"abs_rel": 0.108, "sq_rel": 0.755}),
        "[3, 2, 1, 0]": ("SGT at l 1-4 (s 3..0)", {"abs_rel": 0.108, "sq_rel": 0.742}),
    }),
    "ablation_k": ("loss.sgt_kernel_size", {
        "3": ("K = 3", {"abs_rel": 0.109}),
        "5": ("K = 5", {"abs_rel": 0.108}),
        "7": ("K = 7", {"abs_rel": 0.110}),
    }),
    "ablation_sgt_border": ("loss.sgt_border", {
        "reference": ("SGT border: reference (published)", _CE_SGT),
        "exclude": ("SGT border: exclude", {}),
    }),
    "ablation_cma": ("model.network.cma_targets", {
        '["depth"]': ("CMA target D", {"abs_rel": 0.108}),
        '["seg"]': ("CMA target S", {"abs_rel": 0.111}),
        '["depth", "seg"]': ("CMA target D,S", {"abs_rel": 0.107}),
    }),
    "ablation_h": ("model.network.num_heads", {
        "1": ("H = 1", {"abs_rel": 0.108, "sq_rel": 0.762}),
        "2": ("H = 2", {"abs_rel": 0.107, "sq_rel": 0.749}),
        "4": ("H = 4", {"abs_rel": 0.107, "sq_rel": 0.741}),
    }),
}


class ReportError(UserError, ValueError):
    """No sweep at the given place, or nothing in it to tabulate."""


@dataclass
class Member:
    """One finished run of a sweep."""

    path: Path
    overrides: dict[str, str]
    metrics: dict[str, float]
    name: str
    seed: int | None
    data: str = "?"


@dataclass
class Row:
    """Runs sharing every swept value but the seed."""

    values: tuple[tuple[str, str], ...]
    members: list[Member] = field(default_factory=list)

    def stats(self, key: str) -> tuple[float | None, float | None]:
        """Mean and sample standard deviation (None with a single run) of one metric."""
        xs = [m.metrics[key] for m in self.members if key in m.metrics
              and math.isfinite(m.metrics[key])]
        if not xs:
            return None, None
        return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None

    @property
    def seeds(self) -> list[int | None]:
        return [m.seed for m in self.members]

    @property
    def data(self) -> str:
        return ", ".join(dict.fromkeys(m.data for m in self.members))


# ---------------------------------------------------------------------------- finding runs
def canonical(value: str) -> str:
    """An override's value in one spelling: `[3,2,1]` and `[3, 2, 1]` match, `0.10` is `0.1`."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, str):
        return parsed
    return json.dumps(parsed)


def parse_overrides(lines: Sequence[str]) -> dict[str, str]:
    """`["+variant=ce", "seed=1"]` -> {"variant": "ce", "seed": "1"} (add/force prefixes go)."""
    out: dict[str, str] = {}
    for line in lines:
        key, sep, value = str(line).partition("=")
        if not sep:
            continue
        out[key.lstrip("+~")] = canonical(value)
    return out


def outputs_dir() -> Path:
    return Path(os.environ.get("FSRE_OUTPUT_DIR", "outputs"))


def find_sweep(source: str, outputs: Path | None = None) -> Path:
    """The sweep folder named by `source` (see the module docstring)."""
    path = Path(source)
    if path.is_dir():
        if member_folders(path) or (path / "metrics.json").is_file():
            return path
        sweeps = sorted(p for p in path.iterdir() if p.is_dir() and member_folders(p))
        if sweeps:
            return sweeps[-1]  # folder names are start times: the newest sorts last
        raise ReportError(f"{path}: neither a run folder (with metrics.json) nor a sweep (member "
                          "folders with metrics.json, in it or in its subfolders)")
    outputs = outputs or outputs_dir()
    root = outputs / "multirun"
    # `logger=wandb` names a sweep's group <name>-<sweep folder>, the folder a start time.
    name, _, stamp = source.rpartition("-")
    while name and not (root / name / stamp).is_dir() and "-" in name:
        name, _, head = name.rpartition("-")
        stamp = f"{head}-{stamp}"
    if name and (root / name / stamp).is_dir():
        return root / name / stamp
    # The group without the random tag that follows the time: accepted when unambiguous.
    name, _, stamp = source.rpartition("-")
    while name:
        matches = sorted((root / name).glob(f"{stamp}_*")) if (root / name).is_dir() else []
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ReportError(f"{source!r} matches {len(matches)} sweeps "
                              f"({', '.join(m.name for m in matches)}): give the whole group "
                              "name, with its tag")
        name, _, head = name.rpartition("-")
        stamp = f"{head}-{stamp}"
    for config in sorted(root.glob("*/*/*/config.yaml")):
        group = (yaml.safe_load(config.read_text()) or {}).get("logger", {}) or {}
        if (group.get("wandb") or {}).get("group") == source:
            return config.parent.parent
    raise ReportError(f"{source!r} is neither a folder nor a wandb group of a sweep under "
                      f"{root} (pass the sweep folder, or --outputs)")


def load_member(path: Path, stage: str = "after") -> Member | None:
    """A member's metrics and overrides, or None when it has no metrics (failed, running)."""
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        return None
    results = json.loads(metrics_file.read_text())
    metrics = {k: float(v) for k, v in (results.get(stage) or {}).items()
               if isinstance(v, int | float)}
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = parse_overrides(yaml.safe_load(overrides_file.read_text()) or []
                                if overrides_file.is_file() else [])
    config_file = path / "config.yaml"
    config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    seed = config.get("seed")
    return Member(path=path, overrides=overrides, metrics=metrics,
                  name=str(config.get("name") or path.parent.parent.name),
                  seed=int(seed) if isinstance(seed, int) else None,
                  data=data_label(config.get("data") or {}))


def data_label(data: dict[str, Any]) -> str:
    """What a run's validation metrics were measured on, from its resolved data config."""
    if not data:
        return "?"
    target = str(data.get("_target_", ""))
    if target.endswith("VideoFolderDataModule"):
        return f"video folder {Path(str(data.get('root', '?'))).name} (val loss)"
    split = Path(str(data.get("split_dir", ""))).name or "?"
    if data.get("synthetic"):
        return "synthetic scenes, val"
    return f"KITTI {split} val"


# ----------------------------------------------------------------------------- the table
def swept_keys(members: Sequence[Member]) -> list[str]:
    """Override keys whose value is not the same in every member, in command-line order."""
    keys: list[str] = []
    for m in members:
        keys += [k for k in m.overrides if k not in keys]
    return [k for k in keys
            if len({m.overrides.get(k) for m in members}) > 1]


def group_rows(members: Sequence[Member]) -> tuple[list[str], list[Row]]:
    """Rows keyed by the swept values except the seed, in the order the sweep ran them."""
    keys = [k for k in swept_keys(members) if k != SEED_KEY]
    rows: dict[tuple[tuple[str, str], ...], Row] = {}
    for m in members:
        values = tuple((k, m.overrides.get(k, "")) for k in keys)
        rows.setdefault(values, Row(values)).members.append(m)
    return keys, list(rows.values())


def paper_row(experiment: str, row: Row) -> tuple[str, dict[str, float]] | None:
    """The paper's (label, metrics) for one of our rows, when the paper has it."""
    if experiment not in PAPER:
        return None
    key, rows = PAPER[experiment]
    values = dict(row.values)
    if not key:
        return rows.get("") if not values else None
    if set(values) - {key} or key not in values:
        return None  # other keys swept too: the paper's row fixed them at its defaults
    return rows.get(values[key])


def row_label(experiment: str, row: Row) -> str:
    values = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in row.values)
    paper = paper_row(experiment, row)
    if paper and values:
        return f"{paper[0]} ({values})"
    return (paper[0] if paper else values) or experiment


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def failure_lines(failed: Sequence[tuple[Path, dict[str, Any]]]) -> list[str]:
    """One Markdown line per failed member: its values, the error and the command to rerun."""
    lines = [f"Failed ({len(failed)}):"]
    for path, record in failed:
        values = " ".join(o for o in record.get("overrides", []) if not o.startswith("hydra"))
        lines.append(f"- member {path.name} ({values or 'defaults'}): {record.get('type')}: "
                     f"{record.get('error')}; rerun: `{record.get('rerun', '')}`")
    return [*lines, ""]


def markdown(experiment: str, sweep: Path, rows: Sequence[Row], stage: str,
             missing: Sequence[Path],
             failed: Sequence[tuple[Path, dict[str, Any]]] = ()) -> str:
    runs = sum(len(r.members) for r in rows)
    seeds = sorted({s for r in rows for s in r.seeds if s is not None})
    what = "Run" if (sweep / "metrics.json").is_file() else "Sweep"
    lines = [f"# {experiment}", "",
             f"{what} `{sweep}`: {runs} run(s), seeds {seeds or '-'}; validation metrics "
             f"`{stage}` training on the data each row names, mean ± sample std over seeds "
             f"where several ran. Rows `paper` are the paper's ({PAPER_DATA}, mIoU on KITTI "
             "2015): compare them only with rows measured on KITTI.", ""]
    if failed:
        lines += failure_lines(failed)
    if missing:
        lines += [f"Not finished (no metrics.json): {', '.join(p.name for p in missing)}", ""]
    lines += ["| row | data | runs | " + " | ".join(HEADERS[k] for k in METRICS) + " |",
              "|---|---|---:|" + "---:|" * len(METRICS)]
    for row in rows:
        cells = [_fmt(*row.stats(k)) for k in METRICS]
        lines.append(f"| {row_label(experiment, row)} | {row.data} | {len(row.members)} | "
                     + " | ".join(cells) + " |")
        paper = paper_row(experiment, row)
        if paper:
            cells = [f"{paper[1][k]:.3f}" if k in paper[1] else "-" for k in METRICS]
            lines.append(f"| paper: {paper[0]} | {PAPER_DATA} | | " + " | ".join(cells)
                         + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, experiment: str, keys: Sequence[str], rows: Sequence[Row]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "source", "data", *keys, "runs", "seeds",
                         *(f"{k}{suffix}" for k in METRICS for suffix in ("", "_std"))])
        for row in rows:
            values = dict(row.values)
            stats = [x for k in METRICS for x in row.stats(k)]
            writer.writerow([row_label(experiment, row), "ours", row.data,
                             *(values[k] for k in keys),
                             len(row.members), " ".join(str(s) for s in row.seeds),
                             *("" if x is None else f"{x:.6g}" for x in stats)])
            paper = paper_row(experiment, row)
            if paper:
                writer.writerow([paper[0], "paper", PAPER_DATA, *(values[k] for k in keys), "",
                                 "",
                                 *(x for k in METRICS for x in (paper[1].get(k, ""), ""))])


def bar_chart(path: Path, experiment: str, rows: Sequence[Row]) -> None:
    """`chart` as a PNG."""
    import matplotlib.pyplot as plt

    fig = chart(experiment, rows)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def chart(experiment: str, rows: Sequence[Row]) -> Any:
    """AbsRel per row (error bars: std over seeds) beside the paper's, each bar with its value,
    the data each was measured on in the legend, the legend clear of the bars: a matplotlib
    figure."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters and CI
    import matplotlib.pyplot as plt

    labels = [row_label(experiment, r) for r in rows]
    ours = [r.stats("abs_rel") for r in rows]
    paper = [(paper_row(experiment, r) or ("", {}))[1].get("abs_rel") for r in rows]
    xs = list(range(len(rows)))
    with_paper = any(p is not None for p in paper)
    width = 0.4 if with_paper else 0.8
    data = ", ".join(dict.fromkeys(r.data for r in rows))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(rows) + 2.5), 4.5))
    bars = ax.bar([x - (width / 2 if with_paper else 0) for x in xs],
                  [m if m is not None else math.nan for m, _ in ours], width,
                  yerr=[s or 0.0 for _, s in ours] if any(s for _, s in ours) else None,
                  capsize=3, label=f"ours ({data})")
    ax.bar_label(bars, labels=[f"{m:.3f}" if m is not None else "" for m, _ in ours],
                 fontsize=7, padding=2)
    if with_paper:
        bars = ax.bar([x + width / 2 for x in xs],
                      [p if p is not None else math.nan for p in paper], width,
                      color="lightgray", edgecolor="black", label=f"paper ({PAPER_DATA})")
        ax.bar_label(bars, labels=[f"{p:.3f}" if p is not None else "" for p in paper],
                     fontsize=7, padding=2)
    top = max([m + (s or 0) for m, s in ours if m is not None]
              + [p for p in paper if p is not None] + [0.0])
    ax.set_ylim(0, top * 1.15 or 1.0)  # room for the values above the bars
    # Above the axes, not over the bars.
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.02), ncol=2, fontsize=8, frameon=False)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("AbsRel (lower is better)")
    ax.set_title(experiment, pad=28)
    fig.tight_layout()
    return fig


def report(sweep: Path, out: Path | None = None, stage: str = "after",
           png: bool = True) -> dict[str, Any]:
    """Write report.md, report.csv (and abs_rel.png) for one sweep, or one run's folder (a
    one-row table); returns what it wrote."""
    paths = member_folders(sweep)
    if not paths and (sweep / "metrics.json").is_file():
        paths = [sweep]
    loaded = [(p, load_member(p, stage)) for p in paths]
    members = [m for _, m in loaded if m is not None]
    unfinished = [(p, read_failure(p)) for p, m in loaded if m is None]
    failed = [(p, record) for p, record in unfinished if record is not None]
    missing = [p for p, record in unfinished if record is None]
    if members and not any(m.metrics for m in members):
        raise ReportError(f"{sweep}: no member has '{stage}' metrics in its metrics.json"
                          + (" (they exist only for runs trained with eval_before=true)"
                             if stage == "before" else "") + "; nothing written")
    if not members:
        reasons = "".join(f"\n  {line}" for line in failure_lines(failed)[1:-1])
        raise ReportError(f"{sweep}: no member has a metrics.json yet"
                          + (f"; {len(failed)} failed:{reasons}" if failed else ""))
    experiment = members[0].name
    keys, rows = group_rows(members)
    out = out or sweep
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(experiment, sweep, rows, stage, missing, failed)
    written = {"markdown": out / "report.md", "csv": out / "report.csv"}
    written["markdown"].write_text(text)
    write_csv(written["csv"], experiment, keys, rows)
    if png:
        written["png"] = out / "abs_rel.png"
        bar_chart(written["png"], experiment, rows)
    return {"text": text, "rows": rows, "keys": keys, "files": written, "missing": missing,
            "failed": [p for p, _ in failed]}
