"""The contract every estimator implements, and the registry the service reads.

Pure torch/numpy: this module is importable from a notebook with no web, DB or
broker dependency. Conventions (ESTIMATORS.md section 0):

* Scores are query-major: ``scores[j, i]`` is the influence of training example
  ``i`` on query ``j`` (m x n).
* Sign: ``scores[j, i] > 0`` means ``i`` is a *proponent* of query ``j``:
  removing it would raise the query loss (or lower the query margin).
* The query objective ``q`` is the loss for ``measurement="loss"`` and minus the
  margin for ``measurement="margin"``, so one formula serves both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

Measurement = Literal["loss", "margin"]
TaskKind = Literal["classification", "regression"]
LossName = Literal["cross_entropy", "mse"]

SIGN_CONVENTION = (
    "positive = proponent: removing the training example would raise the query loss "
    "(measurement=loss) or lower the query margin (measurement=margin)"
)
ORIENTATION = "query-major: scores[query, train]"


class EstimatorError(Exception):
    """A problem with the inputs or parameters that the user can fix.

    ``parameter`` names the offending job field as a JSON pointer relative to the
    job body (e.g. ``/method/params/damping``) so the service can report it.
    """

    code = "estimator-error"

    def __init__(self, detail: str, *, parameter: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.parameter = parameter


class NumericalError(EstimatorError):
    """The computation produced NaN/inf or diverged; the detail says what to change."""

    code = "numerical-instability"


class Cancelled(Exception):
    """Raised by a progress callback to stop an estimator at the next batch boundary."""


ProgressCallback = Callable[[str, int, int], None]
"""``progress(phase, completed_units, total_units)``; may raise :class:`Cancelled`."""


def _no_progress(phase: str, done: int, total: int) -> None:
    return None


@dataclass(frozen=True)
class TaskSpec:
    """What the model predicts and which loss it was trained with."""

    kind: TaskKind = "classification"
    loss: LossName = "cross_entropy"

    def __post_init__(self) -> None:
        if self.kind == "classification" and self.loss != "cross_entropy":
            raise EstimatorError("classification models use loss 'cross_entropy'", parameter="/loss")
        if self.kind == "regression" and self.loss != "mse":
            raise EstimatorError("regression models use loss 'mse'", parameter="/loss")


@dataclass
class Checkpoint:
    """Parameters saved during training, with the learning rate in effect at that step."""

    step: int
    learning_rate: float
    state: dict[str, torch.Tensor]


@dataclass
class InfluenceProblem:
    """Everything an estimator needs, already loaded and validated.

    ``model`` supplies the architecture; its current weights are ignored, the
    estimator evaluates it functionally at ``weights`` or at each checkpoint.
    ``weight_decay`` is the L2 coefficient of the training objective
    ``mean_i L(z_i) + weight_decay / 2 * ||theta||^2``.
    """

    model: nn.Module
    task: TaskSpec
    weights: dict[str, torch.Tensor]
    train_x: torch.Tensor
    train_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    measurement: Measurement = "loss"
    checkpoints: list[Checkpoint] = field(default_factory=list)
    weight_decay: float = 0.0
    recipe: dict[str, Any] | None = None
    """How the model was trained (a :class:`~app.estimators.training.Recipe` as a dict);
    retraining-based methods replay it unless their parameters override it."""
    initial_weights: dict[str, torch.Tensor] | None = None
    """Where that training started, when not from the architecture's seeded initialisation (a
    pretrained model to fine-tune, a LoRA base with its initial adapters): retraining starts there
    too, every subset from the same weights (seeds then only order the batches)."""

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def n_query(self) -> int:
        return int(self.query_x.shape[0])


@dataclass
class Runtime:
    """How to run: device, dtype, chunking, memory and the progress/cancel hook.

    ``memory_budget_bytes`` bounds what an estimator keeps in RAM beyond a gradient chunk: train-side
    feature matrices larger than their share of it are memory-mapped files in ``scratch_dir`` (the
    system temporary folder when None), see :mod:`.features`. None: no bound, everything in memory.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    chunk_size: int = 256
    progress: ProgressCallback = _no_progress
    memory_budget_bytes: int | None = None
    scratch_dir: Path | None = None


@dataclass
class TrainState:
    """Train-side work an estimator can reuse across jobs on the same model and training set.

    Examples: a Cholesky factor of the Hessian, EK-FAC eigenbases, TRAK's projected
    training features and kernel inverse. The service stores it as an artifact keyed by
    (weights, checkpoints, training set, :meth:`Estimator.state_params`, code version),
    so a second job with new queries skips the train-side pass. ``tensors`` must be
    plain tensors (saved as safetensors); ``info`` must be JSON-serialisable. Large tensors may be
    memory-mapped (:mod:`.features`): read them in row blocks rather than converting them whole.
    """

    tensors: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Attribution:
    """An estimator's output: the score matrix, self-influence, and/or data values.

    ``values`` (length n) is the output of data-valuation methods (Shapley, Banzhaf,
    ...: the worth of each training example to a utility); ``values_stderr`` their
    Monte-Carlo standard errors (0 for exact methods). ``scores_stderr`` (the shape of ``scores``)
    are the standard errors of scores that are themselves sample estimates: downsampling's, and
    leave-one-out's with ``repeats >= 2``.
    """

    scores: np.ndarray | None
    self_influence: np.ndarray | None
    metadata: dict[str, Any]
    values: np.ndarray | None = None
    values_stderr: np.ndarray | None = None
    scores_stderr: np.ndarray | None = None


