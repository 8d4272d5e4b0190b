"""Adapters that run the peer libraries on a bench workload (captum, traker, dattri, pyDVL, kronfluence,
bergson).

Each ``make_*`` function takes a :class:`~_workloads.Workload` and the method's
hyper-parameters (the ones ours uses, translated here) and returns a
zero-argument callable that does the *whole* computation from the trained model
and the data (fit + score) and returns an ``m x n`` numpy matrix in our
convention: query-major, positive = proponent, normalised like ours (``1/n``
for the influence functions). Everything that is not the method itself
(imports, copying the model, building tensors, temporary directories) happens
before the callable is returned and is not timed. A peer that cannot run the
method raises :class:`NotAvailable` with the reason.

Translations (ESTIMATORS.md section 9, and the libraries' sources):

* our objective carries the weight decay, the peers' losses do not: pyDVL /
  dattri regularisation = ``weight_decay + damping`` (the Hessian of the mean
  loss); captum's influence Hessian is of the *summed* loss, so its
  ``hessian_reg = n * (weight_decay + damping)``;
* dattri LiSSA's ``damping`` multiplies the iterate (``h <- v + (1 - d) h - Hh/s``), so
  ``d = (weight_decay + damping) / scale`` is our additive damping; its collate casts labels
  to float, so the loss casts them back;
* dattri returns train x test (transposed here); dattri's explicit/CG/LiSSA read the
  Hessian from one full-batch loader; its TracIn/TRAK projector settings are a
  module-level dict shared by every instance, so the adapters always set them;
* pyDVL ``InfluenceMode.Up`` returns ``+g'^T H^-1 g_i`` (already our sign); it is
  scored through ``influence_factors`` once + ``influences_from_factors`` on
  chunks of 256 training rows (its fastest use);
* pyDVL's CG stops a column at ``||r|| <= rtol**2 ||b||`` (it squares its ``rtol``), ours at
  ``||r|| <= rtol ||b||``: it gets ``sqrt(rtol)`` so that both stop at the same residual (with
  our ``rtol`` as is it iterated to ``1e-16 ||b||``, 24 instead of 13 block iterations on the MLP);
  dattri's CG has no stopping test and always runs ``max_iter`` iterations;
* kronfluence scores are unnormalised by n; its damping is absolute (pyDVL, dattri and kronfluence
  get one number: the mean of our per-layer EK-FAC shifts, exact for a one-layer model); its
  Fisher follows ours (``use_empirical_fisher`` iff ``fisher="empirical"``; our ``"expected"``, the exact
  expectation over the predictive distribution, has no kronfluence counterpart: it gets the sampled true
  Fisher, the unbiased estimate of the same matrix).
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from _workloads import Workload
from torch.utils.data import DataLoader, Dataset, TensorDataset

CHUNK = 256


class NotAvailable(Exception):
    """The peer cannot run this method on this workload (the message says why)."""


def quiet() -> None:
    """Silence the peers' progress bars and info logs (they would distort the timings)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("trak", "kronfluence", "pydvl", "captum", "dattri", "accelerate", "STDOUT"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _tensors(w: Workload):
    pr = w.problem
    return pr.train_x, pr.train_y, pr.query_x, pr.query_y


def _model(w: Workload, state=None) -> torch.nn.Module:
    m = copy.deepcopy(w.problem.model)
    m.load_state_dict(state if state is not None else w.problem.weights)
    m.eval()
    return m


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def _last_linear_name(model: torch.nn.Module) -> str:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]


def _batched(x: torch.Tensor) -> torch.Tensor:
    """A batch of one when vmap hands over a single example without its batch dimension."""
    return x if x.dim() == 2 else x.unsqueeze(0)


# ============================================================================ pyDVL


def _pydvl(w: Workload, make_inf: Callable, batch_size: int) -> Callable[[], np.ndarray]:
    from pydvl.influence import InfluenceMode

    x, y, qx, qy = _tensors(w)
    n = len(y)
    model = _model(w)
    for p in model.parameters():
        p.requires_grad_(True)

    def run() -> np.ndarray:
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
        inf = make_inf(model).fit(loader)
        fac = inf.influence_factors(qx, qy)
        cols = [
            inf.influences_from_factors(fac, x[s : s + CHUNK], y[s : s + CHUNK], mode=InfluenceMode.Up)
            for s in range(0, n, CHUNK)
        ]
        return _np(torch.cat(cols, dim=1)) / n

    return run


