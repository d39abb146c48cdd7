"""Ship a trained model: the inference graph as ONNX or TorchScript, checked when written.

The graph is `InferenceModel`: input ``image``, float32 B x 3 x H x W RGB in [0, 1] at the
training resolution (normalisation is inside); outputs ``disp`` and ``depth`` (B x 1 x H x W,
relative units, depth = 1 / disp) and with segmentation ``segmentation`` (B x H x W int64
Cityscapes train ids). The batch dimension is dynamic.

Right after writing, the file is loaded back (onnxruntime for ONNX, torch.jit.load for
TorchScript) and run on a sample input of another batch size than the one exported with; the
max abs difference to the PyTorch model is printed (depth: relative difference, since
1 / disp magnifies float noise on far pixels) and must stay within `tolerance`.
ONNX needs the optional extra: ``pip install 'fsre-lightning[export]'``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fsre_lightning.errors import ConfigError, UserError
from fsre_lightning.inference.model import InferenceModel

FORMATS = ("onnx", "torchscript")
EXPORT_EXTRA_HINT = "pip install 'fsre-lightning[export]' (onnx, onnxscript, onnxruntime)"
# torch.export specialises a dimension of size 1: export with 2 and check with 3, so the
# check also proves that the batch dimension is free.
EXPORT_BATCH, CHECK_BATCH = 2, 3


class ExportError(UserError):
    """The exported graph cannot be written, or does not match the PyTorch model."""


def sample_input(batch: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A fixed random image batch in [0, 1] (the check needs no data on disk)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *size, generator=generator)


def export_onnx(model: InferenceModel, path: Path, size: tuple[int, int], opset: int = 18
                ) -> Path:
    """Write `model` as ONNX with a dynamic batch (torch.export-based exporter)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ExportError(f"format=onnx needs onnx and onnxscript: {EXPORT_EXTRA_HINT}; or "
                          "use format=torchscript, which needs nothing more") from err
    example = sample_input(EXPORT_BATCH, size).to(next(model.parameters()).device)
    batch = torch.export.Dim("batch", min=1, max=1024)
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        # their INFO lines (one per de-duplicated initializer) drown the check's result
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's chatter about its own internals
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["image"],
            output_names=model.output_names, dynamic_shapes={"image": {0: batch}},
            opset_version=opset, external_data=False, verbose=False)
    program.save(str(path))
    return path


def export_torchscript(model: InferenceModel, path: Path, size: tuple[int, int]) -> Path:
    """Write `model` traced to TorchScript (loadable with torch.jit.load, no package needed)."""
    example = sample_input(EXPORT_BATCH, size).to(next(model.parameters()).device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on shape checks that hold for any batch
        traced = torch.jit.trace(model, (example,), check_trace=False)
    traced.save(str(path))
    return path


def run_exported(fmt: str, path: Path, image: torch.Tensor) -> list[np.ndarray]:
    """Outputs of the written file on `image` (CPU)."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ExportError(f"checking the ONNX file needs onnxruntime: {EXPORT_EXTRA_HINT}"
                              ) from err
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return list(session.run(None, {"image": image.numpy()}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return [t.numpy() for t in loaded(image)]


def compare(model: InferenceModel, fmt: str, path: Path, size: tuple[int, int]
            ) -> dict[str, float]:
    """Max differences of the file's outputs to the PyTorch model's on a sample batch."""
    image = sample_input(CHECK_BATCH, size, seed=1)
    reference_model = model.to("cpu").eval()
    with torch.inference_mode():
        reference = [t.numpy() for t in reference_model(image)]
    exported = run_exported(fmt, path, image)
    if len(exported) != len(reference):
        raise ExportError(f"{path} has {len(exported)} outputs, expected {len(reference)}")
    diffs: dict[str, float] = {}
    for name, ours, theirs in zip(model.output_names, reference, exported, strict=True):
        if ours.shape != theirs.shape:
            raise ExportError(f"{path}: output {name} has shape {theirs.shape} for a batch of "
                              f"{CHECK_BATCH}, PyTorch gives {ours.shape}")
        if name == "segmentation":
            # argmax labels: near-ties may flip on float noise; report the disagreeing share
            diffs["segmentation_mismatch"] = float(np.mean(ours != theirs))
        elif name == "depth":
            diffs["depth_rel"] = float(np.max(np.abs(ours - theirs) / np.abs(ours)))
        else:
            diffs[name] = float(np.max(np.abs(ours - theirs)))
    return diffs


def default_output(ckpt_path: Path, fmt: str) -> Path:
    return ckpt_path.with_suffix(".onnx" if fmt == "onnx" else ".torchscript.pt")


def export(model: InferenceModel, fmt: str, path: Path, size: tuple[int, int],
           tolerance: float = 1e-4, opset: int = 18) -> dict[str, Any]:
    """Write `model` in `fmt` to `path` and check it; ExportError when it does not match."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not allowed: one of {list(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    if fmt == "onnx":
        export_onnx(model, path, size, opset)
    else:
        export_torchscript(model, path, size)
    diffs = compare(model, fmt, path, size)
    numeric = {k: v for k, v in diffs.items() if k != "segmentation_mismatch"}
    text = ", ".join(f"{k} {v:.3g}" for k, v in diffs.items())
    print(f"{fmt} check on a {CHECK_BATCH} x 3 x {size[0]} x {size[1]} sample: max abs "
          f"difference to PyTorch: {text}")
    bad = {k: v for k, v in numeric.items() if not v <= tolerance}
    if bad or diffs.get("segmentation_mismatch", 0.0) > 1e-3:
        raise ExportError(f"{path} does not match the PyTorch model ({text}; tolerance "
                          f"{tolerance:g}): the exporter changed the numerics; try another "
                          f"format or opset")
    return {"path": str(path), "format": fmt, "height": size[0], "width": size[1],
            "outputs": model.output_names, **diffs}
