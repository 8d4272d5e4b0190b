"""DataInf pitfall (ESTIMATORS.md 2.15): the swap error grows with the layer size d_l, so metadata warns
when a used layer has more than SWAP_WARN_LAYER_SIZE parameters (the threshold's measurements are in
app/estimators/methods/datainf.py and test_influence_solvers.py)."""

from __future__ import annotations

import torch

from app.estimators import InfluenceProblem, Runtime, TaskSpec, get_estimator, init_model
from app.estimators.methods.datainf import SWAP_WARN_LAYER_SIZE

torch.set_num_threads(1)

CLS = TaskSpec("classification", "cross_entropy")
F64 = Runtime(dtype=torch.float64, chunk_size=16)


def _problem(arch: str, params: dict, d_in: int, k: int) -> InfluenceProblem:
    g = torch.Generator().manual_seed(0)
    model = init_model(arch, params, 0).double()
    x = torch.randn(30, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (30,), generator=g)
    return InfluenceProblem(
        model=model,
        task=CLS,
        weights=model.state_dict(),
        train_x=x,
        train_y=y,
        query_x=x[:3],
        query_y=y[:3],
        weight_decay=1e-2,
    )


def test_datainf_no_warning_for_small_layers():
    prob = _problem("linear", {"in_features": 3, "num_classes": 2}, 3, 2)  # one layer, d_l = 2 x 4 = 8
    md = get_estimator("datainf").attribute(prob, {}, runtime=F64).metadata
    assert md["layer_sizes"] == [SWAP_WARN_LAYER_SIZE] and md["warnings"] == []
    assert md["swap_warn_layer_size"] == SWAP_WARN_LAYER_SIZE


def test_datainf_warns_for_full_layers_and_names_them():
    mlp = {"in_features": 4, "hidden": [16], "num_classes": 3, "activation": "tanh"}
    prob = _problem("mlp", mlp, 4, 3)
    est = get_estimator("datainf")
    full = est.attribute(prob, {}, runtime=F64).metadata  # default: every layer (80 and 51 parameters)
    assert full["layer_sizes"] == [80, 51] and len(full["warnings"]) == 1
    text = full["warnings"][0]
    assert "2 of the 2 used layer(s)" in text and "(80)" in text and "(51)" in text
    assert "damping_scale (now 0.1)" in text and "if_cg" in text
    last = est.attribute(prob, {"layers": ["last"], "damping_scale": 1.0}, runtime=F64).metadata
    assert len(last["warnings"]) == 1 and "1 of the 1 used layer(s)" in last["warnings"][0]
    assert "(51)" in last["warnings"][0] and "(80)" not in last["warnings"][0]
    assert "damping_scale (now 1)" in last["warnings"][0]
    # a bottleneck MLP whose output layer is small: only the first layer (4 x 1 + 1 = 5) is fine too
    tiny = _problem("mlp", {**mlp, "hidden": [1]}, 4, 3)
    md = est.attribute(tiny, {}, runtime=F64).metadata
    assert md["layer_sizes"] == [5, 6] and md["warnings"] == []
