"""What a training step does when a loss term or a gradient is NaN/inf (`model.nonfinite`).

`skip` (the default) takes no optimiser step for that batch, so Adam's moments and a per-step
lr warm-up are untouched; it counts the step, warns in one line naming the terms not warned of
before, and gives up after `max_consecutive` bad steps in a row (then the data or the numerics
are broken, and the remaining hours would be wasted). `stop` ends the run at once, before the
step is taken, with an error naming the term(s) and the batch's frames. FSREModule owns one
`NonFinitePolicy` and calls it from its hooks; the policy holds no tensors and is not
checkpointed (its counters describe this process's run).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from fsre_lightning.errors import UserError
from fsre_lightning.module_config import check_nonfinite

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError, RuntimeError):
    """A loss term or gradient was NaN/inf under `model.nonfinite=stop` (or too many in a row).

    Raised before the optimiser step, so the weights are those of the last good step; the
    interrupt checkpoint callback does not save on this error (the last good checkpoint stays).
    One line like every user error, but exit status 1: the run failed on its own rule, the
    command was not used wrongly (2).
    """

    exit_status = 1


def scalar_terms(losses: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loss terms: the floating-point scalars among the step's outputs (the auto-mask and
    any other map are no loss)."""
    return {name: value for name, value in losses.items()
            if value.dim() == 0 and value.is_floating_point()}


def nonfinite_terms(losses: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the loss terms holding a NaN or inf (one host read per term: for reporting a
    step already known to be bad)."""
    return [name for name, value in scalar_terms(losses).items()
            if not bool(torch.isfinite(value))]


class NonFinitePolicy:
    """`model.nonfinite` and `model.nonfinite_max_consecutive` for one training run."""

    def __init__(self, policy: str = "skip", max_consecutive: int = 100) -> None:
        check_nonfinite(policy, max_consecutive)
        self.policy = policy
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0  # steps skipped so far
        self.consecutive = 0
        self.skip_step = False  # the current step takes no optimiser step
        self._warned: set[str] = set()

    def start_step(self) -> None:
        self.skip_step = False

    def end_step(self) -> None:
        if not self.skip_step:
            self.consecutive = 0

    def handle(self, what: str, terms: Sequence[str], step: int, frames: Sequence[str]) -> None:
        """Apply the policy to a step whose `terms` (loss names or "gradients") are NaN/inf."""
        names = ", ".join(terms)
        where = "; ".join(frames) or "?"
        if self.policy == "stop":
            raise NonFiniteLossError(
                f"non-finite {what} ({names}) at step {step} on frames [{where}]: stopped "
                f"without taking the step (model.nonfinite=stop); the last checkpoint on disk "
                f"is from before it. Check those frames, lower model.optimizer.lr or set "
                f"model.nonfinite=skip")
        self.skip_step = True
        self.skipped += 1
        self.consecutive += 1
        new = [term for term in terms if term not in self._warned]
        if new:  # one line per step, each term once a run: a log, not a flood
            self._warned.update(new)
            log.warning("non-finite %s (%s) at step %d on frames [%s]: step skipped "
                        "(model.nonfinite=skip; counted in train/skipped_nonfinite)",
                        what, ", ".join(new), step, where)
        if self.consecutive > self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive steps had non-finite {what} ({names}), last "
                f"on frames [{where}]: more than model.nonfinite_max_consecutive="
                f"{self.max_consecutive}")
