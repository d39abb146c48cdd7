"""The package as a user installs it: a wheel (no editable install, no access to the
repository's files) whose console commands train, evaluate, predict and export from any folder,
find the configs inside the package, and take the user's own config folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL_MODEL = ["model.network.encoder=test_resnet", "model.pose_network.encoder=test_resnet",
               "model.network.num_heads=1"]
SMOKE_DATA = ["++data.synthetic.num_drives=3", "++data.synthetic.frames_per_drive=8",
              "++data.synthetic.height=64", "++data.synthetic.width=192", "data.num_workers=0"]


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 900
         ) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def _install_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the sources, install it without its dependencies into a
    fresh virtual environment that borrows them from this one; returns the venv's bin folder."""
    source = tmp_path / "source"
    source.mkdir()
    shutil.copytree(REPO / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(wheels), str(source)], tmp_path, dict(os.environ))
    (wheel,) = wheels.glob("fsre_lightning-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, dict(os.environ))
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True).strip())
    # The dependencies, not this checkout: a path line in a .pth does not run the editable
    # install's own .pth files, so `fsre_lightning` can only come from the wheel.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
          str(wheel)], tmp_path, dict(os.environ))
    return venv / "bin"


@pytest.mark.slow
def test_the_installed_wheel_trains_evaluates_predicts_and_exports(tmp_path: Path) -> None:
    bin_dir = _install_wheel(tmp_path)
    work = tmp_path / "work"  # a user's folder, outside the repository
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FSRE_", "PYTHONPATH", "VIRTUAL_ENV"))}
    env.update(WANDB_MODE="disabled", PATH=f"{bin_dir}:{env.get('PATH', '')}")

    where = _run([str(bin_dir / "python"), "-c", "import fsre_lightning.runtime as r; "
                  "print(r.__file__); print(r.CONFIG_DIR)"], work, env).stdout.split()
    assert all(str(tmp_path / "venv") in line for line in where), where
    assert not any(str(REPO) in line for line in where)

    # The package's configs, with a config folder of the user's own next to its groups.
    (work / "my_configs" / "experiment").mkdir(parents=True)
    (work / "my_configs" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\nname: mine\nloss:\n  sgt_margin: 0.25\n")
    mine = _run(["fsre-train", "--config-dir", "my_configs", "+experiment=mine", "--cfg", "job"],
                work, env).stdout
    assert "_target_: fsre_lightning.module.FSREModule" in mine
    assert "name: mine" in mine and "sgt_margin: 0.25" in mine

    # The full model on timm's tiny test ResNet: what is tested is the installed package.
    _run(["fsre-train", "+experiment=smoke", "logger=csv", *SMALL_MODEL], work, env)
    (run,) = (work / "outputs" / "train").iterdir()
    alone = work / "shared" / "model.ckpt"  # the checkpoint alone, away from its run folder
    alone.parent.mkdir()
    shutil.copy(run / "checkpoints" / "last.ckpt", alone)

    data = [f"data.root={work / 'data_cache' / 'synthetic_smoke'}",
            f"data.cache_dir={work / 'data_cache' / 'cache' / 'synthetic_smoke'}", *SMOKE_DATA]
    scored = _run(["fsre-evaluate", f"ckpt_path={alone}", *data], work, env).stdout
    assert "frames scored" in scored and "64 x 192" in scored

    image = next((work / "data_cache" / "synthetic_smoke").rglob("*.png"))
    _run(["fsre-predict", f"ckpt_path={alone}", f"input={image}", "output=predicted"], work, env)
    assert list((work / "predicted").rglob("*.png"))

    _run(["fsre-export", f"ckpt_path={alone}", "format=torchscript"], work, env)
    assert (alone.parent / "model.torchscript.pt").stat().st_size > 1_000_000