def _reg(w: Workload, hp: dict) -> float:
    return float(w.problem.weight_decay) + float(hp.get("damping") or 0.0)


def pydvl_if_exact(w, hp):
    from pydvl.influence.torch import DirectInfluence

    return _pydvl(w, lambda m: DirectInfluence(m, F.cross_entropy, regularization=_reg(w, hp)), w.n)


def pydvl_if_cg(w, hp):
    from pydvl.influence.torch import CgInfluence

    # pyDVL 0.10 stops a column when ||r|| <= rtol**2 * ||b|| (it squares rtol; operator.py, both its
    # single and block CG): sqrt(our rtol) gives the same stopping rule as ours, ||r|| <= rtol * ||b||
    return _pydvl(
        w,
        lambda m: CgInfluence(
            m, F.cross_entropy, regularization=_reg(w, hp), rtol=hp["rtol"] ** 0.5, atol=0.0,
            maxiter=hp["max_iter"], solve_simultaneously=True, warn_on_max_iteration=False,
        ),
        w.n,
    )  # fmt: skip


def pydvl_if_lissa(w, hp):
    from pydvl.influence.torch import LissaInfluence

    # pyDVL iterates the training loader for its mini-batches: batch_size rows per step, shuffled
    torch.manual_seed(hp["seed"])
    return _pydvl_shuffled(
        w,
        lambda m: LissaInfluence(
            m, F.cross_entropy, regularization=_reg(w, hp), maxiter=hp["depth"], dampen=0.0,
            scale=hp["scale"], rtol=1e-12, warn_on_max_iteration=False,
        ),
        hp["batch_size"],
    )  # fmt: skip


def _pydvl_shuffled(w, make_inf, batch_size):
    from pydvl.influence import InfluenceMode

    x, y, qx, qy = _tensors(w)
    n = len(y)
    model = _model(w)

    def run() -> np.ndarray:
        g = torch.Generator().manual_seed(0)
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=g)
        inf = make_inf(model).fit(loader)
        fac = inf.influence_factors(qx, qy)
        cols = [
            inf.influences_from_factors(fac, x[s : s + CHUNK], y[s : s + CHUNK], mode=InfluenceMode.Up)
            for s in range(0, n, CHUNK)
        ]
        return _np(torch.cat(cols, dim=1)) / n

    return run


def pydvl_if_arnoldi(w, hp):
    from pydvl.influence.torch import ArnoldiInfluence

    return _pydvl(
        w,
        lambda m: ArnoldiInfluence(
            m, F.cross_entropy, regularization=_reg(w, hp), rank=hp["rank"],
            krylov_dimension=hp["n_iter"], tol=1e-6,
        ),
        w.n,
    )  # fmt: skip


def pydvl_ekfac(w, hp, shift: float):
    from pydvl.influence.torch import EkfacInfluence

    # pyDVL backpropagates one pseudo-loss sum_c sqrt(p_c) log p_c per example, i.e. the output gradient
    # sum_c sqrt(p_c) (e_c - p) = L 1 with L L^T = diag(p) - p p^T: its curvature is E[J^T L 1 1^T L^T J],
    # a rank-one-per-example stand-in for the Gauss-Newton E[J^T L L^T J] (our fisher="expected"), not
    # an unbiased estimate of it; no fisher option. One regularisation for all layers
    return _pydvl(w, lambda m: EkfacInfluence(m, update_diagonal=True, hessian_regularization=shift), CHUNK)


def pydvl_datainf(w, hp, lambdas: dict[str, float]):
    from pydvl.influence.torch import InverseHarmonicMeanInfluence
    from pydvl.influence.torch.util import BlockMode

    # pyDVL 0.10's _build_regularization_dict rejects every dict whose keys are block names (its
    # subset test is inverted); an extra unused key gets the per-layer values through unchanged
    reg = {**lambdas, "__unused__": None}
    # fit batches of one row: with larger ones pyDVL's harmonic mean is not DataInf's per-example one
    # (0.44 of max|score| off at 256 rows; 2e-3 at one, tests/peers/test_pydvl.py)
    return _pydvl(
        w,
        lambda m: InverseHarmonicMeanInfluence(
            m, F.cross_entropy, regularization=reg, block_structure=BlockMode.LAYER_WISE
        ),
        1,
    )


# ============================================================================ dattri


