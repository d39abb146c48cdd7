"""Ship a trained model: `python -m fsre_lightning.export ckpt_path=... format=onnx|torchscript`.

The graph is `inference.InferenceModel`: input ``image``, float32 B x 3 x H x W RGB in [0, 1]
at the training resolution (normalisation is inside); outputs ``disp`` and ``depth``
(B x 1 x H x W, relative units, depth = 1 / disp) and with `segmentation=true`
``segmentation`` (B x H x W int64 Cityscapes train ids). The batch dimension is dynamic.

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

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fsre_lightning.config import ConfigError, validate_config
from fsre_lightning.data.kitti import DataError
from fsre_lightning.inference import (
    InferenceModel,
    build_inference_model,
    load_trained_module,
)
from fsre_lightning.train import CONFIG_DIR, run_or_exit

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
EXPORT_EXTRA_HINT = "pip install 'fsre-lightning[export]' (onnx, onnxscript, onnxruntime)"
# torch.export specialises a dimension of size 1: export with 2 and check with 3, so the
# check also proves that the batch dimension is free.
EXPORT_BATCH, CHECK_BATCH = 2, 3


class ExportError(DataError):
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
        raise ExportError(f"format=onnx needs onnx and onnxscript: {EXPORT_EXTRA_HINT}") from err
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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Export as the config says; returns the summary (path, max differences)."""
    from fsre_lightning.evaluate import resolve_device, training_resolution

    validate_config(cfg, "export")
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise ConfigError("ckpt_path is required: ckpt_path=<run folder>/checkpoints/last.ckpt")
    ckpt_path = Path(cfg.ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(ckpt_path)!r}: no such checkpoint")
    try:
        height, width, _ = training_resolution(cfg, ckpt_path)
    except ConfigError as err:
        raise ConfigError(f"{err}; no training config.yaml beside {ckpt_path.parent}: set "
                          "height= and width= (the training resolution)") from err
    device = resolve_device(cfg.device)
    module = load_trained_module(ckpt_path, device)
    model = build_inference_model(module, ckpt_path, bool(cfg.segmentation), "labels")
    path = Path(cfg.output) if cfg.get("output") else default_output(ckpt_path, cfg.format)
    summary = export(model, cfg.format, path, (height, width), float(cfg.tolerance),
                     int(cfg.opset))
    print(f"wrote {path} (input image: B x 3 x {height} x {width} float RGB in [0, 1]; "
          f"outputs {', '.join(model.output_names)})")
    return summary


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    run_or_exit("export", run, cfg)


if __name__ == "__main__":
    main()
