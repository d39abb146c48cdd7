"""Without network, a run that needs ImageNet weights or a segmentation model it does not have
fails at once with one line: one connection attempt (the probe), not the hub client's retries.
"No network" is a closed port on 127.0.0.1 as the hub's endpoint: no test reaches the internet.
The attempts are counted, not timed (timings belong in benchmarks)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from fsre_lightning import train
from fsre_lightning.data import label_caches
from fsre_lightning.errors import DataError
from fsre_lightning.models import pretrained
from fsre_lightning.testing import closed_port, command_env, run_main

PROBE = "probe"


@dataclass
class NoNetwork:
    port: int  # the hub's endpoint is http://127.0.0.1:<port>, where nothing listens
    # Every address a socket of this process connected to, with PROBE where the probe began.
    attempts: list[Any] = field(default_factory=list)

    def from_the_probe_on(self) -> list[Any]:
        """What was tried from the probe on: [PROBE, its one connection] when the error came
        at once. Before it, the hub library may try a fetch of its own that our code does not
        control (huggingface_hub fetches a user-agent registry once per process)."""
        assert self.attempts.count(PROBE) == 1, self.attempts
        return self.attempts[self.attempts.index(PROBE):]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def probe_alone(self) -> list[Any]:
        return [PROBE, ("127.0.0.1", self.port)]


@pytest.fixture
def hub_without_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> NoNetwork:
    """The hub online as far as the configuration goes (HF_HUB_OFFLINE unset), its endpoint a
    closed port, the HF and torch caches empty; every socket connection of this process is
    recorded (the probe's and any hub client's, whatever HTTP library it uses)."""
    from huggingface_hub import constants

    net = NoNetwork(closed_port())
    connect = socket.socket.connect

    def recording_connect(sock: socket.socket, address: Any) -> None:
        net.attempts.append(address)
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    probe = pretrained._connect

    def recorded_probe(host: str, port: int, timeout: float) -> str | None:
        net.attempts.append(PROBE)
        return probe(host, port, timeout)

    monkeypatch.setattr(pretrained, "_connect", recorded_probe)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", net.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for key, value in command_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    return net


def test_the_probe_says_why_the_hub_cannot_be_reached(hub_without_network: NoNetwork) -> None:
    why = pretrained.hub_unreachable()
    assert why is not None and why.startswith(f"{hub_without_network.endpoint} cannot be reached")
    assert "Connection refused" in why
    assert hub_without_network.from_the_probe_on() == hub_without_network.probe_alone


def test_training_with_imagenet_weights_and_no_network_fails_at_once(
        hub_without_network: NoNetwork, caplog: pytest.LogCaptureFixture) -> None:
    result = run_main(train.main, ["model=monodepth2", "model.network.pretrained=true",
                                   "logger=none"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fsre_lightning.train: error: pretrained=True")
    assert f"there is no network: {hub_without_network.endpoint} cannot be reached" in lines[0]
    assert "weights_path=" in lines[0]
    assert "Retrying" not in result.stdout + result.stderr + caplog.text
    # The probe's one attempt, then the error: no download was tried (nor retried).
    assert hub_without_network.from_the_probe_on() == hub_without_network.probe_alone


def test_a_segmentation_model_to_download_without_network_fails_at_once(
        hub_without_network: NoNetwork) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(DataError) as err:
        label_caches.load_segformer("fsre-tests/no-such-segformer", torch.device("cpu"),
                                    allow_download=True)
    message = str(err.value)
    assert "'fsre-tests/no-such-segformer' is not in the Hugging Face cache" in message
    assert f"there is no network ({hub_without_network.endpoint} cannot be reached" in message
    assert "\n" not in message
    assert hub_without_network.from_the_probe_on() == hub_without_network.probe_alone


# `python -m fsre_lightning.train ARGS`, its socket connections written at exit to the file
# $CONNECTIONS_FILE names.
COUNTING_TRAIN = """
import atexit, json, os, runpy, socket
seen = []
connect = socket.socket.connect
def recording_connect(sock, address):
    seen.append(list(address) if isinstance(address, tuple) else address)
    return connect(sock, address)
socket.socket.connect = recording_connect
atexit.register(lambda: open(os.environ["CONNECTIONS_FILE"], "w").write(json.dumps(seen)))
runpy.run_module("fsre_lightning.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_fsre_train_offline_fails_in_one_line(tmp_path: Path) -> None:
    """A real process whose HF_ENDPOINT (read from the environment at import) is a closed port,
    as a machine with no network has no route to huggingface.co: one line, no retry warnings,
    one connection attempt to the hub."""
    port = closed_port()
    attempts = tmp_path / "connections.json"
    env = command_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{port}",
                      HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"),
                      CONNECTIONS_FILE=str(attempts))
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-c", COUNTING_TRAIN,
                             "model=monodepth2", "model.network.pretrained=true", "logger=none"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    # Lightning's "Seed set to 0" (its info log, on stderr) and the error: nothing else.
    lines = [line for line in result.stderr.strip().splitlines()
             if not line.startswith("Seed set to")]
    assert len(lines) == 1 and "there is no network" in lines[0], result.stderr[-3000:]
    assert env["HF_ENDPOINT"] in lines[0]
    assert "Retrying" not in result.stdout + result.stderr
    assert json.loads(attempts.read_text()) == [["127.0.0.1", port]]  # the probe, nothing more