def _dattri_loss(model: torch.nn.Module):
    def loss(params, data):
        xb, yb = data
        out = torch.func.functional_call(model, params, _batched(xb))
        return F.cross_entropy(out, _batched(yb.unsqueeze(-1)).reshape(-1).long())

    return loss


def _dattri_task(w: Workload, states=None, loss=None, target=None):
    """An AttributionTask; ``loss``/``target`` are factories ``model -> f(params, data)`` so that the
    functions call the task's own model (dattri's hooks sit on it)."""
    from dattri.task import AttributionTask

    model = _model(w)
    ckpts = [copy.deepcopy(w.problem.weights)] if states is None else [copy.deepcopy(s) for s in states]
    return AttributionTask(
        loss_func=(loss or _dattri_loss)(model), model=model,
        checkpoints=ckpts if len(ckpts) > 1 else ckpts[0],
        target_func=None if target is None else target(model),
    )  # fmt: skip


def _loaders(w: Workload, train_bs: int | None = None, test_bs: int | None = None):
    x, y, qx, qy = _tensors(w)
    tr = DataLoader(TensorDataset(x, y), batch_size=train_bs or len(y), shuffle=False)
    te = DataLoader(TensorDataset(qx, qy), batch_size=test_bs or len(qy), shuffle=False)
    return tr, te


def _dattri_ip(w: Workload, make_att: Callable, scale: float, train_bs=None, test_bs=None):
    tr, te = _loaders(w, train_bs, test_bs)

    def run() -> np.ndarray:
        att = make_att()
        att.cache(tr)
        return _np(att.attribute(tr, te).T) * scale

    return run


def dattri_if_exact(w, hp):
    from dattri.algorithm import IFAttributorExplicit

    task = _dattri_task(w)
    return _dattri_ip(w, lambda: IFAttributorExplicit(task, regularization=_reg(w, hp)), 1.0 / w.n)


def dattri_if_cg(w, hp):
    from dattri.algorithm import IFAttributorCG

    task = _dattri_task(w)
    return _dattri_ip(
        w,
        lambda: IFAttributorCG(task, max_iter=hp["max_iter"], tol=1e-10, regularization=_reg(w, hp)),
        1.0 / w.n,
    )


def dattri_if_lissa(w, hp):
    from dattri.algorithm import IFAttributorLiSSA

    task = _dattri_task(w)
    torch.manual_seed(hp["seed"])
    return _dattri_ip(
        w,
        lambda: IFAttributorLiSSA(
            task, batch_size=hp["batch_size"], num_repeat=hp["repeats"], recursion_depth=hp["depth"],
            damping=_reg(w, hp) / hp["scale"], scaling=hp["scale"],
        ),
        1.0 / w.n,
    )  # fmt: skip


def dattri_if_arnoldi(w, hp):
    from dattri.algorithm import IFAttributorArnoldi

    task = _dattri_task(w)
    return _dattri_ip(
        w,
        lambda: IFAttributorArnoldi(
            task, proj_dim=hp["rank"], max_iter=hp["n_iter"], tol=1e-7, regularization=_reg(w, hp),
            seed=hp["seed"],
        ),
        1.0 / w.n,
    )  # fmt: skip


def dattri_datainf(w, hp, lam: float):
    from dattri.algorithm import IFAttributorDataInf

    task = _dattri_task(w)
    return _dattri_ip(w, lambda: IFAttributorDataInf(task, regularization=lam), 1.0 / w.n, train_bs=CHUNK)


def dattri_ekfac(w, hp, shift: float):
    from dattri.algorithm import IFAttributorEKFAC

    # dattri's EK-FAC fits the empirical Fisher of the loss it is given (the training labels)
    task = _dattri_task(w)
    tr, te = _loaders(w, CHUNK, None)

    def run() -> np.ndarray:
        att = IFAttributorEKFAC(task, damping=shift)
        att.cache(tr)
        return _np(att.attribute(tr, te).T) / w.n

    return run


def _dattri_tracin(w, states, weights, normalized):
    from dattri.algorithm import TracInAttributor

    task = _dattri_task(w, states=states)
    tr, te = _loaders(w, CHUNK, None)

    def run() -> np.ndarray:
        att = TracInAttributor(task, weight_list=torch.tensor(weights), normalized_grad=normalized)
        att.projector_kwargs = None  # exact gradients (the module-level default would project to 512)
        return _np(att.attribute(tr, te).T)

    return run


