"""Submit-time checks: the trainable p, Hessian-order group solves (p x G) and Arnoldi bases (p x n_iter)."""

from __future__ import annotations

import pytest

from app.estimators import ProblemSize, get_estimator
from app.problems import ProblemError
from app.schemas.jobs import JobCreate
from app.services.jobs import GROUP_SOLVE_BLOCKS, _validate_groups
from app.settings import Settings


def _body(order: str, n_groups: int) -> JobCreate:
    members = {f"g{i}": [i] for i in range(n_groups)}
    return JobCreate.model_validate(
        {
            "model_id": "m",
            "train_dataset_id": "d",
            "method": {"name": "if_exact"},
            "output": {"groups": {"members": members, "order": order}},
        }
    )


def test_hessian_order_groups_must_fit_the_memory_budget(tmp_path):
    p, groups = 1_000_000, 100
    settings = Settings(data_dir=tmp_path, memory_budget_bytes=GROUP_SOLVE_BLOCKS * 8 * p * groups)
    size = ProblemSize(n_train=1000, n_query=10, n_parameters=p, n_checkpoints=0)
    est = get_estimator("if_exact")
    _validate_groups(_body("second", groups), est, est.Params(), size, settings)  # exactly the budget
    with pytest.raises(ProblemError) as info:
        _validate_groups(_body("newton", groups + 1), est, est.Params(), size, settings)
    assert info.value.errors[0].pointer == "/output/groups/members" and "order 'first'" in info.value.detail
    _validate_groups(_body("first", groups + 1), est, est.Params(), size, settings)  # sums of scores


@pytest.mark.parametrize(("name", "params"), [("if_arnoldi", {}), ("relatif", {"inverse": "arnoldi"})])
def test_arnoldi_bases_must_fit_the_memory_budget(name, params):
    """The default rank 50 (n_iter 150) on a 6.6M-parameter ResNet-9 is ~10 GiB of basis."""
    from app.estimators import EstimatorError

    est, budget = get_estimator(name), 2 * 2**30
    est.check_memory(ProblemSize(1000, 10, 100_000, 0), params, budget)  # 160 MB: fine
    with pytest.raises(EstimatorError) as info:
        est.check_memory(ProblemSize(1000, 10, 6_600_000, 0), params, budget)
    assert info.value.parameter == "/method/params/n_iter" and "GiB" in info.value.detail
    est.check_memory(ProblemSize(1000, 10, 6_600_000, 0), {**params, "rank": 10, "n_iter": 20}, budget)


def test_submit_time_p_is_the_trainable_count():
    """A LoRA model's frozen base is not in p: if_exact's max_parameters and the cost checks count the
    adapters only, as the estimators do."""
    from app.db.models import Model
    from app.services.models import trainable_parameters

    params = {"in_features": 64, "hidden": [64], "num_classes": 10, "rank": 2}
    lora = Model(architecture="lora_mlp", architecture_params=params)
    assert trainable_parameters(lora) == 2 * (64 + 64) + 2 * (64 + 10) == 404
    mlp = Model(
        architecture="mlp", architecture_params={"in_features": 64, "hidden": [64], "num_classes": 10}
    )
    assert trainable_parameters(mlp) == 64 * 64 + 64 + 64 * 10 + 10


def test_a_negative_batch_norm_variance_is_refused_at_upload():
    from torch import nn

    from app.services.models import _check_state

    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    state = {k: v.clone() for k, v in module.state_dict().items()}
    _check_state(module, state, "/weights")
    state["1.running_var"][2] = -0.5  # its square root in the forward pass is NaN
    with pytest.raises(ProblemError) as info:
        _check_state(module, state, "/weights")
    assert "1.running_var" in info.value.detail and "negative" in info.value.detail