class Estimator:
    """Base class: subclasses set ``name``, ``summary``, ``Params`` and implement ``attribute``.

    ``Params`` is a plain dataclass; the service derives its JSON Schema and
    validates user input against it, so every field needs a default and a type.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type]
    needs_checkpoints: ClassVar[bool] = False
    supports_self_influence: ClassVar[bool] = True
    checkpoint_additive: ClassVar[bool] = False
    """Scores are a sum over checkpoints, so a job may be sharded by checkpoint and summed."""
    shardable_by_rows: ClassVar[bool] = True
    """``attribute`` honours ``train_range``, so a job may be split into training-row shards."""
    group_orders: ClassVar[tuple[str, ...]] = ("first",)
    """Orders of :meth:`group_scores` (see :mod:`.group`); beyond "first" they need the Hessian."""

    def fit(
        self, problem: InfluenceProblem, params: Any, runtime: Runtime | None = None
    ) -> TrainState | None:
        """The cacheable train-side pass; ``None`` when the method has none worth caching."""
        return None

    def retrain_budget(self, problem: InfluenceProblem, params: Any) -> int | None:
        """For retraining methods with a fixed subset plan: how many subsets it trains.

        Non-None means the method can be sharded by subset rows: ``plan(problem, params,
        start=, stop=)`` gives rows of the plan, ``train_subsets(problem, params, plan)``
        trains them, and ``estimate(problem, params, full_plan, merged_outputs)`` finishes.
        """
        return None

    def state_params(self, params: Any) -> dict[str, Any]:
        """The parameters that change :meth:`fit`'s output (part of the cache key)."""
        return dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(params or {})

    def attribute(
        self,
        problem: InfluenceProblem,
        params: Any,
        *,
        want_scores: bool = True,
        want_self_influence: bool = False,
        runtime: Runtime | None = None,
        state: TrainState | None = None,
        train_range: tuple[int, int] | None = None,
    ) -> Attribution:
        """Score queries against training examples.

        ``state`` is the output of :meth:`fit` for this problem (computed here when
        None). ``train_range=(lo, hi)`` restricts the work to training columns
        ``lo..hi-1`` (a shard): scores are then ``m x (hi - lo)`` and self-influence
        ``hi - lo`` long, while normalisations still use the full ``n``.
        """
        raise NotImplementedError

    def group_scores(
        self,
        problem: InfluenceProblem,
        params: Any,
        groups: list[list[int]] | list[np.ndarray],
        order: str = "first",
        *,
        runtime: Runtime | None = None,
        state: TrainState | None = None,
    ) -> np.ndarray:
        """``m x G``: the effect on each query of removing each group of training rows (:mod:`.group`).

        First order (every estimator that scores): the sum of the group's pointwise scores.
        """
        from .group import GROUPS_PARAMETER, as_groups, sum_over_groups

        if order not in self.group_orders:
            raise EstimatorError(
                f"{self.name} gives group influence of order {', '.join(self.group_orders)}, not {order!r}"
                + group_order_hint(order),
                parameter=f"{GROUPS_PARAMETER}/order",
            )
        idx = as_groups(groups, problem.n_train)
        scores = self.attribute(problem, params, runtime=runtime, state=state).scores
        if scores is None:
            raise EstimatorError(f"{self.name} gives no m x n scores to sum", parameter=GROUPS_PARAMETER)
        return sum_over_groups(scores, idx)

    def check(self, problem_size: ProblemSize, params: Any) -> None:
        """Refuse at submit time what cannot run (e.g. an explicit Hessian that is too big)."""
        return None

    def check_memory(self, problem_size: ProblemSize, params: Any, budget_bytes: int) -> None:
        """Refuse at submit time a structure the method must hold whole (no chunking bounds it) that
        exceeds the worker's memory budget; most methods stream within the budget and accept all."""
        return None


@dataclass(frozen=True)
class ProblemSize:
    """Sizes known at submit time, before any tensor is loaded."""

    n_train: int
    n_query: int
    n_parameters: int
    n_checkpoints: int


REGISTRY: dict[str, Estimator] = {}


def register(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator adding one instance of ``cls`` to :data:`REGISTRY`."""
    if not dataclasses.is_dataclass(cls.Params):
        raise TypeError(f"{cls.__name__}.Params must be a dataclass")
    REGISTRY[cls.name] = cls()
    return cls


def group_order_hint(order: str) -> str:
    """``"; if_cg and if_exact give <order>"``: where else a group order is available (for errors)."""
    names = sorted(e.name for e in REGISTRY.values() if order in e.group_orders)
    return f"; {' and '.join(names)} give {order}" if names else ""


def get_estimator(name: str) -> Estimator:
    try:
        return REGISTRY[name]
    except KeyError:
        raise EstimatorError(
            f"unknown estimator {name!r}; available: {', '.join(sorted(REGISTRY))}",
            parameter="/method/name",
        ) from None
