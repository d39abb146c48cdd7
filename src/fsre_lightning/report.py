"""Result tables of a sweep: `python -m fsre_lightning.report <sweep folder | wandb group>`.

Writes report.md, report.csv and abs_rel.png (`fsre_lightning.sweeps.tables`) into the sweep
folder (or --out) and prints the Markdown table, the paper's rows beside ours.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fsre_lightning.config.checks import check_writable
from fsre_lightning.errors import ConfigError
from fsre_lightning.runtime import EXIT_USER_ERROR, report_error
from fsre_lightning.sweeps.tables import ReportError, find_sweep, report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fsre_lightning.report",
        description="Tabulate a sweep (one row per swept value, mean ± std over seeds) as "
                    "Markdown, CSV and a PNG bar chart of AbsRel, beside the paper's rows.")
    parser.add_argument("source", help="sweep folder (outputs/multirun/<name>/<time>), an "
                        "experiment's folder of sweeps (its newest), or a wandb group")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for report.md/.csv/abs_rel.png (default: the sweep)")
    parser.add_argument("--stage", default="after", choices=("after", "before"),
                        help="which metrics.json entry: after training (default) or before")
    parser.add_argument("--outputs", type=Path, default=None,
                        help="where wandb groups are looked up (default $FSRE_OUTPUT_DIR or "
                        "./outputs)")
    parser.add_argument("--no-png", action="store_true", help="skip the bar chart")
    args = parser.parse_args(argv)
    try:
        if args.out is not None:
            check_writable("--out", args.out, folder=True)
        sweep = find_sweep(args.source, args.outputs)
        result = report(sweep, args.out, args.stage, png=not args.no_png)
    except (ReportError, ConfigError) as err:
        report_error("report", err)
        return EXIT_USER_ERROR
    print(result["text"])
    for what, path in result["files"].items():
        print(f"{what}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
