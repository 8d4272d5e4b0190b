"""Representer pitfall (ESTIMATORS.md 2.19): it explains the L2-refitted head, not the trained network.

Metadata ``head_fidelity`` measures the gap on the training set, ``warnings`` flags a poor one.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from app.estimators import InfluenceProblem, Recipe, Runtime, TaskSpec, get_estimator, init_model, train
from app.estimators.methods.representer import HEAD_AGREEMENT_WARNING

torch.set_num_threads(1)

CLS = TaskSpec("classification", "cross_entropy")
F64 = Runtime(dtype=torch.float64, chunk_size=32)
MLP = {"in_features": 5, "hidden": [16], "num_classes": 3, "activation": "tanh"}


def _problem(flipped: int) -> InfluenceProblem:
    """The test_representer fixture (blobs, 120 rows, 8 epochs of SGD), with ``flipped`` labels flipped."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (120,), generator=g)
    x = 1.5 * torch.randn(3, 5, generator=g, dtype=torch.float64)[y] + torch.randn(
        120, 5, generator=g, dtype=torch.float64
    )
    if flipped:
        idx = torch.randperm(120, generator=torch.Generator().manual_seed(5))[:flipped]
        y[idx] = (y[idx] + 1) % 3
    model = init_model("mlp", MLP, 0).double()
    res = train(model, CLS, x, y, Recipe(learning_rate=0.2, epochs=8, batch_size=16))
    return InfluenceProblem(
        model=model, task=CLS, weights=res.weights, train_x=x, train_y=y, query_x=x[:5], query_y=y[:5]
    )


@pytest.fixture(scope="module")
def clean():
    return _problem(0)


def test_head_fidelity_near_one_on_a_well_fit_case(clean):
    est = get_estimator("representer")
    out = est.attribute(clean, {}, runtime=F64)  # l2 = 1e-3, targets = "model"
    fid = out.metadata["head_fidelity"]
    print(f"\nrepresenter head fidelity (clean blobs, defaults): {fid}")
    assert fid["prediction_agreement"] == 1.0
    assert fid["relative_logit_difference"] < 0.1 and fid["mean_abs_logit_difference"] < 0.15
    assert out.metadata["warnings"] == []
    # the figure is what it says: centred logits of the trained network against those of the refitted head
    state = est.fit(clean, {}, F64)
    model = clean.model
    model.load_state_dict(clean.weights)
    model.eval()
    with torch.no_grad():
        z0 = model(clean.train_x)
    z = state.tensors["features"] @ state.tensors["theta"].T
    z0, z = z0 - z0.mean(1, keepdim=True), z - z.mean(1, keepdim=True)
    assert fid["prediction_agreement"] == float((z.argmax(1) == z0.argmax(1)).double().mean())
    assert fid["mean_abs_logit_difference"] == pytest.approx(float((z - z0).abs().mean()), rel=1e-9)
    assert fid["mean_abs_model_logit"] == pytest.approx(float(z0.abs().mean()), rel=1e-9)
    # a state cached before the figure existed: attribute recomputes it from the state and the weights
    old = dataclasses.replace(state, info={k: v for k, v in state.info.items() if k != "head_fidelity"})
    again = est.attribute(clean, {}, runtime=F64, state=old, train_range=(0, 60)).metadata["head_fidelity"]
    assert again == pytest.approx(fid, rel=1e-12)


def test_head_fidelity_drops_and_warns_with_strong_l2_on_noisy_labels(clean):
    est = get_estimator("representer")
    # more l2 pulls the head away from the network's logits even when the classes still agree
    fids = [est.attribute(clean, {"l2": l2}, runtime=F64).metadata["head_fidelity"] for l2 in (1e-3, 1e-1)]
    assert fids[1]["mean_abs_logit_difference"] > 5 * fids[0]["mean_abs_logit_difference"]
    noisy = _problem(20)  # 20 of 120 labels flipped: the network fits a harder boundary
    out = est.attribute(noisy, {"l2": 1.0}, runtime=F64)
    fid = out.metadata["head_fidelity"]
    print(f"\nrepresenter head fidelity (20 flipped labels, l2=1): {fid}")
    assert fid["prediction_agreement"] < HEAD_AGREEMENT_WARNING - 0.1
    assert len(out.metadata["warnings"]) == 1
    text = out.metadata["warnings"][0]
    assert f"on only {fid['prediction_agreement']:.1%} of the training rows" in text
    assert "not the trained network" in text
