"""Without network, a run that needs ImageNet weights or a segmentation model it does not have
fails in seconds with one line, not after the hub client's retries. "No network" is a closed
port on 127.0.0.1 as the hub's endpoint: no test reaches the internet."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fsre_lightning import train
from fsre_lightning.data import label_caches
from fsre_lightning.errors import DataError
from fsre_lightning.models import pretrained
from fsre_lightning.testing import command_env, run_main


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def hub_without_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The hub online as far as the configuration goes (HF_HUB_OFFLINE unset), its endpoint a
    closed port, the HF and torch caches empty."""
    from huggingface_hub import constants

    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for key, value in command_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    return endpoint


def test_the_probe_says_why_the_hub_cannot_be_reached(hub_without_network: str) -> None:
    why = pretrained.hub_unreachable()
    assert why is not None and why.startswith(f"{hub_without_network} cannot be reached")
    assert "Connection refused" in why


def test_training_with_imagenet_weights_and_no_network_fails_at_once(
        hub_without_network: str, caplog: pytest.LogCaptureFixture) -> None:
    started = time.monotonic()
    result = run_main(train.main, ["model=monodepth2", "model.network.pretrained=true",
                                   "logger=none"])
    elapsed = time.monotonic() - started
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fsre_lightning.train: error: pretrained=True")
    assert f"there is no network: {hub_without_network} cannot be reached" in lines[0]
    assert "weights_path=" in lines[0]
    assert "Retrying" not in result.stdout + result.stderr + caplog.text
    assert elapsed < 10, f"{elapsed:.1f} s"


def test_a_segmentation_model_to_download_without_network_fails_at_once(
        hub_without_network: str) -> None:
    pytest.importorskip("transformers")
    started = time.monotonic()
    with pytest.raises(DataError) as err:
        label_caches.load_segformer("fsre-tests/no-such-segformer", torch.device("cpu"),
                                    allow_download=True)
    message = str(err.value)
    assert "'fsre-tests/no-such-segformer' is not in the Hugging Face cache" in message
    assert f"there is no network ({hub_without_network} cannot be reached" in message
    assert "\n" not in message and time.monotonic() - started < 10


@pytest.mark.slow
def test_fsre_train_offline_fails_quickly_in_one_line(tmp_path: Path) -> None:
    """A real process whose HF_ENDPOINT is a closed port, as a machine with no network has no
    route to huggingface.co: one line, no retry warnings, and seconds beyond the imports."""
    env = command_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}",
                      HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    env.pop("HF_HUB_OFFLINE", None)
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import fsre_lightning.train"], env=env, check=True)
    imports = time.monotonic() - started
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "fsre_lightning.train", "model=monodepth2",
                             "model.network.pretrained=true", "logger=none"], env=env,
                            capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    # Lightning's "Seed set to 0" (its info log, on stderr) and the error: nothing else.
    lines = [line for line in result.stderr.strip().splitlines()
             if not line.startswith("Seed set to")]
    assert len(lines) == 1 and "there is no network" in lines[0], result.stderr[-3000:]
    assert "Retrying" not in result.stdout + result.stderr
    print(f"offline failure: {elapsed:.1f} s, of which imports {imports:.1f} s")
    assert elapsed - imports < 10
