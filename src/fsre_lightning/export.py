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

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fsre_lightning.config import validate_config
from fsre_lightning.config.checks import check_writable
from fsre_lightning.hydra_entry import hydra_command
from fsre_lightning.runtime import resolve_device


def run(cfg: DictConfig) -> dict[str, Any]:
    """Export as the config says; returns the summary (path, max differences)."""
    validate_config(cfg, "export")
    # The work's imports after the checks: a usage error answers without torch.
    from fsre_lightning.inference.exporters import default_output, export
    from fsre_lightning.inference.model import build_inference_model
    from fsre_lightning.trained import load_module, training_resolution
    ckpt_path = Path(cfg.ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(ckpt_path)!r}: no such checkpoint")
    path = Path(cfg.output) if cfg.get("output") else default_output(ckpt_path, cfg.format)
    check_writable("output", str(path))
    height, width, _ = training_resolution(ckpt_path, cfg.height, cfg.width)
    device = resolve_device(cfg.device)
    module = load_module(ckpt_path, device)
    model = build_inference_model(module, ckpt_path, bool(cfg.segmentation), "labels")
    summary = export(model, cfg.format, path, (height, width), float(cfg.tolerance),
                     int(cfg.opset))
    print(f"wrote {path} (input image: B x 3 x {height} x {width} float RGB in [0, 1]; "
          f"outputs {', '.join(model.output_names)})")
    return summary


main = hydra_command("export", run)


if __name__ == "__main__":
    sys.exit(main())
