"""Replay a model's own mini-batch training run and differentiate through it (ESTIMATORS.md 2.24-2.27).

The dynamic estimators HyDRA, SGD-influence and MAGIC all ask the same question of the *actual*
training run: how does the query objective after training, ``q(theta_T)``, change when training
example ``i`` is weighted ``w_i`` in every mini-batch loss it entered? With the batch loss
``(1/|B_t|) sum_{i in B_t} w_i L(z_i; theta)`` (plus the recipe's L2 term), the answer is the
metagradient ``d q(theta_T) / d w_i`` at ``w = 1``; the score is its negative, so that a proponent
(removing it, ``w_i: 1 -> 0``, would raise the query loss) is positive.

:class:`Unroller` rebuilds the run from the model's recipe: the same starting point (the problem's
initial weights, else the architecture's initialisation under ``recipe.seed``, as
:func:`~app.estimators.training.train` does), the same shuffling generator, per-epoch learning
rates and optimizer (SGD with momentum and coupled L2, Adam, AdamW), written as one differentiable
function ``state_{t+1} = step(state_t, w_{B_t})`` over a flat state ``[theta, optimizer slots]``.
:meth:`Unroller.replay` runs it forward once and keeps the states at segment boundaries
(``O(sqrt(T))`` states, the cacheable train-side state); :meth:`Unroller.metagradients` sweeps
backwards segment by segment, recomputing each segment's states from its start, and pulls the
queries' cotangents through every step with a vector-Jacobian product vectorised over the queries,
collecting ``d q / d w_{B_t}`` on the way. One sweep scores every training example for a block of
queries.

``hessian=False`` is HyDRA's Hessian-free approximation: each step's gradient is taken as a
constant of theta (its value on the recorded trajectory), so the training Hessian never enters and
only the optimizer's own algebra (momentum, Adam's normalisation) carries the cotangent back. For
plain SGD that is ``sum_t (eta_t / |B_t|) 1[i in B_t] g'(theta_T) . grad L(z_i; theta_t)``.

Refused: full-batch L-BFGS (not a mini-batch run: use the influence functions), and models whose
train-mode forward is not a pure function of parameters and inputs (dropout, batch norm).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vjp, vmap

from .base import EstimatorError, InfluenceProblem, NumericalError, Runtime
from .gradients import Ticker, flatten, functional_state, trainable_names, unflatten
from .objectives import per_example_loss
from .training import Recipe, learning_rate_at, validate_recipe
from .valuation.engine import model_factory, vmap_safe
from .valuation.methods import starting_point

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam/AdamW defaults, which the service's training uses
ADAM_EPS = 1e-8
MODEL_PARAMETER = "/model_id"


@dataclass(frozen=True)
class Step:
    """One optimizer step of the run: its mini-batch rows, learning rate and 1-based count."""

    rows: torch.Tensor
    learning_rate: float
    count: int


def recipe_of(problem: InfluenceProblem) -> Recipe:
    """The recipe the model was trained with; EstimatorError when the problem has none or it is no
    mini-batch run."""
    r = problem.recipe
    if r is None:
        raise EstimatorError(
            "unrolled methods replay the model's training run and need its recipe; register the model "
            "with the recipe it was trained with (models trained by the service have it)",
            parameter=MODEL_PARAMETER,
        )
    if isinstance(r, dict):
        try:
            r = Recipe(**r)
        except TypeError as e:
            raise EstimatorError(f"invalid recipe: {e}", parameter=MODEL_PARAMETER) from None
    validate_recipe(r)
    if r.optimizer == "lbfgs":
        raise EstimatorError(
            "the model was trained with full-batch L-BFGS, not a mini-batch run to unroll; use an "
            "influence function (if_exact, if_cg), which suits a model trained to its optimum",
            parameter=MODEL_PARAMETER,
        )
    return r


def batch_plan(recipe: Recipe, n: int) -> list[Step]:
    """Every step of :func:`~app.estimators.training.train`'s run on ``n`` rows: the same seeded
    ``randperm`` per epoch, cut into mini-batches, with the epoch's learning rate."""
    gen = torch.Generator().manual_seed(recipe.seed)
    steps: list[Step] = []
    for epoch in range(recipe.epochs):
        lr = learning_rate_at(recipe, epoch)
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, recipe.batch_size):
            steps.append(Step(perm[s : s + recipe.batch_size], lr, len(steps) + 1))
    return steps


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt(v) with a finite derivative where v == 0 (a coordinate that never had a gradient)."""
    positive = v > 0
    return torch.sqrt(torch.where(positive, v, torch.ones_like(v))) * positive


class Unroller:
    """A problem's training run as a differentiable function of per-example loss weights."""

    def __init__(self, problem: InfluenceProblem, recipe: Recipe, runtime: Runtime) -> None:
        model = problem.model
        if not vmap_safe(model):
            raise EstimatorError(
                "unrolled methods need a model whose training forward pass is a pure function of its "
                "parameters (no dropout, no batch norm)",
                parameter=MODEL_PARAMETER,
            )
        self.problem, self.recipe, self.runtime = problem, recipe, runtime
        self.device, self.dtype = torch.device(runtime.device), runtime.dtype
        self.model = model.eval()
        start = model_factory(starting_point(problem, runtime))(recipe.seed)
        self.names = trainable_names(model)
        _, params, self.fixed = functional_state(
            start, start.state_dict(), device=self.device, dtype=self.dtype, names=self.names
        )
        self.shapes = [params[k].shape for k in self.names]
        self.theta0 = flatten(params, self.names)
        self.p = int(self.theta0.numel())
        self.slots = {"sgd": 1 if recipe.momentum > 0 else 0, "adam": 2, "adamw": 2}[recipe.optimizer]
        self.steps = batch_plan(recipe, problem.n_train)
        self.x = problem.train_x.to(self.device, self.dtype if problem.train_x.is_floating_point() else None)
        self.y = problem.train_y.to(self.device)

    @property
    def state_size(self) -> int:
        return self.p * (1 + self.slots)

    def initial_state(self) -> torch.Tensor:
        return torch.cat([self.theta0, self.theta0.new_zeros(self.p * self.slots)])

    def theta(self, state: torch.Tensor) -> torch.Tensor:
        return state[..., : self.p]

    def params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return unflatten(theta, self.names, self.shapes)

    def _batch_loss(self, theta: torch.Tensor, w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, (self.params(theta), self.fixed), (self.x[rows],))
        y = self.y[rows]
        if y.is_floating_point():
            y = y.to(out.dtype)
        return (w * per_example_loss(out, y, self.problem.task)).sum() / len(rows)

    def step_fn(self, step: Step, at: torch.Tensor | None = None) -> Callable:
        """``(state, w) -> next state`` for ``step``; with ``at`` (the state there), the gradient and the
        coupled L2 term are evaluated at ``at`` rather than at ``state`` (Hessian-free)."""
        r, p, lr = self.recipe, self.p, step.learning_rate
        wd = r.weight_decay
        rows = step.rows.to(self.device)

        def fn(state: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            theta = state[:p]
            point = theta if at is None else at[:p]
            g = grad(self._batch_loss)(point, w, rows)
            if r.optimizer == "sgd":
                if wd:
                    g = g + wd * point
                if not self.slots:
                    return theta - lr * g
                buf = r.momentum * state[p:] + g
                return torch.cat([theta - lr * buf, buf])
            beta1, beta2 = ADAM_BETAS
            if r.optimizer == "adamw":
                theta = theta * (1 - lr * wd)
            elif wd:
                g = g + wd * point
            m = torch.lerp(state[p : 2 * p], g, 1 - beta1)
            v = beta2 * state[2 * p :] + (1 - beta2) * g * g
            denom = _safe_sqrt(v) / math.sqrt(1 - beta2**step.count) + ADAM_EPS
            return torch.cat([theta - (lr / (1 - beta1**step.count)) * m / denom, m, v])

        return fn

    def _advance(self, state: torch.Tensor, step: Step) -> torch.Tensor:
        nxt = self.step_fn(step)(state, torch.ones(len(step.rows), device=self.device, dtype=self.dtype))
        if not bool(torch.isfinite(nxt).all()):
            raise NumericalError(
                f"replaying the training run diverged at step {step.count} (NaN/inf weights)",
                parameter=MODEL_PARAMETER,
            )
        return nxt.detach()

    def segment_length(self, requested: int | None) -> int:
        """Steps per segment: ``requested``, else ``ceil(sqrt(T))`` (fewest states kept). The replay holds
        the segment starts plus one segment's states; EstimatorError when they exceed the runtime's
        memory budget."""
        T = len(self.steps)
        K = max(1, min(T, requested if requested is not None else math.ceil(math.sqrt(max(T, 1)))))
        budget = self.runtime.memory_budget_bytes
        held = (math.ceil(T / K) + K) * self.state_size * self.theta0.element_size()
        if budget is not None and held > budget:
            raise EstimatorError(
                f"replaying {T} steps keeps {math.ceil(T / K)} segment starts and {K} states of "
                f"{self.state_size:,} numbers ({held / 2**20:,.0f} MiB), more than the memory budget "
                f"({budget / 2**20:,.0f} MiB); "
                + (
                    "set segment_length near sqrt(T) to keep the fewest"
                    if requested is not None
                    else "the model or its run is too large to unroll within it (raise the budget)"
                ),
                parameter="/method/params/segment_length",
            )
        return K

    def replay(self, segment: int, ticker: Ticker | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the recipe forward: ``(segment starts, S x state_size; final state)``; the states at
        steps 0, K, 2K, ... are what the backward sweep restarts from."""
        state = self.initial_state()
        starts = []
        for t, step in enumerate(self.steps):
            if t % segment == 0:
                starts.append(state)
            state = self._advance(state, step)
            if ticker is not None:
                ticker.tick()
        return torch.stack(starts), state

    def states_after(self, counts: list[int]) -> dict[int, torch.Tensor]:
        """The replayed states after ``count`` optimizer steps, for each count (e.g. checkpoint steps)."""
        wanted, out = set(counts), {}
        state = self.initial_state()
        if 0 in wanted:
            out[0] = state
        for step in self.steps:
            if step.count > max(wanted):
                break
            state = self._advance(state, step)
            if step.count in wanted:
                out[step.count] = state
        missing = sorted(wanted - set(out))
        if missing:
            raise EstimatorError(
                f"the recipe's run has {len(self.steps)} steps; there is no step {missing[0]}",
                parameter="/checkpoint_ids",
            )
        return out

    def adam_step_scales(self, state: torch.Tensor, count: int) -> torch.Tensor:
        """Adam's per-parameter step scale after ``count`` steps: ``1 / (sqrt(v_hat) + eps)``."""
        v = state[2 * self.p :]
        return 1.0 / (_safe_sqrt(v) / math.sqrt(1 - ADAM_BETAS[1] ** max(count, 1)) + ADAM_EPS)

    def final_state(self, starts: torch.Tensor, segment: int) -> torch.Tensor:
        """The state after the last step, replayed from the last segment start."""
        state = starts[-1].to(self.device, self.dtype)
        for step in self.steps[(starts.shape[0] - 1) * segment :]:
            state = self._advance(state, step)
        return state

    def metagradients(
        self,
        starts: torch.Tensor,
        segment: int,
        cotangent: torch.Tensor,
        *,
        hessian: bool = True,
        ticker: Ticker | None = None,
    ) -> torch.Tensor:
        """``m x n``: ``d q_j(theta_T) / d w_i`` for the rows of ``cotangent`` (``m x p``:
        ``d q_j / d theta_T``), pulled back through every step of the run."""
        m = int(cotangent.shape[0])
        adj = torch.cat([cotangent, cotangent.new_zeros(m, self.p * self.slots)], dim=1)
        out = torch.zeros(m, self.problem.n_train, device=self.device, dtype=self.dtype)
        T = len(self.steps)
        for s in reversed(range(starts.shape[0])):
            lo, hi = s * segment, min((s + 1) * segment, T)
            states = [starts[s].to(self.device, self.dtype)]
            for t in range(lo, hi - 1):
                states.append(self._advance(states[-1], self.steps[t]))
            for t in reversed(range(lo, hi)):
                step, state = self.steps[t], states[t - lo]
                w = torch.ones(len(step.rows), device=self.device, dtype=self.dtype)
                _, pull = vjp(self.step_fn(step, None if hessian else state), state, w)
                adj, dw = vmap(pull)(adj)
                out.index_add_(1, step.rows.to(self.device), dw)
                if ticker is not None:
                    ticker.tick()
            if not bool(torch.isfinite(adj).all()):
                raise NumericalError(
                    f"the backward sweep through the training run overflowed before step {lo + 1} "
                    "(the run is too unstable to differentiate; lower the learning rate, or use fewer "
                    "epochs)",
                    parameter=MODEL_PARAMETER,
                )
        return out

    def replay_error(self, state: torch.Tensor, recorded: dict[str, torch.Tensor] | None = None) -> float:
        """Relative L2 distance between a replayed state's weights and recorded ones (default: the
        registered final weights; a checkpoint's for a state at its step)."""
        recorded = self.problem.weights if recorded is None else recorded
        registered = flatten({k: recorded[k].to(self.device, self.dtype) for k in self.names}, self.names)
        theta = self.theta(state)
        return float((theta - registered).norm() / registered.norm().clamp_min(1e-30))

    def final_state_dict(self, final: torch.Tensor) -> dict[str, torch.Tensor]:
        """The replayed final weights as a state dict (fixed tensors included), for query gradients."""
        return {**self.fixed, **self.params(self.theta(final))}
