"""No non-finite value a training step can produce crashes the process (issue 26).

NaN and inf are injected at every stage of whole Lightning training steps (input frames,
intrinsics, encoder features, disparity, pose rotation and translation, each loss term), eager
and compiled (aot_eager), under both `model.nonfinite` policies. The cases run in a child
process (tests/nonfinite_injection.py), one JSON line each: a segfault such as PyTorch's CPU
grid_sample backward on a NaN grid (before `geometry.sample`) fails the cases it reached and
those after it, instead of killing pytest.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nonfinite_injection import CASES, NAMED_TERM, POLICIES

BACKENDS = ("eager", "aot_eager")
# One worker runs the cases once for all tests of the module (the fixture is the cost).
pytestmark = pytest.mark.xdist_group("nonfinite")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Per backend: the cases' results by (stage, value, policy), and how the process ended.
    Both backends run at once, one process each (they are single-threaded in effect)."""
    script = Path(__file__).parent / "nonfinite_injection.py"
    procs = {backend: subprocess.Popen(
        [sys.executable, str(script), backend, str(tmp_path_factory.mktemp(backend))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for backend in BACKENDS}
    out: dict[str, Any] = {}
    for backend, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        results, started = {}, None
        for line in stdout.splitlines():
            record = json.loads(line)
            if "start" in record:
                started = tuple(record["start"])
            else:
                results[(record["stage"], record["value"], record["policy"])] = record
        out[backend] = {"results": results, "returncode": proc.returncode,
                        "last_started": started, "stderr": stderr[-3000:]}
    return out


def describe_death(run: dict[str, Any]) -> str:
    code = run["returncode"]
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    return f"the process died ({how}) during case {run['last_started']}:\n{run['stderr']}"


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_process_lives_through_every_case(outcomes: dict[str, Any], backend: str) -> None:
    run = outcomes[backend]
    assert run["returncode"] == 0, describe_death(run)
    assert len(run["results"]) == len(CASES) * len(POLICIES)
    if backend != "eager":
        # The compiled cases ran Dynamo's graph of the step (one graph serves them all).
        assert all(r["graphs"] >= 1 for r in run["results"].values())


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("stage", "value"), CASES)
def test_skip_drops_and_counts_the_poisoned_step_and_trains_on(
        outcomes: dict[str, Any], backend: str, stage: str, value: str) -> None:
    run = outcomes[backend]
    result = run["results"].get((stage, value, "skip"))
    assert result is not None, describe_death(run)
    assert result["outcome"] == "finished", result.get("message")
    assert result["skipped"] == 1 and result["logged_skipped"] == 1.0
    assert result["first_step_unchanged"], "the poisoned step changed the weights"
    assert result["second_step_changed"], "the clean step after it was not taken"
    assert result["weights_finite"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("stage", "value"), CASES)
def test_stop_ends_the_run_with_its_message_before_the_step(
        outcomes: dict[str, Any], backend: str, stage: str, value: str) -> None:
    run = outcomes[backend]
    result = run["results"].get((stage, value, "stop"))
    assert result is not None, describe_death(run)
    assert result["outcome"] == "stopped"
    message = result["message"]
    assert message.startswith("non-finite loss (") and "model.nonfinite=stop" in message
    assert NAMED_TERM[stage] in message.split(")")[0]
    assert "drive 0 l; drive 1 l" in message  # the frames of the poisoned batch
    assert result["first_step_unchanged"] and result["weights_finite"]
