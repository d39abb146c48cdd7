"""ImageNet weights of a timm encoder, found where timm users keep them.

`pretrained=True` takes the weights from, in this order:

1. `weights_path`: a local checkpoint of the *classification* model (timm or torchvision key
   names, `.pth`/`.bin`/`.safetensors`), handed to timm as
   `pretrained_cfg_overlay=dict(file=...)`;
2. the local Hugging Face hub cache (`HF_HUB_CACHE` / `HF_HOME`, default
   `~/.cache/huggingface/hub`) for the model's `hf_hub_id`, probed with `HF_HUB_OFFLINE=1`;
3. the torch hub cache (`$TORCH_HOME/hub/checkpoints`) for the model's legacy URL;
4. a download from the Hugging Face hub into its standard cache (as timm does), unless
   `HF_HUB_OFFLINE` is set or there is no network. Whether the hub can be reached is asked
   once, with one connection attempt of a few seconds (`hub_unreachable`), before the hub
   client is: without network it would retry each file five times with growing pauses and a
   warning each (a minute of noise before the same error).

If none gives the file, `PretrainedWeightsNotFound` names it and says how to provide it.
`pretrained="auto"` (the demo's setting) never downloads: a local copy or random init.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from timm.models import get_pretrained_cfg

from fsre_lightning.errors import UserError, first_line


class PretrainedWeightsNotFound(UserError, RuntimeError):  # noqa: N818 - name given by the API
    """Pretrained weights were asked for but neither a local copy nor a download gives them."""


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Set HF_HUB_OFFLINE=1 for the duration of a cache probe, then restore the environment."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm
        return "~/.cache/huggingface/hub"


def _find_cached_weights(pretrained_cfg: dict[str, Any]) -> tuple[Path | None, list[str]]:
    """Look for the model's weights in the local HF hub and torch hub caches, offline.

    Returns the file (or None) and a human-readable list of the places that were probed.
    """
    probed: list[str] = []
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        repo_id, _, revision = str(hub_id).partition("@")
        filename = pretrained_cfg.get("hf_hub_filename")
        filenames = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            with hub_offline():
                for name in filenames:
                    probed.append(f"HF hub cache {_hf_cache_dir()} : {repo_id}/{name}")
                    found = try_to_load_from_cache(repo_id, name, revision=revision or None)
                    if isinstance(found, str) and os.path.isfile(found):
                        return Path(found), probed
    url = pretrained_cfg.get("url")
    if url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        probed.append(f"torch hub cache {candidate}")
        if candidate.is_file():
            return candidate, probed
    return None, probed


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# Seconds one connection attempt to the hub may take: a machine with network answers in well
# under a second; one without fails at once (no route, no name) or never (packets dropped).
HUB_PROBE_TIMEOUT_S = 5.0


def _connect(host: str, port: int, timeout: float) -> str | None:
    """One TCP connection to host:port within `timeout` seconds in all (name lookup
    included, which socket's own timeout does not bound); None, or why it failed."""
    outcome: list[str | BaseException | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{type(err).__name__}: {err.strerror or err}")
        except BaseException as err:  # not a network answer (a test forbidding connections)
            outcome.append(err)

    # A daemon thread: a name lookup that hangs must not keep the process from exiting.
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        return f"no answer within {timeout:.0f} s"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub (`HF_ENDPOINT`, through the proxy the environment names) cannot
    be reached now, or None when a connection to it opens."""
    try:
        from huggingface_hub import constants

        endpoint = str(constants.ENDPOINT)
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm
        endpoint = "https://huggingface.co"
    target = urlparse(endpoint)
    host, port = target.hostname or "", target.port or (443 if target.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(target.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxied.hostname or host, proxied.port or 80
    why = _connect(host, port, timeout)
    return None if why is None else f"{endpoint} cannot be reached ({why})"


def _download_weights(pretrained_cfg: dict[str, Any]) -> tuple[Path | None, str]:
    """Download the model's weights from the Hugging Face hub into its standard cache.

    Returns the file, or None and why not (offline, no network, no such file on the hub).
    """
    hub_id = pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        return None, "the model has no Hugging Face hub id to download from"
    if _hub_offline():
        return None, "HF_HUB_OFFLINE is set, so nothing was downloaded"
    unreachable = hub_unreachable()
    if unreachable:
        return None, f"there is no network: {unreachable}"
    from huggingface_hub import hf_hub_download

    repo_id, _, revision = str(hub_id).partition("@")
    filename = pretrained_cfg.get("hf_hub_filename")
    failures = []
    for name in [filename] if filename else ["model.safetensors", "pytorch_model.bin"]:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision or None)), ""
        except Exception as err:  # no network, proxy, 404, ...: each is reported by name
            failures.append(f"{repo_id}/{name}: {type(err).__name__}: {first_line(err)}")
    return None, "the download failed (" + "; ".join(failures) + ")"


def _not_found(name: str, hub_id: str | None, detail: str) -> PretrainedWeightsNotFound:
    hint = f" (Hugging Face repo '{hub_id}')" if hub_id else ""
    return PretrainedWeightsNotFound(
        f"pretrained=True but the ImageNet weights of encoder '{name}'{hint} are not available: "
        f"{detail}. On a machine with network access they are downloaded into the Hugging Face "
        f"cache on first use; offline, provide them with weights_path=<local checkpoint of the "
        f"timm/torchvision classification model>, or copy that cache ({_hf_cache_dir()}, e.g. "
        f"after `hf download {hub_id or '<repo>'}` elsewhere), or set pretrained=false to train "
        f"from scratch"
    )


def weights_file(name: str, weights_path: str | os.PathLike[str] | None = None,
                 download: bool = True) -> Path:
    """The ImageNet weights of timm model `name`, from the places the module docstring lists
    (`download=False`: local files only); PretrainedWeightsNotFound when none has them."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise _not_found(name, None, f"weights_path={str(path)!r} does not exist")
        return path
    known = get_pretrained_cfg(name)
    cfg = known.to_dict() if known is not None else {}
    found, probed = _find_cached_weights(cfg)
    detail = "no local copy (looked in " + ("; ".join(probed) or "no known place") + ")"
    if found is None and download:
        found, why = _download_weights(cfg)
        detail = f"{detail} and {why}"
    if found is None:
        raise _not_found(name, cfg.get("hf_hub_id"), detail)
    return found
