"""tracincp (and if_exact) against captum 0.9 (ESTIMATORS.md 2.23, 2.10, section 9).

TracInCP adapter:

* the checkpoints our ``train()`` recorded are saved to disk as captum expects,
  ``{"model_state_dict": ..., "learning_rate": eta_t}`` with ``eta_t`` the
  checkpoint's ``Checkpoint.learning_rate``, read back by a ``checkpoints_load_func``
  that returns ``eta_t`` (captum's default loader would choke on the extra key);
* captum's ``influence((x, y))`` is already query-major, ``sum_t eta_t g'_t . g_t``,
  positive = proponent, no ``1/n``: no conversion at all;
* loss reductions: ``reduction="none"`` needs ``sample_wise_grads_per_batch=False``
  (one backward per example); ``"sum"`` and ``"mean"`` need
  ``sample_wise_grads_per_batch=True`` and captum rescales a mean by the batch
  size, so all three give per-example gradients of the unreduced loss.

NaiveInfluenceFunction adapter: captum's Hessian is of the *summed* loss over
the Hessian loader, so ``hessian_reg = n * weight_decay`` reproduces our ``H + wd``
times ``n``, and ``g'^T (n H)^-1 g_i`` already carries our ``1/n``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("scipy")
captum_influence = pytest.importorskip("captum.influence")

from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from app.estimators import get_estimator  # noqa: E402

from .workloads import F64, assert_sign_agreement, logreg_cancer, mlp_digits, report  # noqa: E402

pytestmark = [
    pytest.mark.peers,
    # the peer libraries' own deprecation noise (torch.cuda.amp, pkg_resources, ...)
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    # captum's sample-wise-gradient trick marks the inputs as requiring grad itself
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients"),
]


def _save_checkpoints(w, directory) -> list[str]:
    paths = []
    for t, ck in enumerate(w.checkpoints):
        path = directory / f"checkpoint-{t}-step{ck.step}.pt"
        torch.save({"model_state_dict": ck.state, "learning_rate": float(ck.learning_rate)}, path)
        paths.append(str(path))
    return paths


def _load_checkpoint(model: nn.Module, path: str) -> float:
    saved = torch.load(path)
    model.load_state_dict(saved["model_state_dict"])
    return float(saved["learning_rate"])


@pytest.fixture(scope="module")
def mlp_checkpoints(tmp_path_factory):
    w = mlp_digits()
    assert len(w.checkpoints) == 3 and len({ck.learning_rate for ck in w.checkpoints}) == 3
    return w, _save_checkpoints(w, tmp_path_factory.mktemp("captum-ckpts"))


@pytest.mark.parametrize(
    "reduction,sample_wise", [("none", False), ("sum", True), ("mean", True)], ids=["none", "sum", "mean"]
)
def test_tracincp_matches_captum(mlp_checkpoints, reduction, sample_wise):
    w, paths = mlp_checkpoints
    out = get_estimator("tracincp").attribute(
        w.problem(checkpoints=True), None, want_self_influence=True, runtime=F64
    )
    tracin = captum_influence.TracInCP(
        w.fresh_model(),
        TensorDataset(w.train_x, w.train_y),
        paths,
        checkpoints_load_func=_load_checkpoint,
        loss_fn=nn.CrossEntropyLoss(reduction=reduction),
        batch_size=128,
        sample_wise_grads_per_batch=sample_wise,
    )
    peer = tracin.influence((w.query_x, w.query_y)).detach().to(torch.float64).numpy()
    assert peer.shape == (w.m, w.n)
    fig = report(f"tracincp vs captum TracInCP (loss reduction {reduction!r}, {w.name})", out.scores, peer)
    assert fig["spearman_min"] >= 0.99
    np.testing.assert_allclose(out.scores, peer, rtol=1e-8, atol=1e-10 * np.abs(peer).max())
    assert_sign_agreement(out.scores, peer)
    peer_self = tracin.self_influence().detach().to(torch.float64).numpy()
    np.testing.assert_allclose(out.self_influence, peer_self, rtol=1e-8)


def test_tracincp_last_layer_matches_captum(mlp_checkpoints):
    """Layer selection: our ``layers=["last"]`` (the output nn.Linear, module "3") = captum
    ``layers=["3"]``."""
    w, paths = mlp_checkpoints
    ours = w.ours("tracincp", {"layers": ["last"]}, checkpoints=True)
    tracin = captum_influence.TracInCP(
        w.fresh_model(),
        TensorDataset(w.train_x, w.train_y),
        paths,
        checkpoints_load_func=_load_checkpoint,
        layers=["3"],
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=128,
        sample_wise_grads_per_batch=True,
    )
    peer = tracin.influence((w.query_x, w.query_y)).detach().to(torch.float64).numpy()
    report(f"tracincp last layer vs captum TracInCP layers=['3'] ({w.name})", ours, peer)
    np.testing.assert_allclose(ours, peer, rtol=1e-8, atol=1e-10 * np.abs(peer).max())


def test_tracincp_unit_learning_rates_match_captum_default_lr(mlp_checkpoints, tmp_path):
    """``use_checkpoint_learning_rates=False`` = captum with checkpoints saved without a learning rate."""
    w, _ = mlp_checkpoints
    paths = []
    for t, ck in enumerate(w.checkpoints):
        paths.append(str(tmp_path / f"plain-{t}.pt"))
        torch.save(ck.state, paths[-1])  # captum's default loader: plain state dict, lr defaults to 1
    ours = w.ours("tracincp", {"use_checkpoint_learning_rates": False}, checkpoints=True)
    tracin = captum_influence.TracInCP(
        w.fresh_model(),
        TensorDataset(w.train_x, w.train_y),
        paths,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=128,
    )
    peer = tracin.influence((w.query_x, w.query_y)).detach().to(torch.float64).numpy()
    np.testing.assert_allclose(ours, peer, rtol=1e-8, atol=1e-10 * np.abs(peer).max())


def test_if_exact_matches_captum_naive_influence(tmp_path):
    w = logreg_cancer()
    path = tmp_path / "final.pt"
    torch.save(w.weights, path)
    p = sum(v.numel() for v in w.weights.values())
    ours = w.ours("if_exact", {"damping": 0.0})
    nif = captum_influence.NaiveInfluenceFunction(
        w.fresh_model(),
        TensorDataset(w.train_x, w.train_y),
        str(path),
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=w.n,
        projection_dim=p,  # full rank: the exact inverse
        hessian_reg=w.n * w.weight_decay,  # captum's Hessian is of the summed loss
        hessian_inverse_tol=1e-12,
    )
    peer = nif.influence((w.query_x, w.query_y)).detach().to(torch.float64).numpy()
    fig = report(f"if_exact vs captum NaiveInfluenceFunction ({w.name})", ours, peer)
    assert fig["spearman_min"] >= 0.99
    np.testing.assert_allclose(ours, peer, rtol=1e-6, atol=1e-9 * np.abs(peer).max())
