"""Estimators on CUDA give the CPU's answers (skipped without a GPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from sklearn.datasets import load_digits

from app.estimators import (
    REGISTRY,
    Checkpoint,
    InfluenceProblem,
    Recipe,
    Runtime,
    TaskSpec,
    get_architecture,
    init_model,
    train,
)
from app.services.validation import validate_params

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def problem() -> InfluenceProblem:
    arch = get_architecture("mlp")
    params = validate_params(arch.Params, {"in_features": 64, "hidden": [32], "num_classes": 10}, "")
    states = [init_model(arch, params, seed=s).state_dict() for s in range(3)]
    digits = load_digits()
    x = torch.tensor(digits.data / 16, dtype=torch.float32)
    y = torch.tensor(digits.target)
    return InfluenceProblem(
        model=init_model(arch, params, seed=0),
        task=TaskSpec(),
        weights=states[0],
        train_x=x[:600],
        train_y=y[:600],
        query_x=x[600:620],
        query_y=y[600:620],
        weight_decay=1e-2,
        checkpoints=[Checkpoint(i, 0.1, s) for i, s in enumerate(states)],
    )


@pytest.mark.parametrize(
    "method,params",
    [
        ("grad_dot", {}),
        ("tracincp", {}),
        ("tracincp", {"projection_dim": 256}),
        ("tracincp", {"projection_dim": 256, "projection": "countsketch"}),
        ("if_exact", {"damping": 0.5}),  # closed-form MLP Hessian (untrained: indefinite below ~0.4)
        ("ekfac", {"damping": 1e-2}),
        ("trak", {"projection_dim": 512}),
        ("if_cg", {"damping": 1e-2}),
    ],
)
def test_cuda_matches_cpu(problem, method, params):
    _assert_cuda_matches_cpu(problem, method, params)


def _assert_cuda_matches_cpu(problem: InfluenceProblem, method: str, params: dict) -> None:
    """Scores and self-influence of ``method`` on CUDA equal the CPU's."""
    estimator = REGISTRY[method]
    p = validate_params(estimator.Params, params, "")
    cpu = estimator.attribute(problem, p, want_self_influence=True, runtime=Runtime())
    gpu = estimator.attribute(
        problem, p, want_self_influence=True, runtime=Runtime(device=torch.device("cuda"))
    )
    torch.testing.assert_close(torch.as_tensor(gpu.scores), torch.as_tensor(cpu.scores), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(
        torch.as_tensor(gpu.self_influence), torch.as_tensor(cpu.self_influence), rtol=1e-3, atol=1e-5
    )


@pytest.fixture(scope="module")
def conv_problem() -> InfluenceProblem:
    """A narrow ResNet-9 on digits (1 x 8 x 8): per-example gradients by the closed forms of
    ``app.estimators.layerwise`` (unfolded patches, batch norm), EK-FAC's refit from layer rows."""
    arch = {"in_channels": 1, "height": 8, "width": 8, "num_classes": 10, "base_channels": 4}
    model = init_model("resnet9", arch, seed=0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    state = model.state_dict()
    digits = load_digits()
    x = torch.tensor(digits.data / 16, dtype=torch.float32)
    y = torch.tensor(digits.target)
    return InfluenceProblem(
        model=model,
        task=TaskSpec(),
        weights=state,
        train_x=x[:300],
        train_y=y[:300],
        query_x=x[600:610],
        query_y=y[600:610],
        weight_decay=1e-2,
        checkpoints=[Checkpoint(0, 0.1, state)],
    )


@pytest.mark.parametrize(
    "method,params",
    [
        ("grad_dot", {}),
        ("tracincp", {"projection_dim": 256, "projection": "countsketch"}),
        ("ekfac", {"damping": 1e-2}),
    ],
)
def test_cuda_matches_cpu_on_a_conv_net(conv_problem, method, params, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the CPU's float32 convolutions
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    _assert_cuda_matches_cpu(conv_problem, method, params)


@pytest.fixture(scope="module")
def trained_problem(problem) -> InfluenceProblem:
    """The mlp trained here by a recorded recipe (two epochs, two checkpoints): what the unrolled methods
    replay and SOURCE segments."""
    recipe = Recipe(
        learning_rate=0.1, momentum=0.9, epochs=2, batch_size=64, weight_decay=1e-2, num_checkpoints=2
    )
    model = init_model("mlp", {"in_features": 64, "hidden": [32], "num_classes": 10}, seed=recipe.seed)
    result = train(model, TaskSpec(), problem.train_x, problem.train_y, recipe)
    return dataclasses.replace(
        problem, weights=result.weights, checkpoints=result.checkpoints, recipe=dataclasses.asdict(recipe)
    )


@pytest.mark.parametrize("method,params", [("magic", {}), ("hydra", {}), ("source", {})])
def test_cuda_matches_cpu_on_a_recorded_run(trained_problem, method, params):
    """The replay on the GPU (float32 rounding differs from the CPU's) stays within the replay tolerance,
    and the unrolled scores match."""
    _assert_cuda_matches_cpu(trained_problem, method, params)
