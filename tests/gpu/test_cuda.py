"""Estimators on CUDA give the CPU's answers (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from app.estimators import (
    REGISTRY,
    Checkpoint,
    InfluenceProblem,
    Runtime,
    TaskSpec,
    get_architecture,
    init_model,
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
