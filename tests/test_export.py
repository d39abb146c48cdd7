"""`python -m fsre_lightning.export`: ONNX and TorchScript graphs that match PyTorch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fsre_lightning.checkpoints import CheckpointMismatchError
from fsre_lightning.errors import ConfigError
from fsre_lightning.export import run
from fsre_lightning.inference.exporters import sample_input
from fsre_lightning.inference.model import build_inference_model
from fsre_lightning.testing import compose_config
from fsre_lightning.testing.tiny_checkpoints import make_mismatched, make_run
from fsre_lightning.trained import load_module


@pytest.fixture(scope="module")
def ckpt(module_tmp: Callable[[str], Path]) -> Path:
    return make_run(module_tmp("run"), encoder="test_resnet")


def _cfg(tmp_path: Path, overrides: list[str]):
    base = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'outputs'}"]
    return compose_config("export", [*base, *overrides])


def _reference(ckpt: Path, image: torch.Tensor, segmentation: bool) -> list[np.ndarray]:
    module = load_module(ckpt, torch.device("cpu"))
    model = build_inference_model(module, ckpt, segmentation)
    with torch.inference_mode():
        return [t.numpy() for t in model(image)]


@pytest.mark.slow
def test_onnx_runs_in_onnxruntime_with_any_batch(tmp_path: Path, ckpt: Path, capsys) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = tmp_path / "model.onnx"
    summary = run(_cfg(tmp_path, [f"ckpt_path={ckpt}", "format=onnx", f"output={path}",
                                  "segmentation=true"]))
    assert "max abs difference" in capsys.readouterr().out
    assert summary["disp"] <= 1e-4 and summary["depth_rel"] <= 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["disp", "depth", "segmentation"]
    image = sample_input(1, (64, 192), seed=5)  # a batch size neither exported nor checked
    disp, depth, labels = session.run(None, {"image": image.numpy()})
    ref_disp, ref_depth, ref_labels = _reference(ckpt, image, segmentation=True)
    assert disp.shape == (1, 1, 64, 192) and labels.shape == (1, 64, 192)
    np.testing.assert_allclose(disp, ref_disp, atol=1e-4, rtol=0)
    np.testing.assert_allclose(depth, ref_depth, rtol=1e-4)
    assert np.mean(labels == ref_labels) > 0.999


@pytest.mark.slow
def test_torchscript_matches_pytorch(tmp_path: Path, ckpt: Path) -> None:
    summary = run(_cfg(tmp_path, [f"ckpt_path={ckpt}", "format=torchscript"]))
    path = Path(summary["path"])
    assert path == ckpt.with_suffix(".torchscript.pt") and path.is_file()
    loaded = torch.jit.load(str(path))
    image = sample_input(4, (64, 192), seed=7)
    with torch.inference_mode():
        disp, depth = loaded(image)
    ref_disp, ref_depth = _reference(ckpt, image, segmentation=False)
    assert disp.shape == (4, 1, 64, 192)
    np.testing.assert_allclose(disp.numpy(), ref_disp, atol=1e-4, rtol=0)
    np.testing.assert_allclose(depth.numpy(), ref_depth, rtol=1e-4)


@pytest.mark.slow
def test_bad_checkpoints_and_options_are_named(tmp_path: Path, ckpt: Path) -> None:
    other = make_mismatched(tmp_path / "swapped.ckpt", encoder="test_resnet")
    with pytest.raises(CheckpointMismatchError, match=r"swapped\.ckpt"):
        run(_cfg(tmp_path, [f"ckpt_path={other}", "format=torchscript", "height=64",
                            "width=192"]))
    baseline = make_run(tmp_path / "baseline", segmentation=False, encoder="test_resnet")
    with pytest.raises(ConfigError, match="no segmentation decoder"):
        run(_cfg(tmp_path, [f"ckpt_path={baseline}", "segmentation=true"]))
    with pytest.raises(ConfigError, match="format='tflite'"):
        run(_cfg(tmp_path, [f"ckpt_path={ckpt}", "format=tflite"]))
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        run(_cfg(tmp_path, [f"ckpt_path={tmp_path / 'missing.ckpt'}"]))
