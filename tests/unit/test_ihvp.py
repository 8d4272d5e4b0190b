"""Inverse-Hessian-vector-product machinery (app/estimators/ihvp.py) vs explicit float64 linear algebra.

Fixtures: a tiny tanh MLP (p = 131, not convex: its Hessian needs damping) and an
L2-regularised 2-class logistic regression (p = 12, positive definite), both float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.estimators import InfluenceProblem, NumericalError, Recipe, Runtime, TaskSpec, init_model, train
from app.estimators.gradients import flatten, objective_hessian, trainable_names
from app.estimators.ihvp import (
    TrainingHessian,
    arnoldi,
    conjugate_gradient,
    extreme_eigenvalues,
    lissa,
    subsample_rows,
)
from app.estimators.objectives import per_example_loss

torch.set_num_threads(1)

CLS = TaskSpec("classification", "cross_entropy")
F64 = Runtime(dtype=torch.float64, chunk_size=32)
MLP = {"in_features": 4, "hidden": [16], "num_classes": 3, "activation": "tanh"}
MLP_WD = 1e-2
LOGREG_WD = 0.1


def _blobs(n, seed, d=4, k=3, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    centres = spread * torch.randn(k, d, generator=g, dtype=torch.float64)
    return centres[y] + torch.randn(n, d, generator=g, dtype=torch.float64), y


@pytest.fixture(scope="module")
def mlp():
    x, y = _blobs(80, 0)
    qx, qy = _blobs(6, 1)
    model = init_model("mlp", MLP, 0).double()
    res = train(
        model,
        CLS,
        x,
        y,
        Recipe(learning_rate=0.2, epochs=30, batch_size=16, weight_decay=MLP_WD, num_checkpoints=0),
    )
    prob = InfluenceProblem(
        model=model,
        task=CLS,
        weights=res.weights,
        train_x=x,
        train_y=y,
        query_x=qx,
        query_y=qy,
        weight_decay=MLP_WD,
    )
    H = objective_hessian(model, res.weights, x, y, CLS, MLP_WD)
    return prob, H


@pytest.fixture(scope="module")
def logreg():
    x, y = _blobs(200, 0, d=5, k=2, spread=0.7)
    qx, qy = _blobs(4, 1, d=5, k=2, spread=0.7)
    model = init_model("linear", {"in_features": 5, "num_classes": 2}, 0).double()
    res = train(
        model,
        CLS,
        x,
        y,
        Recipe(
            optimizer="lbfgs",
            learning_rate=1.0,
            epochs=100,
            weight_decay=LOGREG_WD,
            num_checkpoints=0,
            lbfgs_tolerance=1e-10,
        ),
    )
    prob = InfluenceProblem(
        model=model,
        task=CLS,
        weights=res.weights,
        train_x=x,
        train_y=y,
        query_x=qx,
        query_y=qy,
        weight_decay=LOGREG_WD,
    )
    return prob, objective_hessian(model, res.weights, x, y, CLS, LOGREG_WD)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def test_hvp_equals_explicit_hessian(mlp):
    prob, H = mlp
    op = TrainingHessian(prob, Runtime(dtype=torch.float64, chunk_size=7))  # several row chunks
    assert op.p == H.shape[0] == 131
    V = torch.randn(op.p, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    HV = op.matmul(V)
    assert HV.shape == (op.p, 5) and HV.dtype == torch.float64
    torch.testing.assert_close(HV, H @ V, rtol=1e-10, atol=1e-10 * float((H @ V).abs().max()))
    torch.testing.assert_close(op(V[:, 0]), H @ V[:, 0], rtol=1e-10, atol=1e-12)
    # a row subsample / mini-batch: the Hessian of the mean loss over those rows (+ weight decay)
    rows = subsample_rows(prob.n_train, 30, seed=3)
    assert rows.shape == (30,) and subsample_rows(prob.n_train, 500) is None
    H_rows = objective_hessian(prob.model, prob.weights, prob.train_x[rows], prob.train_y[rows], CLS, MLP_WD)
    torch.testing.assert_close(op.rows_matmul(rows, V), H_rows @ V, rtol=1e-10, atol=1e-12)
    sub = TrainingHessian(prob, F64, rows=rows)
    torch.testing.assert_close(sub.matmul(V), H_rows @ V, rtol=1e-10, atol=1e-12)
    assert op.products == 3 and sub.n_rows == 30


@pytest.mark.parametrize("columns", [1, 5, 40])  # the rows, features and columns layouts
def test_products_over_more_rows_than_the_budget_keeps_are_streamed(mlp, columns):
    """A budget too small to keep the prepared rows: each chunk is prepared as the product uses it
    (memory for one chunk instead of every row's), with the same values."""
    prob, H = mlp
    V = torch.randn(H.shape[0], columns, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tight = TrainingHessian(prob, Runtime(dtype=torch.float64, chunk_size=7, memory_budget_bytes=1024))
    roomy = TrainingHessian(prob, Runtime(dtype=torch.float64, chunk_size=7))
    torch.testing.assert_close(tight.matmul(V), roomy.matmul(V), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(tight.matmul(V), H @ V, rtol=1e-10, atol=1e-10 * float((H @ V).abs().max()))
    assert tight._chain_cache == {} and roomy._chain_cache  # nothing kept under the tight budget


def test_cg_matches_linalg_solve_within_p_iterations(mlp):
    prob, H = mlp
    p = H.shape[0]
    damping = 0.05  # the trained MLP's Hessian has eigenvalues down to about -0.02
    assert float(torch.linalg.eigvalsh(H)[0]) + damping > 0
    op = TrainingHessian(prob, F64)
    B = torch.randn(p, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    B[:, 3] = 0.0  # a zero right-hand side is solved exactly and costs nothing
    res = conjugate_gradient(op.matmul, B, damping=damping, max_iter=p, rtol=1e-10)
    exact = torch.linalg.solve(H + damping * torch.eye(p, dtype=H.dtype), B)
    errs = [_rel(res.x[:, j], exact[:, j]) for j in range(3)]
    print(f"\nCG vs solve on the MLP (p={p}): {res.iterations} iterations, relative errors {errs}")
    assert res.converged and res.iterations <= p
    assert max(errs) < 1e-6
    assert torch.equal(res.x[:, 3], torch.zeros(p, dtype=torch.float64))
    assert float(res.relative_residual.max()) <= 1e-10
    # a single vector (plain CG): the same solution as its column of the block solve, to the tolerance
    # (block CG shares one Krylov space between the columns, so they agree to rtol, not bit for bit)
    one = conjugate_gradient(op.matmul, B[:, 1], damping=damping, max_iter=p, rtol=1e-10)
    assert one.x.shape == (p,) and one.converged
    assert _rel(one.x, exact[:, 1]) < 1e-6 and _rel(one.x, res.x[:, 1]) < 1e-8
    # the block shares its Krylov space: fewer iterations than single-vector CG needs for one column
    assert res.iterations < one.iterations


def test_cg_in_float32_reaches_rtol_and_the_float32_products_accuracy(mlp):
    """With float32 Hessian products, float32 blocks (float64 small matrices) still drive the recursive
    residual down to rtol, in about the iterations float64 blocks take, and the solution is as accurate
    as the float32 products allow."""
    prob, H = mlp
    p, damping = H.shape[0], 0.05
    B = torch.randn(p, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = torch.linalg.solve(H + damping * torch.eye(p, dtype=H.dtype), B)
    f32 = TrainingHessian(prob, Runtime(chunk_size=16), dtype=torch.float32)
    runs = {
        dt: conjugate_gradient(f32.matmul, B, damping=damping, max_iter=p, rtol=1e-8, dtype=dt)
        for dt in (torch.float32, torch.float64)
    }
    single, double = runs[torch.float32], runs[torch.float64]
    assert single.x.dtype == torch.float32 and double.x.dtype == torch.float64
    assert single.converged and float(single.relative_residual.max()) <= 1e-8
    assert single.iterations <= double.iterations + 3
    err = max(_rel(single.x[:, j].double(), exact[:, j]) for j in range(5))
    err64 = max(_rel(double.x[:, j], exact[:, j]) for j in range(5))
    print(f"\nfloat32 CG: {single.iterations} iterations (float64 blocks: {double.iterations}), relative "
          f"error {err:.2e} (float64 blocks: {err64:.2e})")  # fmt: skip
    assert err < 1e-4 and err < 10 * err64


def test_cg_stops_at_max_iter_and_reports_residual(logreg):
    prob, H = logreg
    op = TrainingHessian(prob, F64)
    b = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    res = conjugate_gradient(op.matmul, b, damping=0.0, max_iter=2, rtol=1e-12)
    assert not res.converged and res.iterations == 2 and 0 < float(res.relative_residual[0]) < 1


def test_cg_negative_curvature_names_damping(mlp):
    # an explicit indefinite matrix, right-hand side along its negative eigenvector: fails at iteration 1
    A = torch.diag(torch.tensor([3.0, 1.0, -0.5], dtype=torch.float64))
    with pytest.raises(NumericalError) as e:
        conjugate_gradient(lambda V: A @ V, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), damping=0.1)
    assert e.value.parameter == "/method/params/damping" and "increase damping" in e.value.detail.lower()
    conjugate_gradient(lambda V: A @ V, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), damping=0.6)

    # a non-convex MLP at its random initialisation, no weight decay, no damping
    prob, _ = mlp
    model = init_model("mlp", MLP, 1).double()
    raw = InfluenceProblem(
        model=model,
        task=CLS,
        weights=model.state_dict(),
        train_x=prob.train_x[:40],
        train_y=prob.train_y[:40],
        query_x=prob.query_x,
        query_y=prob.query_y,
    )
    H = objective_hessian(model, raw.weights, raw.train_x, raw.train_y, CLS, 0.0)
    lam_min = float(torch.linalg.eigvalsh(H)[0])
    assert lam_min < -0.1  # strongly indefinite, so every generic right-hand side meets negative curvature
    op = TrainingHessian(raw, F64)
    B = torch.randn(op.p, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(NumericalError) as e:
        conjugate_gradient(op.matmul, B, damping=0.0, max_iter=op.p, rtol=1e-10)
    assert e.value.parameter == "/method/params/damping" and "not positive definite" in e.value.detail
    # with damping above -lambda_min it converges
    ok = conjugate_gradient(op.matmul, B, damping=-lam_min + 0.1, max_iter=op.p, rtol=1e-10)
    assert ok.converged


def test_lissa_matches_solve_on_logistic_regression(logreg):
    prob, H = logreg
    ev = torch.linalg.eigvalsh(H)
    lam_max, kappa = float(ev[-1]), float(ev[-1] / ev[0])
    op = TrainingHessian(prob, Runtime(dtype=torch.float64, chunk_size=256))
    B = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    res = lissa(
        op.rows_matmul,
        B,
        n_rows=prob.n_train,
        damping=0.0,
        scale=1.5 * lam_max,
        depth=int(20 * kappa),
        repeats=10,
        batch_size=64,
        seed=0,
    )
    exact = torch.linalg.solve(H, B)
    errs = [_rel(res.x[:, j], exact[:, j]) for j in range(3)]
    # the affine step (one pass per step, the methods' path) gives the same iterates (logistic regression:
    # the closed-form one-layer products, scaled and shifted by rows_matmul)
    aff = lissa(op.rows_matmul, B, n_rows=prob.n_train, damping=0.0, scale=1.5 * lam_max, depth=50,
                batch_size=64, seed=0, affine=True)  # fmt: skip
    ref = lissa(op.rows_matmul, B, n_rows=prob.n_train, damping=0.0, scale=1.5 * lam_max, depth=50,
                batch_size=64, seed=0)  # fmt: skip
    torch.testing.assert_close(aff.x, ref.x, rtol=1e-10, atol=1e-12)
    print(
        f"\nLiSSA vs solve (kappa={kappa:.2f}, depth={int(20 * kappa)}, 10 repeats, batch 64): errors {errs}"
    )
    assert max(errs) < 0.05
    assert res.max_growth <= 1.0 and res.products == 10 * int(20 * kappa)
    # columns depend only on the seed
    one = lissa(
        op.rows_matmul,
        B[:, 1],
        n_rows=prob.n_train,
        damping=0.0,
        scale=1.5 * lam_max,
        depth=20,
        repeats=2,
        batch_size=64,
        seed=4,
    )
    both = lissa(
        op.rows_matmul,
        B[:, :2],
        n_rows=prob.n_train,
        damping=0.0,
        scale=1.5 * lam_max,
        depth=20,
        repeats=2,
        batch_size=64,
        seed=4,
    )
    torch.testing.assert_close(one.x, both.x[:, 1], rtol=1e-10, atol=1e-14)


def test_lissa_divergence_names_scale():
    A = torch.diag(torch.tensor([4.0, 1.0, 0.5], dtype=torch.float64))

    def batch_hvp(rows, V):
        return A @ V

    v = torch.ones(3, dtype=torch.float64)
    common = dict(n_rows=10, damping=0.01, depth=200, repeats=1, batch_size=4, seed=0)
    with pytest.raises(NumericalError) as e:
        lissa(batch_hvp, v, scale=0.4 * 4.0, **common)
    assert e.value.parameter == "/method/params/scale"
    assert "scale=1.6" in e.value.detail and "damping=0.01" in e.value.detail
    # negative curvature the damping does not cover also diverges (geometrically)
    with pytest.raises(NumericalError):
        lissa(lambda r, V: -0.5 * V, v, scale=1.0, **common)
    good = lissa(batch_hvp, v, scale=6.0, **common)
    torch.testing.assert_close(good.x, v / (A.diagonal() + 0.01), rtol=1e-6, atol=0)


def test_arnoldi_top_eigenvalues_match_eigh(mlp):
    prob, H = mlp
    ev = torch.linalg.eigvalsh(H)
    top = ev[torch.argsort(ev.abs(), descending=True)]
    op = TrainingHessian(prob, F64)
    k = 10
    res = arnoldi(op.matmul, op.p, k, 3 * k, seed=0)
    rel = ((res.eigenvalues - top[:k]).abs() / top[:k].abs()).max().item()
    print(f"\nArnoldi top-{k} eigenvalues with {3 * k} iterations: max relative error {rel:.2e}")
    assert rel < 1e-4 and res.iterations == 3 * k
    V = res.eigenvectors
    assert V.shape == (op.p, k)
    torch.testing.assert_close(V.T @ V, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)
    assert float(torch.linalg.vector_norm(H @ V[:, :5] - V[:, :5] * res.eigenvalues[:5], dim=0).max()) < 1e-3
    lo, hi = extreme_eigenvalues(op.matmul, op.p, 30)
    assert abs(hi - float(ev[-1])) < 1e-6 * float(ev[-1]) and lo >= float(ev[0]) - 1e-12


def test_arnoldi_full_rank_reconstructs_the_hessian(logreg):
    # the 2-class softmax Hessian has a 6-fold eigenvalue (= weight decay): the Krylov space is exhausted
    # early and Arnoldi must restart in the orthogonal complement to find all of it
    prob, H = logreg
    op = TrainingHessian(prob, F64)
    p = op.p
    res = arnoldi(op.matmul, p, p, p, seed=1)
    assert res.restarts >= 1
    Hr = res.eigenvectors @ torch.diag(res.eigenvalues) @ res.eigenvectors.T
    torch.testing.assert_close(Hr, H, rtol=0, atol=1e-10 * float(H.abs().max()))
    torch.testing.assert_close(res.eigenvalues.sort().values, torch.linalg.eigvalsh(H), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError):
        arnoldi(op.matmul, p, 5, 3)


def test_arnoldi_residual_estimates_are_the_true_residuals(mlp):
    """The Lanczos estimate |beta * s_last| equals ||H v - lambda v||: it says how converged each pair is."""
    prob, H = mlp
    op = TrainingHessian(prob, F64)
    for k, n_iter in ((10, 10), (10, 20), (10, 40)):
        res = arnoldi(op.matmul, op.p, k, n_iter, seed=0)
        true = torch.linalg.vector_norm(H @ res.eigenvectors - res.eigenvectors * res.eigenvalues, dim=0)
        torch.testing.assert_close(res.residuals, true, rtol=1e-4, atol=1e-9 * float(H.abs().max()))
    short = arnoldi(op.matmul, op.p, 10, 10, seed=0)
    long = arnoldi(op.matmul, op.p, 10, 40, seed=0)
    assert float(long.residuals.max()) < float(short.residuals.max())  # more iterations, closer pairs


# ----------------------------------------------------------------------------- closed-form MLP products


def _chain_model(acts, out, *, bias=True, frozen=()):
    layers = [nn.Flatten(), nn.Linear(5, 7, bias=bias), *acts, nn.Linear(7, 6), nn.Tanh(), nn.Dropout(0.3)]
    model = nn.Sequential(*layers, nn.Linear(6, out, bias=bias)).double()
    for name, prm in model.named_parameters():
        prm.requires_grad_(name not in frozen)
    return model


def _autograd_hessian(model, x, y, task, weight_decay):
    """Hessian of ``mean_i L(z_i) + weight_decay/2 ||theta||^2`` by torch.autograd (the reference)."""
    model.eval()
    names = trainable_names(model)
    state = dict(model.state_dict())
    shapes = [state[k].shape for k in names]

    def objective(flat):
        params, off = dict(state), 0
        for k, shape in zip(names, shapes, strict=True):
            params[k] = flat[off : off + shape.numel()].view(shape)
            off += shape.numel()
        out = torch.func.functional_call(model, params, (x,))
        return per_example_loss(out, y, task).mean() + 0.5 * weight_decay * flat.dot(flat)

    return torch.autograd.functional.hessian(objective, flatten(state, names))


@pytest.mark.parametrize(
    "acts,task,frozen,bias",
    [
        ([nn.ReLU()], "cls", (), True),
        ([nn.GELU()], "cls", (), True),
        ([nn.Sigmoid(), nn.Softplus()], "reg2", (), True),  # a run of activations, 2-output regression
        ([nn.ELU()], "reg1", (), False),  # scalar regression, no biases
        ([nn.SiLU()], "cls", ("1.weight",), True),  # first layer's bias only
        ([nn.Tanh()], "cls", ("1.weight", "1.bias"), True),  # first layer frozen
        ([nn.LeakyReLU(0.1)], "cls", ("3.weight",), True),  # a frozen weight in the middle
    ],
)
def test_chain_hvp_equals_explicit_hessian(acts, task, frozen, bias):
    """The closed-form R-operator products of a plain MLP (ChainHessian) are the exact Hessian: all three
    layouts of the intermediates, row subsets, weight decay; float32 products to float32 accuracy.
    The explicit Hessian (assembled by ChainHessian.hessian_blocks) equals reverse-over-reverse autograd."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    if task == "cls":
        y, t, k = torch.randint(0, 3, (40,), generator=g), CLS, 3
    else:
        k = 2 if task == "reg2" else 1
        y = (
            torch.randn(40, k, generator=g, dtype=torch.float64)
            if k == 2
            else torch.randn(40, dtype=torch.float64)
        )
        t = TaskSpec("regression", "mse")
    model = _chain_model(acts, k, bias=bias, frozen=frozen)
    prob = InfluenceProblem(
        model=model, task=t, weights=model.state_dict(), train_x=x, train_y=y, query_x=x[:2], query_y=y[:2],
        weight_decay=0.01,
    )  # fmt: skip
    H = objective_hessian(model, prob.weights, x, y, t, 0.01, chunk_size=16)  # several row chunks
    torch.testing.assert_close(H, _autograd_hessian(model, x, y, t, 0.01), rtol=1e-10, atol=1e-13)
    op = TrainingHessian(prob, Runtime(dtype=torch.float64, chunk_size=16))
    assert op._chain is not None and op.p == H.shape[0]
    rows = torch.tensor([3, 7, 7, 20, 39])
    H_rows = objective_hessian(model, prob.weights, x[rows], y[rows], t, 0.01)
    for r in (1, 4, 20):  # 1, 4: the (rows, columns, features) layout; 20: (features, rows, columns)
        V = torch.randn(op.p, r, generator=g, dtype=torch.float64)
        torch.testing.assert_close(op.matmul(V), H @ V, rtol=1e-10, atol=1e-12 * float((H @ V).abs().max()))
        torch.testing.assert_close(op.rows_matmul(rows, V), H_rows @ V, rtol=1e-10, atol=1e-12)
        # LiSSA's affine step alpha H_rows V + beta V, folded into the product
        torch.testing.assert_close(
            op.rows_matmul(rows, V, alpha=-0.3, beta=0.7), -0.3 * H_rows @ V + 0.7 * V, rtol=1e-10, atol=1e-12
        )
    # the three layouts of the intermediates, each over several chunks of rows (matmul above picks
    # "features" for 40 rows; "columns" serves wide blocks over hundreds of rows)
    chain, V = op._chain, torch.randn(op.p, 20, generator=g, dtype=torch.float64)
    chunks = [
        chain.prepare(x[s : s + 16], y[s : s + 16], op._params, op._fixed, t, 1 / 40) for s in (0, 16, 32)
    ]
    HV = (H - 0.01 * torch.eye(op.p, dtype=H.dtype)) @ V  # hvp_sum leaves out weight decay
    for layout in ("rows", "features", "columns"):
        torch.testing.assert_close(
            chain.hvp_sum(chunks, V, op._tensors, layout=layout),
            HV,
            rtol=1e-10,
            atol=1e-12 * float(HV.abs().max()),
        )
    assert (
        chain.layout(20, 40) == "features"
        and chain.layout(20, 1400) == "columns"
        and chain.layout(4, 1400) == "rows"
    )
    f32 = TrainingHessian(prob, Runtime(chunk_size=16), dtype=torch.float32)
    V = torch.randn(op.p, 20, generator=g, dtype=torch.float64)
    HV = f32.matmul(V)
    assert HV.dtype == torch.float64 and f32.matmul(V.float()).dtype == torch.float32
    assert _rel(HV, H @ V) < 1e-5


def test_block_cg_with_dependent_right_hand_sides(mlp):
    """Duplicated and linearly dependent columns make the search block rank-deficient: the basis falls
    back to Householder QR and every column still converges to its own solution."""
    prob, H = mlp
    p, damping = H.shape[0], 0.05
    op = TrainingHessian(prob, F64)
    g = torch.Generator().manual_seed(7)
    B = torch.randn(p, 3, generator=g, dtype=torch.float64)
    B = torch.cat([B, B[:, :1], B[:, 1:2] - 2 * B[:, 2:3], 1e-9 * B[:, 2:3]], dim=1)  # 6 columns, rank 3
    res = conjugate_gradient(op.matmul, B, damping=damping, max_iter=p, rtol=1e-10)
    exact = torch.linalg.solve(H + damping * torch.eye(p, dtype=H.dtype), B)
    assert res.converged
    assert max(_rel(res.x[:, j], exact[:, j]) for j in range(6)) < 1e-6


def test_lissa_column_check_catches_one_diverging_column():
    """One diverging column hidden in a block dominated by a large converging one: the per-column check
    (every 10 steps) fails at step 20 (column 0 grows 1.5-fold per step and passes 4 (j + 1) ||v|| between
    steps 10 and 20), long before the block's norm would exceed its bound (about step 50)."""
    A = torch.diag(torch.tensor([4.0, 1.0, 0.5], dtype=torch.float64))
    V = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1e6]], dtype=torch.float64)  # column 0 along lambda = 4
    with pytest.raises(NumericalError) as e:
        lissa(lambda r, X: A @ X, V, n_rows=10, damping=0.0, scale=1.6, depth=200, batch_size=4)
    assert e.value.parameter == "/method/params/scale" and "at step 20 " in e.value.detail
    ok = lissa(lambda r, X: A @ X, V, n_rows=10, damping=0.0, scale=6.0, depth=300, batch_size=4)
    torch.testing.assert_close(ok.x, V / A.diagonal()[:, None], rtol=1e-6, atol=1e-9)
    assert 0 < ok.max_growth <= 1.0