def dattri_grad_dot(w, hp):
    return _dattri_tracin(w, None, [1.0], False)


def dattri_grad_cos(w, hp):
    return _dattri_tracin(w, None, [1.0], True)


def dattri_tracincp(w, hp):
    ck = w.problem.checkpoints
    return _dattri_tracin(w, [c.state for c in ck], [c.learning_rate for c in ck], False)


def dattri_trak(w, hp):
    from dattri.algorithm import TRAKAttributor

    def margin(model):  # log-odds of the label: dattri's TRAK feature function
        def f(params, data):
            xb, yb = data
            out = torch.func.functional_call(model, params, _batched(xb))
            logp = -F.cross_entropy(out, _batched(yb.unsqueeze(-1)).reshape(-1).long())
            return logp - torch.log(1 - torch.exp(logp))

        return f

    members = [c.state for c in w.problem.checkpoints] if hp["use_checkpoints"] else [w.problem.weights]
    task = _dattri_task(w, states=members, loss=margin, target=margin)
    model = task.get_model()

    def prob(params, data):
        xb, yb = data
        out = torch.func.functional_call(model, params, _batched(xb))
        return torch.exp(-F.cross_entropy(out, _batched(yb.unsqueeze(-1)).reshape(-1).long()))

    tr, te = _loaders(w, CHUNK, None)
    kw = {
        "proj_dim": hp["projection_dim"],
        "proj_max_batch_size": 32,
        "proj_seed": hp["seed"],
        "device": "cpu",
    }

    def run() -> np.ndarray:
        att = TRAKAttributor(task, correct_probability_func=prob, projector_kwargs=dict(kw),
                             regularization=hp["damping"])  # fmt: skip
        att.projector_kwargs = dict(kw)
        att.cache(tr)
        return _np(att.attribute(te).T)

    return run


def dattri_representer(w, hp):
    from dattri.algorithm import RPSAttributor

    model = _model(w)
    name = _last_linear_name(model)
    if "." in name:
        raise NotAvailable("RPSAttributor needs the last linear layer as a direct attribute of the model")
    task = _dattri_task(w, target=lambda _m: lambda pre, yy: F.cross_entropy(pre, yy))
    tr, te = _loaders(w, CHUNK, None)

    def run() -> np.ndarray:
        att = RPSAttributor(task, final_linear_layer_name=name, l2_strength=hp["l2"],
                            epoch=w.peer_hp.get("representer", {}).get("epoch", 3000))  # fmt: skip
        att.cache(tr)
        return _np(att.attribute(tr, te).T)

    return run


def dattri_logra(w, hp):
    from dattri.algorithm import LoGraAttributor

    # BlockProjectedIF calls loss(model, batch, device) and hooks per-example grads. Its compressor
    # multiplies each hooked output gradient by the batch size (undoing a *mean* reduction; its own query
    # path uses F.cross_entropy's mean), so the loss must be the batch mean: with a sum, every training
    # gradient came out scaled by its batch's size (256, but 120 for the last 120 of the 1,400 rows)
    def loss(_model):
        def f(model, batch, device):
            xb, yb = batch
            return F.cross_entropy(model(xb.to(device)), yb.to(device))

        return f

    task = _dattri_task(w, loss=loss)
    # dattri sets up its compressors by running the model on the first *example* of a batch; rows shaped
    # (1, d) keep that a valid model input (nn.Flatten maps (b, 1, d) to (b, d) for the real batches)
    x, y, qx, qy = _tensors(w)
    tr = DataLoader(TensorDataset(x.unsqueeze(1), y), batch_size=CHUNK, shuffle=False)
    te = DataLoader(TensorDataset(qx.unsqueeze(1), qy), batch_size=len(qy), shuffle=False)
    k = hp["k_in"] * hp["k_out"]
    if int(k**0.5) ** 2 != k or hp["k_in"] != hp["k_out"]:
        raise NotAvailable(
            f"dattri LoGra uses square factors (k_in = k_out); k_in={hp['k_in']}, k_out={hp['k_out']}"
        )

    def run() -> np.ndarray:
        with tempfile.TemporaryDirectory() as d:
            att = LoGraAttributor(task, hessian="eFIM", damping=hp["damping"], device="cpu", proj_dim=k,
                                  offload="none", cache_dir=d)  # fmt: skip
            att.cache(tr)
            return _np(att.attribute(tr, te).T) / w.n

    return run


