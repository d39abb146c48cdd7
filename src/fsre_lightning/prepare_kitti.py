"""Make KITTI ready to train on: `python -m fsre_lightning.prepare_kitti [overrides]`.

    python -m fsre_lightning.prepare_kitti data.root=/data/kitti_raw \\
        data.split_dir=/data/splits/eigen_zhou [dry_run=true]

does ahead of training what ``data=kitti data.download=true`` does when training starts
(`fsre_lightning.data.kitti_prepare`): the split files when data.split_dir has none, the drives
and calibration days the splits need from KITTI's archive server, on request the annotated
depth maps, odometry and KITTI 2015 semantics (``data.prepare.extras``), JPEG frames
(``data.prepare.jpeg``) and pseudo-labels (``data.prepare.pseudo_labels``). ``dry_run=true``
lists what would be fetched with its size, and the free disk, and fetches nothing. Run again,
it resumes where it stopped; on a complete root it touches no network.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from fsre_lightning.config import validate_config
from fsre_lightning.hydra_entry import hydra_command

if TYPE_CHECKING:
    from fsre_lightning.data.kitti_prepare import Plan


def run(cfg: DictConfig) -> Plan:
    """Prepare (or with dry_run, plan) as the config says; returns the plan."""
    validate_config(cfg, "prepare_kitti")
    # The work's imports after the checks: a usage error answers without torch.
    from fsre_lightning.data import downloads
    from fsre_lightning.data.kitti_config import KittiDataConfig, data_config
    from fsre_lightning.data.kitti_prepare import format_plan, prepare_kitti
    values: dict[str, Any] = OmegaConf.to_container(cfg.data, resolve=True)  # type: ignore
    values.pop("_target_", None)
    data: KittiDataConfig = data_config(KittiDataConfig, **values)
    plan = prepare_kitti(data, dry_run=cfg.dry_run, progress=cfg.progress and sys.stderr.isatty())
    print(format_plan(plan, dry_run=cfg.dry_run))
    if cfg.dry_run:
        # After the table: the user sees what does not fit.
        downloads.check_free_space(plan.root, plan.disk_needed,
                                   f"the {sum(i.todo for i in plan.items)} archives to unpack")
    else:
        print(f"KITTI is ready under {plan.root}: train with data=kitti data.root={plan.root} "
              f"data.split_dir={data.split_dir}")
    return plan


main = hydra_command("prepare_kitti", run)


if __name__ == "__main__":
    sys.exit(main())
