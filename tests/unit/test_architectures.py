"""The server-side architecture registry."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from app.estimators import EstimatorError, n_parameters
from app.estimators import architectures as A


@pytest.mark.parametrize(
    ("name", "params", "in_shape", "out_shape"),
    [
        ("linear", {"in_features": 7, "num_classes": 3}, (5, 7), (5, 3)),
        ("linear", {"in_features": 7, "num_classes": 1}, (5, 7), (5, 1)),
        ("mlp", {"in_features": 7, "hidden": [8, 4], "num_classes": 3, "activation": "gelu"}, (5, 7), (5, 3)),
        ("mlp", {"in_features": 7, "hidden": [], "num_classes": 2}, (5, 7), (5, 2)),
        ("lora_mlp", {"in_features": 7, "hidden": [8], "num_classes": 3, "rank": 2}, (5, 7), (5, 3)),
        ("lora_mlp", {"in_features": 7, "hidden": [], "num_classes": 1, "rank": 1}, (5, 7), (5, 1)),
        ("cnn", {}, (5, 64), (5, 10)),
        ("cnn", {"in_channels": 3, "height": 5, "width": 7, "channels": [4, 4, 4]}, (5, 3, 5, 7), (5, 10)),
        ("resnet9", {"height": 16, "width": 16, "base_channels": 8}, (2, 3 * 16 * 16), (2, 10)),
        (
            "resnet9",
            {"in_channels": 1, "height": 8, "width": 8, "base_channels": 4, "num_classes": 3},
            (2, 1, 8, 8),
            (2, 3),
        ),
    ],
)
def test_output_shapes(name, params, in_shape, out_shape):
    arch = A.get_architecture(name)
    model = A.init_model(arch, params, seed=0)
    p = A.make_params(arch, params)
    assert arch.n_outputs(p) == out_shape[1]
    assert arch.n_features(p) == int(torch.tensor(in_shape[1:]).prod())
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(*in_shape)).shape == out_shape


def test_flat_and_image_inputs_agree():
    model = A.init_model("cnn", {"in_channels": 2, "height": 4, "width": 4}, 1).eval()
    x = torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(model(x), model(x.reshape(3, -1)))


def test_resnet9_default_parameter_count():
    p = n_parameters(A.init_model("resnet9"))
    assert 6_500_000 <= p <= 6_700_000, p


def test_init_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = A.init_model("mlp", {"in_features": 4}, seed=5).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    b = A.init_model("mlp", {"in_features": 4}, seed=5).state_dict()
    c = A.init_model("mlp", {"in_features": 4}, seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_architecture():
    with pytest.raises(EstimatorError) as e:
        A.get_architecture("transformer-xxl")
    assert e.value.parameter == "/architecture/name"
    assert "resnet9" in e.value.detail and "linear" in e.value.detail


def test_params_are_documented_dataclasses_with_defaults():
    for arch in A.ARCHITECTURES.values():
        assert dataclasses.is_dataclass(arch.Params) and arch.Params.__doc__
        arch.Params()  # every field has a default
        for f in dataclasses.fields(arch.Params):
            assert f.metadata.get("description"), (arch.name, f.name)


def test_entry_point_loader_without_entry_points():
    before = dict(A.ARCHITECTURES)
    assert A.load_entry_point_architectures(group="influence_service.no_such_group") == []
    assert A.load_entry_point_architectures() == []
    assert A.ARCHITECTURES == before


class _FakeEntryPoint:
    def __init__(self, name, obj):
        self.name, self._obj = name, obj

    def load(self):
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


def test_entry_point_loader_adds_good_and_skips_bad(monkeypatch, caplog):
    good = A.Architecture(
        "tiny_plugin",
        "a plugin model",
        A.LinearParams,
        lambda p: torch.nn.Linear(p.in_features, 1),
        lambda p: p.in_features,
        lambda p: 1,
    )
    shadow = dataclasses.replace(good, name="linear")
    eps = [
        _FakeEntryPoint("good", good),
        _FakeEntryPoint("shadow", [shadow]),
        _FakeEntryPoint("not-an-architecture", object()),
        _FakeEntryPoint("broken", ImportError("no module named foo")),
    ]
    monkeypatch.setattr(A.importlib_metadata, "entry_points", lambda group: eps)
    builtin_linear = A.ARCHITECTURES["linear"]
    try:
        with caplog.at_level(logging.WARNING):
            added = A.load_entry_point_architectures()
        assert [a.name for a in added] == ["tiny_plugin"]
        assert A.get_architecture("tiny_plugin") is good
        assert A.ARCHITECTURES["linear"] is builtin_linear
        assert "broken" in caplog.text and "not-an-architecture" in caplog.text
    finally:
        A.ARCHITECTURES.pop("tiny_plugin", None)
