"""Export a split's ground truth: `python -m fsre_lightning.export_gt [overrides]`.

    python -m fsre_lightning.export_gt data.root=/data/kitti_raw split=eigen
    python -m fsre_lightning.export_gt split=eigen_benchmark annotated_dir=/data/depth_annotated

reads `<split_dir>/test_files.txt` (split_dir defaults to <data_dir>/splits/<split>), takes the
ground truth of every line (the camera of the line's side) and writes all maps, in split
order, to one compressed file (default `<split_dir>/gt_depths.npz`, where KittiDataModule and
`evaluate` look for it). `source` says where the maps come from: the projected velodyne scan
(`fsre_lightning.data.velodyne`) or KITTI's annotated depth PNGs, the improved ground truth
(`fsre_lightning.data.annotated`); `auto` takes the annotated maps for a split folder named
eigen_benchmark. `subset=val` does the same for val_files.txt -> gt_depths_val.npz
(validation with depth metrics). Every input file is located before the first is read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig

from fsre_lightning.config import validate_config
from fsre_lightning.data.annotated import export_annotated_depths
from fsre_lightning.data.kitti_layout import GT_FILE_NAMES, gt_source
from fsre_lightning.data.velodyne import export_gt_depths
from fsre_lightning.errors import DataError
from fsre_lightning.hydra_entry import hydra_command


def run(cfg: DictConfig) -> Path:
    """Export as the config says; returns the written file."""
    validate_config(cfg, "export_gt")
    subset = cfg.subset
    split_dir = Path(cfg.split_dir)
    split_file = split_dir / f"{subset}_files.txt"
    source = gt_source(cfg.source, split_dir, cfg.annotated_dir)
    if not split_file.is_file():
        raise DataError(f"split file {split_file} not found: split={cfg.split} picks "
                        f"{split_dir}; set split_dir= to the folder holding Monodepth2's "
                        f"{subset}_files.txt (e.g. its splits/eigen or splits/eigen_benchmark)")
    output = Path(cfg.output) if cfg.get("output") else split_dir / GT_FILE_NAMES[subset]
    if source == "annotated":
        path = export_annotated_depths(cfg.data.root, split_file, output,
                                       annotated_dir=cfg.annotated_dir, progress=cfg.progress)
    else:
        path = export_gt_depths(cfg.data.root, split_file, output, progress=cfg.progress)
    # What the maps are, beside them: evaluate names it and picks its protocol by it.
    record = path.with_suffix(".json")
    record.write_text(json.dumps({"source": source, "split_file": str(split_file)}) + "\n")
    print(f"wrote the {source} ground truth of {split_file} to {path} (and {record.name})")
    return path


main = hydra_command("export_gt", run)


if __name__ == "__main__":
    sys.exit(main())