# ============================================================================ captum


def captum_tracincp(w, hp):
    from captum.influence import TracInCP

    x, y, qx, qy = _tensors(w)
    ck = w.problem.checkpoints
    model = _model(w)
    states = {str(i): c for i, c in enumerate(ck)}

    def load(m, key):
        m.load_state_dict(states[key].state)
        return states[key].learning_rate

    loss = torch.nn.CrossEntropyLoss(reduction="sum")

    def run() -> np.ndarray:
        tr = TracInCP(model, TensorDataset(x, y), checkpoints=list(states), checkpoints_load_func=load,
                      loss_fn=loss, batch_size=CHUNK, sample_wise_grads_per_batch=True)  # fmt: skip
        return _np(tr.influence((qx, qy), show_progress=False))

    return run


def captum_grad_dot(w, hp):
    from captum.influence import TracInCP

    x, y, qx, qy = _tensors(w)
    model = _model(w)
    state = w.problem.weights

    def load(m, key):
        m.load_state_dict(state)
        return 1.0

    def run() -> np.ndarray:
        tr = TracInCP(model, TensorDataset(x, y), checkpoints=["final"], checkpoints_load_func=load,
                      loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=CHUNK,
                      sample_wise_grads_per_batch=True)  # fmt: skip
        return _np(tr.influence((qx, qy), show_progress=False))

    return run


def captum_if_arnoldi(w, hp):
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

    x, y, qx, qy = _tensors(w)
    n = len(y)
    model = _model(w)
    state = w.problem.weights

    def load(m, key):
        m.load_state_dict(state)
        return 1.0

    def run() -> np.ndarray:
        torch.manual_seed(hp["seed"])
        inf = ArnoldiInfluenceFunction(
            model, TensorDataset(x, y), checkpoint="final", checkpoints_load_func=load,
            loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=CHUNK,
            sample_wise_grads_per_batch=True, projection_dim=hp["rank"], arnoldi_dim=hp["n_iter"],
            arnoldi_tol=1e-6, hessian_reg=n * _reg(w, hp), hessian_inverse_tol=0.0, seed=hp["seed"],
        )  # fmt: skip
        return _np(inf.influence((qx, qy), show_progress=False))

    return run


# ============================================================================ traker


def traker_trak(w, hp):
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    x, y, qx, qy = _tensors(w)
    model = _model(w)
    p = sum(v.numel() for v in model.parameters())
    members = [c.state for c in w.problem.checkpoints] if hp["use_checkpoints"] else [w.problem.weights]
    k = min(hp["projection_dim"], p)

    def run() -> np.ndarray:
        with tempfile.TemporaryDirectory() as d:
            proj = BasicProjector(
                grad_dim=p, proj_dim=k, seed=hp["seed"], proj_type=ProjectionType.rademacher,
                device="cpu", dtype=torch.float32, block_size=100,
            )  # fmt: skip
            tr = TRAKer(model=model, task="image_classification", train_set_size=len(y), save_dir=d,
                        device="cpu", projector=proj, use_half_precision=False, lambda_reg=hp["damping"],
                        logging_level=logging.ERROR)  # fmt: skip
            for mid, st in enumerate(members):
                tr.load_checkpoint(st, model_id=mid)
                for s in range(0, len(y), CHUNK):
                    xb, yb = x[s : s + CHUNK], y[s : s + CHUNK]
                    tr.featurize(batch=(xb, yb), num_samples=len(yb))
            tr.finalize_features()
            for mid, st in enumerate(members):
                tr.start_scoring_checkpoint(exp_name="q", checkpoint=st, model_id=mid, num_targets=len(qy))
                tr.score(batch=(qx, qy), num_samples=len(qy))
            scores = tr.finalize_scores(exp_name="q")  # n x m
            return np.array(scores, dtype=np.float64).T

    return run


# ============================================================================ kronfluence


