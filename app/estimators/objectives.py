"""Per-example training losses and query objectives (ESTIMATORS.md section 0).

Every function here works on a batch and returns one value per example, and is
written so that it also runs inside ``torch.func.vmap`` on a single example that
carries a batch dimension of 1 (no data-dependent control flow, no in-place ops,
no ``one_hot``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import EstimatorError, TaskSpec

MEASUREMENTS = ("loss", "margin")


def _regression_pair(outputs: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if outputs.dim() == 2 and outputs.shape[1] == 1:
        outputs = outputs[:, 0]
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    return outputs, y.to(outputs.dtype)


def per_example_loss(outputs: torch.Tensor, y: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    """The training loss of each example, shape ``(b,)``.

    * classification: cross-entropy of the logits ``outputs`` (b, k) against int64
      class labels ``y`` (b,);
    * regression: squared error ``(f(x) - y)^2`` with ``outputs`` (b, 1) or (b,)
      against ``y`` (b,); multi-output regression (b, k) vs (b, k) averages over k,
      so the batch mean equals ``torch.nn.functional.mse_loss``.
    """
    if task.kind == "classification":
        return F.cross_entropy(outputs, y.long(), reduction="none")
    outputs, y = _regression_pair(outputs, y)
    sq = (outputs - y) ** 2
    if sq.dim() > 1:
        sq = sq.reshape(sq.shape[0], -1).mean(dim=1)
    return sq


def margin(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logit of the correct class minus logsumexp of the other logits, shape ``(b,)``.

    This is TRAK's measurement; with two classes it is ``z_y - z_other``.
    """
    k = outputs.shape[-1]
    classes = torch.arange(k, device=outputs.device)
    is_correct = classes.unsqueeze(0) == y.long().unsqueeze(-1)  # (b, k)
    correct = (outputs * is_correct.to(outputs.dtype)).sum(dim=-1)
    others = outputs.masked_fill(is_correct, float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


def check_measurement(task: TaskSpec, measurement: str) -> None:
    """Raise :class:`EstimatorError` (parameter ``/measurement``) for an unusable measurement."""
    if measurement not in MEASUREMENTS:
        raise EstimatorError(
            f"unknown measurement {measurement!r}; use one of {', '.join(MEASUREMENTS)}",
            parameter="/measurement",
        )
    if measurement == "margin" and task.kind != "classification":
        raise EstimatorError(
            "measurement 'margin' needs a classification model; use 'loss' for regression",
            parameter="/measurement",
        )


def query_objective(outputs: torch.Tensor, y: torch.Tensor, task: TaskSpec, measurement: str) -> torch.Tensor:
    """The query objective ``q``: the loss, or *minus* the margin for ``measurement="margin"``.

    With ``q`` defined this way, a positive score always means "removing the
    training example would raise ``q``" (base.SIGN_CONVENTION).
    """
    check_measurement(task, measurement)
    if measurement == "loss":
        return per_example_loss(outputs, y, task)
    if outputs.shape[-1] < 2:
        raise EstimatorError("measurement 'margin' needs at least two classes", parameter="/measurement")
    return -margin(outputs, y)
