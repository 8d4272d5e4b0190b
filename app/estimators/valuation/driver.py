"""Round-based driver: sample, train, estimate, until the standard errors are small or the budget is spent.

``run_until(sampler, trainer, accumulator, ...)`` loops:

1. ``plan = sampler.next_plan(batch)`` (None: the sampler is exhausted);
2. ``outputs = trainer(plan)`` (any callable ``SubsetPlan -> dict of arrays``; in the
   service this is where a round is sharded over workers and merged);
3. ``accumulator.update(sampler.observe(plan, outputs))``;
4. stop when ``max(stderr) < tolerance`` (after ``min_samples`` samples), or when
   ``max_retrains`` models have been trained, or ``max_seconds`` have passed.

``progress("retraining", retrains, max_retrains)`` is called after every round
and may raise :class:`~app.estimators.base.Cancelled`, which propagates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..base import ProgressCallback
from .engine import SubsetOutputs
from .samplers import SubsetPlan


class RoundSampler(Protocol):
    def next_plan(self, max_masks: int) -> SubsetPlan | None: ...

    def observe(self, plan: SubsetPlan, outputs: Mapping[str, np.ndarray]) -> Any: ...


class Accumulator(Protocol):
    n_samples: int

    def update(self, samples: Any) -> None: ...

    def result(self) -> tuple[np.ndarray, np.ndarray]: ...


Trainer = Callable[[SubsetPlan], "SubsetOutputs | Mapping[str, np.ndarray]"]


@dataclass
class RunResult:
    """Values, standard errors and how the run ended (``stopped_by``: converged | max_retrains |
    max_seconds | exhausted). ``n_retrains`` counts the non-empty subsets evaluated (the budget);
    ``n_trained`` the models actually trained (fewer when a trainer reuses cached utilities)."""

    values: np.ndarray
    stderr: np.ndarray
    n_samples: int
    n_retrains: int
    n_trained: int
    n_rounds: int
    seconds: float
    stopped_by: str
    history: list[dict[str, float]] = field(default_factory=list)


def _arrays(outputs: Any) -> Mapping[str, np.ndarray]:
    return outputs.arrays if isinstance(outputs, SubsetOutputs) else outputs


def _evaluated(plan: SubsetPlan) -> int:
    return int((plan.masks.sum(axis=1) > 0).sum())


def _trained(plan: SubsetPlan, outputs: Any) -> int:
    if isinstance(outputs, SubsetOutputs) and "n_trained" in outputs.info:
        return int(outputs.info["n_trained"])
    return _evaluated(plan)


def run_until(
    sampler: RoundSampler,
    trainer: Trainer,
    accumulator: Accumulator,
    *,
    tolerance: float = 0.0,
    max_retrains: int | None = None,
    max_seconds: float | None = None,
    batch_size: int = 256,
    min_samples: int = 30,
    progress: ProgressCallback | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> RunResult:
    """Drive ``sampler`` -> ``trainer`` -> ``accumulator`` in rounds until a stopping rule fires.

    ``tolerance`` is on the largest standard error (0: never converge, run the
    budget). ``max_retrains`` counts the non-empty subsets handed to the trainer
    (empty subsets are free; a caching trainer may train fewer); a round never
    exceeds the remaining budget. At least one of ``tolerance > 0``,
    ``max_retrains`` or ``max_seconds`` should be set unless the sampler is finite.
    """
    started = clock()
    retrains = trained = rounds = idle_rounds = 0
    stopped_by = "exhausted"
    history: list[dict[str, float]] = []
    values, stderr = accumulator.result()
    report = progress or (lambda phase, done, total: None)
    total = int(max_retrains) if max_retrains else 0
    while True:
        budget = batch_size if max_retrains is None else min(batch_size, int(max_retrains) - retrains)
        if budget <= 0:
            stopped_by = "max_retrains"
            break
        if max_seconds is not None and clock() - started >= max_seconds:
            stopped_by = "max_seconds"
            break
        plan = sampler.next_plan(budget)
        if plan is None or (len(plan) == 0 and idle_rounds >= 2):
            # a sampler that holds back work it could not finish within the budget says so
            stopped_by = "max_retrains" if getattr(sampler, "out_of_budget", False) else "exhausted"
            break
        idle_rounds = idle_rounds + 1 if len(plan) == 0 else 0
        outputs = trainer(plan) if len(plan) else {"utility": np.zeros(0)}
        retrains += _evaluated(plan)
        trained += _trained(plan, outputs)
        rounds += 1
        accumulator.update(sampler.observe(plan, _arrays(outputs)))
        values, stderr = accumulator.result()
        finite = stderr[np.isfinite(stderr)]
        max_se = float(stderr.max()) if stderr.size and finite.size == stderr.size else float("inf")
        history.append(
            {
                "retrains": retrains,
                "samples": accumulator.n_samples,
                "max_stderr": max_se,
                "seconds": clock() - started,
            }
        )
        report("retraining", retrains, max(total, retrains))
        if tolerance > 0 and accumulator.n_samples >= min_samples and max_se < tolerance:
            stopped_by = "converged"
            break
    return RunResult(
        values,
        stderr,
        accumulator.n_samples,
        retrains,
        trained,
        rounds,
        clock() - started,
        stopped_by,
        history,
    )