def kronfluence_ekfac(w, hp, shift: float | None):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    x, y, qx, qy = _tensors(w)
    n = len(y)

    class _DS(Dataset):
        def __init__(self, a, b):
            self.a, self.b = a, b

        def __len__(self):
            return len(self.b)

        def __getitem__(self, i):
            return self.a[i], self.b[i]

    class _Task(Task):
        def compute_train_loss(self, batch, model, sample=False):
            xb, yb = batch
            out = model(xb)
            if sample:
                with torch.no_grad():
                    yb = torch.multinomial(torch.softmax(out.detach(), -1), 1).flatten()
            return F.cross_entropy(out, yb, reduction="sum")

        def compute_measurement(self, batch, model):
            xb, yb = batch
            return F.cross_entropy(model(xb), yb, reduction="sum")

    model = prepare_model(_model(w), _Task())
    tmp = tempfile.mkdtemp(prefix="kronfluence-")

    def run() -> np.ndarray:
        an = Analyzer(analysis_name="bench", model=model, task=_Task(), cpu=True, disable_model_save=True,
                      output_dir=tmp, disable_tqdm=True)  # fmt: skip
        torch.manual_seed(hp.get("seed", 0))  # labels sampled for the true Fisher
        fa = FactorArguments(strategy="ekfac", use_empirical_fisher=hp.get("fisher") == "empirical")
        an.fit_all_factors(factors_name="f", dataset=_DS(x, y), per_device_batch_size=CHUNK, factor_args=fa,
                           overwrite_output_dir=True)  # fmt: skip
        sa = ScoreArguments(damping_factor=shift)
        an.compute_pairwise_scores(
            scores_name="s", factors_name="f", query_dataset=_DS(qx, qy), train_dataset=_DS(x, y),
            per_device_query_batch_size=len(qy), per_device_train_batch_size=CHUNK, score_args=sa,
            overwrite_output_dir=True,
        )  # fmt: skip
        return _np(an.load_pairwise_scores(scores_name="s")["all_modules"]) / n

    return run


# ============================================================================ bergson


