"""Lightning's loggers as this package's logger configs build them (conf/logger)."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger, except that it does not hand wandb.init an `anonymous=None` it
    was never given: wandb >= 0.19 ignores the setting and printed "The anonymous setting has
    no effect" on every run. An explicit `anonymous` still goes through."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
