"""`export_reference`: a trained checkpoint written as a published FSRE-Depth / Monodepth2
release folder, read back by the release loader with the same outputs, and one-line errors for
checkpoints, networks and folders it cannot export."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fsre_lightning.export_reference import main
from fsre_lightning.module import FSREModule
from fsre_lightning.reference import ReferenceRelease, load_reference_release
from fsre_lightning.testing import run_main
from fsre_lightning.testing.tiny_checkpoints import POSE, make_run, network, save_checkpoint
from fsre_lightning.trained import load_module

SIZE = (64, 192)
# One worker builds the module's ResNet-18 checkpoints (~150 MB each) once for all its tests.
pytestmark = pytest.mark.xdist_group("export_reference")
CMA_FILES = ["decoder.pth", "encoder.pth", "opt.json", "pose.pth", "pose_encoder.pth"]
PREFIX = "fsre_lightning.export_reference: error: "


def with_trained_statistics(ckpt: Path) -> Path:
    """Non-trivial BatchNorm statistics (a swapped or dropped buffer changes the outputs) and
    the training size stored in the checkpoint as well as in the run's config.yaml."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(3)
    for key, value in checkpoint["state_dict"].items():
        if key.endswith("running_mean"):
            value.normal_(0.0, 0.1, generator=g)
        elif key.endswith("running_var"):
            value.uniform_(0.5, 2.0, generator=g)
    checkpoint["input_size"] = list(SIZE)
    torch.save(checkpoint, ckpt)
    return ckpt


@pytest.fixture(scope="module")
def fsre_ckpt(module_tmp: Callable[[str], Path]) -> Path:
    """The full model (CMA at s = 4, 3, 2, the paper's attention scaling) trained at 64 x 192."""
    return with_trained_statistics(make_run(module_tmp("fsre_run")))


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.rand(1, 3, *SIZE, generator=g), torch.rand(1, 3, *SIZE, generator=g)


def outputs(depth: torch.nn.Module, pose: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
            ) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = depth(x)
        result = {f"disp{s}": d for s, d in out["disp"].items()}
        if "seg_logits" in out:
            result["seg"] = out["seg_logits"]
        result["axisangle"], result["translation"] = pose(x, y)
    return result


