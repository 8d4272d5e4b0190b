"""magic (and sgd_influence, hydra with the Hessian) against bergson 2.5's MAGIC (ESTIMATORS.md 2.27).

bergson differentiates a functional torchopt training loop (``bergson.magic.trainer.Trainer``) with
respect to a weight on every training row. Adapter (bergson -> ours):

* bergson calls ``model(**batch)`` and differentiates the scalar it returns: the wrapped model returns
  our batch loss ``sum_{i in B} w_i L_i / |B|`` with ``w = stream.weights[B]``;
* the batch order is our recipe's (:func:`app.estimators.unroll.batch_plan`: the seeded ``randperm`` per
  epoch), the initial weights the architecture's seeded init, the optimizer torchopt's SGD or Adam with
  torch.optim's settings, float64 throughout (torchopt's Adam bias correction runs in the default
  dtype, so the test sets it to float64);
* bergson returns ``d q_j / d w`` for one query objective per backward run; ours is ``-d q_j / d w``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("TQDM_DISABLE", "1")
torchopt = pytest.importorskip("torchopt")
trainer_module = pytest.importorskip("bergson.magic.trainer")

from app.estimators import InfluenceProblem, Recipe, Runtime, TaskSpec, get_estimator, init_model, train  # noqa: E402
from app.estimators.unroll import batch_plan  # noqa: E402

pytestmark = [
    pytest.mark.peers,
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

F64 = Runtime(dtype=torch.float64, chunk_size=16)
MLP = {"in_features": 5, "hidden": [4], "num_classes": 3}


class _WeightedLoss(nn.Module):
    """What bergson's trainer calls: the batch's weighted mean loss from keyword inputs."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, input_ids, targets, example_weight):  # "input_ids": bergson's loss_denom looks for it
        return (example_weight * F.cross_entropy(self.net(input_ids), targets, reduction="none")).sum() / len(
            targets
        )


class _Stream:
    """The parts of bergson's DataStream its trainer uses: len, step -> batch kwargs, a leaf weight tensor."""

    def __init__(self, x, y, steps) -> None:
        self.x, self.y, self.steps = x, y, steps
        self.device = torch.device("cpu")
        self.weights = nn.Parameter(torch.ones(len(x), dtype=torch.float64))

    @property
    def requires_grad(self) -> bool:
        return self.weights.requires_grad

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        self.weights.requires_grad = value

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.steps):
            raise IndexError(i)
        rows = self.steps[i]
        return {"input_ids": self.x[rows], "targets": self.y[rows], "example_weight": self.weights[rows]}


def _bergson_metagradient(prob, recipe: Recipe, initial: dict, optimizer, query: int) -> np.ndarray:
    """bergson's d q_query(theta_T) / d w over the recipe's run from ``initial`` (one forward, one
    backward), with float64 as the default dtype (torchopt's Adam bias correction uses it)."""
    net = init_model("mlp", MLP, 0).double()
    net.load_state_dict(initial)
    model = _WeightedLoss(net)
    trainer, state = trainer_module.Trainer.initialize(model, optimizer)
    stream = _Stream(prob.train_x, prob.train_y, [s.rows for s in batch_plan(recipe, prob.n_train)])
    folder = tempfile.mkdtemp(prefix="bergson-magic-")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        state = trainer.train(state, stream, save_dir=folder, save_mode="sqrt")
        with state.activate(model) as params:
            loss = F.cross_entropy(
                model.net(prob.query_x[query : query + 1]), prob.query_y[query : query + 1]
            )
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        slots = [
            torch.zeros_like(t)
            for t in torchopt.pytree.tree_iter(state.opt_state)
            if isinstance(t, torch.Tensor) and t.is_floating_point()
        ]
        stream.requires_grad = True
        backward = trainer_module.BackwardState(
            {k: grads[k].detach() for k in state.params}, slots, torch.zeros_like(stream.weights)
        )
        backward = trainer.backward(folder, stream, backward, state, cleanup=True, save_mode="sqrt")
        return backward.weight_grads.detach().numpy().copy()
    finally:
        torch.set_default_dtype(default)
        shutil.rmtree(folder, ignore_errors=True)


def _problem(recipe: Recipe) -> InfluenceProblem:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(44, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (44,), generator=g)
    model = init_model("mlp", MLP, recipe.seed).double()
    res = train(model, TaskSpec(), x[:40], y[:40], recipe)
    return InfluenceProblem(
        model, TaskSpec(), res.weights, x[:40], y[:40], x[40:], y[40:], recipe=dataclasses.asdict(recipe)
    )


CASES = {
    "sgd": (
        Recipe(learning_rate=0.1, epochs=3, batch_size=8, seed=2),
        lambda r: torchopt.sgd(r.learning_rate),
    ),
    "sgd-momentum": (
        Recipe(learning_rate=0.05, momentum=0.9, epochs=3, batch_size=8, seed=3),
        lambda r: torchopt.sgd(r.learning_rate, momentum=r.momentum),
    ),
    "adam": (
        Recipe(optimizer="adam", learning_rate=0.01, epochs=3, batch_size=8, seed=4),
        lambda r: torchopt.adam(r.learning_rate, betas=(0.9, 0.999), eps=1e-8, eps_root=0.0),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_magic_equals_bergson(case):
    recipe, make_optimizer = CASES[case]
    prob = _problem(recipe)
    ours = get_estimator("magic").attribute(prob, None, runtime=F64).scores
    initial = init_model("mlp", MLP, recipe.seed).double().state_dict()  # the run's seeded start
    peer = np.stack(
        [-_bergson_metagradient(prob, recipe, initial, make_optimizer(recipe), j) for j in range(4)]
    )
    rel = float(np.abs(ours - peer).max() / np.abs(peer).max())
    print(f"\nmagic vs bergson MAGIC ({case}): max |ours - peer| / max |peer| = {rel:.1e}")
    assert rel < 1e-8
    if case == "sgd":  # plain SGD: SGD-influence and full HyDRA are the same derivative
        for name, params in (("sgd_influence", None), ("hydra", {"hessian": True})):
            other = get_estimator(name).attribute(prob, params, runtime=F64).scores
            assert np.abs(other - peer).max() / np.abs(peer).max() < 1e-8, name
