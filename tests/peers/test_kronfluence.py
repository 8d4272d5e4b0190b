"""ekfac / kfac against kronfluence 1.0 (ESTIMATORS.md 2.14, section 9).

Adapter conversions (kronfluence -> ours):

* ``compute_train_loss`` returns the *summed* cross-entropy of the batch (what
  kronfluence expects; its covariance and Lambda passes divide by the number of
  examples), ``compute_measurement`` the summed query loss (our ``measurement="loss"``);
* empirical Fisher: ``FactorArguments(use_empirical_fisher=True)`` = our
  ``fisher="empirical"``; ``compute_train_loss(sample=True)`` draws labels from the
  model's softmax for the true Fisher;
* damping: kronfluence adds ``damping_factor`` to the (EK-)FAC eigenvalues of each
  module; ours adds ``damping + weight_decay`` (the L2 term of the objective, which
  kronfluence does not know about): ``damping_factor = damping + weight_decay``.
  ``damping_factor=None`` is 0.1 x the mean eigenvalue per module, the same heuristic
  as our ``damping=None`` once ``weight_decay`` is 0;
* pairwise scores are query-major ``g'^T (G + lambda I)^-1 g_i``, positive =
  proponent, *not* divided by n: ``ours = kronfluence / n``; self-influence too;
* every dtype argument is set to float64 (kronfluence defaults to float32).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("scipy")
kf_analyzer = pytest.importorskip("kronfluence.analyzer")
kf_arguments = pytest.importorskip("kronfluence.arguments")
kf_task = pytest.importorskip("kronfluence.task")

import torch.nn.functional as F  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from app.estimators import get_estimator  # noqa: E402

from .workloads import F64, assert_sign_agreement, mlp_digits, report, spearman_rows  # noqa: E402

pytestmark = [
    pytest.mark.peers,
    # the peer libraries' own deprecation noise (torch.cuda.amp, pkg_resources, ...)
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

F64_FACTORS = dict(
    activation_covariance_dtype=torch.float64,
    gradient_covariance_dtype=torch.float64,
    per_sample_gradient_dtype=torch.float64,
    lambda_dtype=torch.float64,
    eigendecomposition_dtype=torch.float64,
)
F64_SCORES = dict(
    per_sample_gradient_dtype=torch.float64, precondition_dtype=torch.float64, score_dtype=torch.float64
)
BATCH = 128


class ClassificationTask(kf_task.Task):
    """Summed cross-entropy for training and for the query measurement."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).squeeze(-1)
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")