def assert_same_outputs(ckpt: Path, release: ReferenceRelease,
                        images: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The release's networks give the checkpoint's disparities, segmentation and pose."""
    module = load_module(ckpt, torch.device("cpu"))
    expected = outputs(module.net, module.pose_net, *images)
    got = outputs(release.depth, release.pose, *images)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith(PREFIX) and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------- round trips
# Each writes and reads back a whole release (~100 MB): with the other exports, in make test.
@pytest.mark.slow
def test_export_round_trip_gives_the_checkpoint_outputs(
        fsre_ckpt: Path, tmp_path: Path, images, capsys) -> None:
    out = tmp_path / "release"
    assert main([str(fsre_ckpt), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == CMA_FILES
    for name in CMA_FILES:
        assert name in printed
    assert "64 x 192" in printed and "ResNet-18" in printed and "--num_layers 18" in printed
    assert "--no_cma" not in printed and "rescaled" in printed  # paper scaling folded in

    release = load_reference_release(out)
    layout = release.layout
    assert (layout.encoder, layout.cma_scales, layout.disp_scales) == (
        "resnet18.tv_in1k", (4, 3, 2), (0, 1, 2, 3))
    assert (layout.num_heads, layout.head_ratio, layout.segmentation) == (4, 2.0, True)
    assert (release.height, release.width) == SIZE
    options = json.loads((out / "opt.json").read_text())
    assert (options["height"], options["width"], options["num_layers"]) == (*SIZE, 18)
    assert options["no_cma"] is False and options["cma_layers"] == [3, 2, 1]
    encoder = torch.load(out / "encoder.pth", map_location="cpu", weights_only=True)
    assert (encoder["height"], encoder["width"]) == SIZE
    assert_same_outputs(fsre_ckpt, release, images)


@pytest.mark.slow
def test_overwrite_replaces_another_architecture_at_an_explicit_resolution(
        tmp_path: Path, images, capsys) -> None:
    out = tmp_path / "release"
    out.mkdir()
    (out / "decoder.pth").write_bytes(b"an earlier export of the CMA model")
    (out / "notes.txt").write_text("kept")
    baseline = with_trained_statistics(make_run(tmp_path / "baseline", segmentation=False))
    capsys.readouterr()
    args = [str(baseline), "--out", str(out), "--height", "96", "--width", "320"]

    assert main(args) == 2  # not empty, no --overwrite
    err = one_line_error(capsys)
    assert str(out) in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["decoder.pth", "notes.txt"]

    assert main([*args, "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "decoder.pth" in printed and "removed" in printed and "--no_cma" in printed
    assert "96 x 320 (from height/width)" in printed
    # a stale decoder.pth beside depth.pth would make the folder unreadable
    assert sorted(p.name for p in out.iterdir()) == [
        "depth.pth", "encoder.pth", "notes.txt", "opt.json", "pose.pth", "pose_encoder.pth"]
    assert (out / "notes.txt").read_text() == "kept"
    options = json.loads((out / "opt.json").read_text())
    assert (options["height"], options["width"], options["no_cma"]) == (96, 320, True)
    release = load_reference_release(out)
    assert not release.layout.segmentation and release.layout.cma_scales == ()
    assert (release.height, release.width) == (96, 320)
    assert_same_outputs(baseline, release, images)


# ---------------------------------------------------------------------------- user errors
def test_bad_checkpoints_and_folders_are_one_line_errors(
        fsre_ckpt: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "missing.ckpt"
    assert main([str(missing), "--out", str(tmp_path / "a")]) == 2
    assert str(missing) in one_line_error(capsys)

    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, other)
    assert main([str(other), "--out", str(tmp_path / "b")]) == 2
    err = one_line_error(capsys)
    assert str(other) in err and "not an FSREModule checkpoint" in err

    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    assert main([str(fsre_ckpt), "--out", str(a_file)]) == 2
    err = one_line_error(capsys)
    assert str(a_file) in err and "not a folder" in err
    assert main([str(fsre_ckpt), "--out", str(a_file / "release")]) == 2  # unwritable
    err = one_line_error(capsys)
    assert str(a_file / "release") in err and "cannot write" in err

    assert main([str(fsre_ckpt), "--out", str(tmp_path / "c"), "--height", "100",
                 "--width", "192"]) == 2
    assert "height=100" in one_line_error(capsys)
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c"))


def test_unknown_resolution_asks_for_height_and_width(
        fsre_ckpt: Path, tmp_path: Path, capsys) -> None:
    checkpoint = torch.load(fsre_ckpt, map_location="cpu", weights_only=True)
    bare = tmp_path / "bare.ckpt"  # no run folder, no input_size
    torch.save({k: checkpoint[k] for k in ("state_dict", "hyper_parameters",
                                           "pytorch-lightning_version")}, bare)
    assert main([str(bare), "--out", str(tmp_path / "release")]) == 2
    err = one_line_error(capsys)
    assert str(bare) in err and "--height H --width W" in err
    assert not (tmp_path / "release").exists()


@pytest.mark.parametrize(("changes", "message"), [
    ({"cma_targets": ["depth"]}, "always refines both decoders"),
    ({"encoder": "resnet18d", "cma_scales": [], "segmentation": False},
     "torchvision ResNet encoders only"),
], ids=["one_directional_cma", "resnet_d_encoder"])
def test_networks_the_release_cannot_hold(tmp_path: Path, capsys, changes: dict,
                                          message: str) -> None:
    torch.manual_seed(0)
    module = FSREModule(network={**network(), **changes}, pose_network=POSE,
                        image_log_every_n_steps=0)
    ckpt = save_checkpoint(module, tmp_path / "model.ckpt")
    capsys.readouterr()
    out = tmp_path / "release"
    assert main([str(ckpt), "--out", str(out), "--height", "64", "--width", "192"]) == 2
    err = one_line_error(capsys)
    assert str(ckpt) in err and message in err
    assert not out.exists()  # refused before anything is written


# ---------------------------------------------------------------------------- the command
@pytest.mark.slow  # the command line end to end (in-process)
def test_command_line(fsre_ckpt: Path, command_root: Path) -> None:
    out = command_root / "release"
    result = run_main(main, [str(fsre_ckpt), "--out", str(out)])
    assert result.returncode == 0, result.stderr
    assert "release written to" in result.stdout and "64 x 192" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == CMA_FILES
    result = run_main(main, [str(command_root / "missing.ckpt"), "--out", str(out)])
    assert result.returncode == 2
    assert result.stderr.startswith(PREFIX) and "Traceback" not in result.stderr