def bergson_magic(w, hp):
    """bergson 2.5's MAGIC (a functional torchopt trainer, reverse-mode through the run) on the model's
    own run: our recipe's seeded start and batch order, torchopt SGD with its momentum, coupled weight
    decay and per-epoch schedule; one backward per query (bergson differentiates one scalar
    behaviour). Returns ``-dq/dw`` (ours)."""
    import shutil

    import torchopt
    from bergson.magic.trainer import BackwardState, Trainer

    from app.estimators import Recipe, init_model, learning_rate_at
    from app.estimators.unroll import batch_plan

    if not isinstance(w.problem.recipe, dict):
        raise NotAvailable("the workload's model has no recipe to replay")
    recipe = Recipe(**w.problem.recipe)
    if recipe.optimizer != "sgd":
        raise NotAvailable(f"the adapter covers SGD recipes, not {recipe.optimizer}")
    x, y, qx, qy = _tensors(w)
    steps = [s.rows for s in batch_plan(recipe, len(y))]
    per_epoch = len(steps) // recipe.epochs
    start = init_model("mlp", w.info["arch"], seed=recipe.seed).state_dict()

    class Loss(torch.nn.Module):  # bergson differentiates the scalar model(**batch) returns
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, input_ids, targets, example_weight):
            losses = F.cross_entropy(self.net(input_ids), targets, reduction="none")
            return (example_weight * losses).sum() / len(targets)

    class Stream:  # what bergson's trainer reads from its DataStream
        device = torch.device("cpu")

        def __init__(self):
            self.weights = torch.nn.Parameter(torch.ones(len(y)))

        @property
        def requires_grad(self):
            return self.weights.requires_grad

        @requires_grad.setter
        def requires_grad(self, value):
            self.weights.requires_grad = value

        def __len__(self):
            return len(steps)

        def __getitem__(self, i):
            if not 0 <= i < len(steps):
                raise IndexError(i)
            rows = steps[i]
            return {"input_ids": x[rows], "targets": y[rows], "example_weight": self.weights[rows]}

    def schedule(count):
        return learning_rate_at(recipe, int(count) // per_epoch)

    def run() -> np.ndarray:
        """Train once (bergson keeps sqrt(T) checkpoints), then one backward sweep per query."""
        model = Loss(_model(w, start))
        opt = torchopt.sgd(schedule, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
        trainer, state = Trainer.initialize(model, opt)
        stream = Stream()
        folder = tempfile.mkdtemp(prefix="bergson-magic-")
        try:
            state = trainer.train(state, stream, save_dir=folder, save_mode="sqrt")
            slots = [
                torch.zeros_like(t)
                for t in torchopt.pytree.tree_iter(state.opt_state)
                if isinstance(t, torch.Tensor) and t.is_floating_point()
            ]
            # every query's gradient at the final weights first: a backward run reloads the state
            # from the checkpoints in place and leaves it at the start of training
            query_grads = []
            with state.activate(model) as params:
                for j in range(len(qy)):
                    loss = F.cross_entropy(model.net(qx[j : j + 1]), qy[j : j + 1])
                    grads = torch.autograd.grad(loss, list(params.values()))
                    query_grads.append({k: g.detach() for k, g in zip(params, grads, strict=True)})
            stream.requires_grad = True
            rows = []
            for grads in query_grads:
                back = BackwardState(
                    {k: grads[k] for k in state.params},
                    [torch.zeros_like(t) for t in slots],
                    torch.zeros_like(stream.weights),
                )
                back = trainer.backward(folder, stream, back, state, cleanup=False, save_mode="sqrt")
                rows.append(-_np(back.weight_grads))
            return np.stack(rows)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return run


# ============================================================================ registry

PEERS: dict[str, list[tuple[str, Callable]]] = {
    "if_exact": [("pydvl DirectInfluence", pydvl_if_exact), ("dattri IFAttributorExplicit", dattri_if_exact)],
    "if_cg": [("pydvl CgInfluence", pydvl_if_cg), ("dattri IFAttributorCG", dattri_if_cg)],
    "if_lissa": [("pydvl LissaInfluence", pydvl_if_lissa), ("dattri IFAttributorLiSSA", dattri_if_lissa)],
    "if_arnoldi": [
        ("pydvl ArnoldiInfluence", pydvl_if_arnoldi),
        ("dattri IFAttributorArnoldi", dattri_if_arnoldi),
        ("captum ArnoldiInfluenceFunction", captum_if_arnoldi),
    ],
    "ekfac": [
        ("kronfluence EK-FAC", kronfluence_ekfac),
        ("pydvl EkfacInfluence", pydvl_ekfac),
        ("dattri IFAttributorEKFAC", dattri_ekfac),
    ],
    "tracincp": [("captum TracInCP", captum_tracincp), ("dattri TracIn", dattri_tracincp)],
    "grad_dot": [("dattri Grad-Dot", dattri_grad_dot), ("captum TracInCP (1 ckpt, lr 1)", captum_grad_dot)],
    "grad_cos": [("dattri Grad-Cos", dattri_grad_cos)],
    "trak": [("traker (BasicProjector)", traker_trak), ("dattri TRAK", dattri_trak)],
    # DataInf's adapters need our lambdas: see make()
    "datainf": [("dattri DataInf", None), ("pydvl InverseHarmonicMean", None)],
    "representer": [("dattri RPS", dattri_representer)],
    "logra": [("dattri LoGra", dattri_logra)],
    "magic": [("bergson MAGIC", bergson_magic)],
}


def make(method: str, impl: str, fn: Callable | None, w: Workload, hp: dict) -> Callable[[], np.ndarray]:
    """The timed callable of one peer implementation (raises NotAvailable)."""
    if method == "ekfac":
        # our damping (None: 0.1 x the mean eigenvalue per layer, kronfluence's heuristic) plus the
        # weight decay, resolved from our fitted factors (untimed); the peers take one number for all
        # layers: the mean of ours (exact for a one-layer model)
        from app.estimators import Runtime, get_estimator
        from app.estimators.kfac import KFACFactors

        st = get_estimator("ekfac").fit(w.problem, hp, Runtime())
        shifts = KFACFactors(st).shifts(hp.get("damping"), w.problem.weight_decay)
        shift = float(sum(shifts.values()) / len(shifts))
        return fn(w, hp, shift)
    if method == "datainf":
        from app.estimators import Runtime, get_estimator

        st = get_estimator("datainf").fit(w.problem, hp, Runtime())  # our lambda_l, computed untimed
        lam = dict(zip(st.info["layers"], st.tensors["lambdas"].tolist(), strict=True))
        if impl.startswith("dattri"):
            if len(lam) > 1:
                # one lambda for all layers: the parameter-count-weighted mean of ours
                sizes = st.info["layer_sizes"]
                one = float(sum(lam[k] * s for k, s in zip(lam, sizes, strict=True)) / sum(sizes))
            else:
                one = next(iter(lam.values()))
            return dattri_datainf(w, hp, one)
        return pydvl_datainf(w, hp, lam)
    return fn(w, hp)