def _kronfluence(w, tmp_path, *, strategy: str, empirical: bool, damping_factor, self_scores=False):
    """kronfluence's pairwise (and optionally self) scores converted to ours (divided by n)."""
    task = ClassificationTask()
    model = kf_analyzer.prepare_model(w.fresh_model(), task)
    analyzer = kf_analyzer.Analyzer(
        f"peers-{strategy}",
        model,
        task,
        cpu=True,
        output_dir=str(tmp_path),
        disable_tqdm=True,
        log_level=logging.WARNING,
    )
    train_set = TensorDataset(w.train_x, w.train_y)
    torch.manual_seed(0)  # the label draws of the true Fisher
    analyzer.fit_all_factors(
        "factors",
        train_set,
        per_device_batch_size=BATCH,
        factor_args=kf_arguments.FactorArguments(
            strategy=strategy, use_empirical_fisher=empirical, **F64_FACTORS
        ),
        overwrite_output_dir=True,
    )
    score_args = kf_arguments.ScoreArguments(damping_factor=damping_factor, **F64_SCORES)
    analyzer.compute_pairwise_scores(
        "pairwise",
        "factors",
        TensorDataset(w.query_x, w.query_y),
        train_set,
        per_device_query_batch_size=w.m,
        per_device_train_batch_size=BATCH,
        score_args=score_args,
        overwrite_output_dir=True,
    )
    pairwise = analyzer.load_pairwise_scores("pairwise")["all_modules"].to(torch.float64).numpy()
    assert pairwise.shape == (w.m, w.n)
    self_inf = None
    if self_scores:
        analyzer.compute_self_scores(
            "self",
            "factors",
            train_set,
            per_device_train_batch_size=BATCH,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        self_inf = analyzer.load_self_scores("self")["all_modules"].to(torch.float64).numpy() / w.n
    return pairwise / w.n, self_inf


DAMPING = 1e-2


def test_ekfac_matches_kronfluence(tmp_path):
    w = mlp_digits()
    out = get_estimator("ekfac").attribute(
        w.problem(), {"damping": DAMPING, "fisher": "empirical"}, want_self_influence=True, runtime=F64
    )
    peer, peer_self = _kronfluence(
        w,
        tmp_path,
        strategy="ekfac",
        empirical=True,
        damping_factor=DAMPING + w.weight_decay,
        self_scores=True,
    )
    fig = report(f"ekfac vs kronfluence EK-FAC, empirical Fisher ({w.name})", out.scores, peer)
    assert fig["spearman_mean"] >= 0.95 and fig["spearman_min"] >= 0.99
    np.testing.assert_allclose(out.scores, peer, rtol=1e-6, atol=1e-9 * np.abs(peer).max())
    np.testing.assert_allclose(out.self_influence, peer_self, rtol=1e-6)
    assert_sign_agreement(out.scores, peer)
    # the 1/n is the only scale between the two: without it the scores are n times larger
    assert abs(np.median((peer * w.n) / out.scores) - w.n) < 1e-3 * w.n


def test_kfac_matches_kronfluence(tmp_path):
    w = mlp_digits()
    ours = w.ours("kfac", {"damping": DAMPING, "fisher": "empirical"})
    peer, _ = _kronfluence(
        w, tmp_path, strategy="kfac", empirical=True, damping_factor=DAMPING + w.weight_decay
    )
    fig = report(f"kfac vs kronfluence K-FAC, empirical Fisher ({w.name})", ours, peer)
    assert fig["spearman_min"] >= 0.99
    np.testing.assert_allclose(ours, peer, rtol=1e-6, atol=1e-9 * np.abs(peer).max())


def test_ekfac_heuristic_damping_matches_kronfluence(tmp_path):
    """``damping=None`` (0.1 x mean eigenvalue per layer) = kronfluence ``damping_factor=None``, with the
    weight decay set to 0 on our side (it would be added on top of the heuristic)."""
    w = mlp_digits()
    problem = dataclasses.replace(w.problem(), weight_decay=0.0)
    ours = get_estimator("ekfac").attribute(problem, {"damping": None}, runtime=F64).scores
    peer, _ = _kronfluence(w, tmp_path, strategy="ekfac", empirical=True, damping_factor=None)
    fig = report(f"ekfac vs kronfluence EK-FAC, heuristic damping ({w.name})", ours, peer)
    assert fig["spearman_min"] >= 0.99
    np.testing.assert_allclose(ours, peer, rtol=1e-6, atol=1e-9 * np.abs(peer).max())


def test_ekfac_true_fisher_vs_kronfluence(tmp_path):
    """True Fisher: both sides draw one label per example from the model's softmax, from different
    random streams, so agreement is statistical (the figure is printed; the floor is loose)."""
    w = mlp_digits()
    ours = w.ours("ekfac", {"damping": DAMPING, "fisher": "true", "seed": 0})
    peer, _ = _kronfluence(
        w, tmp_path, strategy="ekfac", empirical=False, damping_factor=DAMPING + w.weight_decay
    )
    empirical = w.ours("ekfac", {"damping": DAMPING, "fisher": "empirical"})
    fig = report(f"ekfac vs kronfluence EK-FAC, true Fisher ({w.name})", ours, peer)
    sp_ours = spearman_rows(ours, empirical).mean()
    sp_peer = spearman_rows(peer, empirical).mean()
    print(f"[peers] true- vs empirical-Fisher EK-FAC: ours {sp_ours:.4f}, kronfluence {sp_peer:.4f}")
    assert fig["spearman_mean"] >= 0.8
