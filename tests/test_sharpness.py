"""Tests of flatjax.sharpness against exact Hessians (jax.hessian + numpy.linalg) on small models."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import flatjax
from flatjax import sharpness as S

SIZES = (4, 8, 8, 3)  # 139 parameters
trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed trapz


def init_mlp(seed, sizes=SIZES):
    rng = np.random.default_rng(seed)  # numpy: no per-op compilation in the test setup
    return {f"l{i}": {"kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
                      "bias": jnp.full((b,), 0.1, jnp.float32)}
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}


def mlp_loss(params, batch):
    x, y = batch
    n = len(params)
    for i in range(n):
        x = x @ params[f"l{i}"]["kernel"] + params[f"l{i}"]["bias"]
        if i < n - 1:
            x = jnp.tanh(x)
    return -jnp.mean(jax.nn.log_softmax(x)[jnp.arange(y.shape[0]), y])


ref_loss = jax.jit(mlp_loss)  # direct evaluation for reference values (one compilation)


def mlp_loss_aux(params, batch):
    return mlp_loss(params, batch), {"something": jnp.zeros(3)}


def quad_loss(params, batch):
    """0.5 (w - c)ᵀ A (w - c) + 0 with A, c carried by the batch."""
    r = params["w"] - batch["c"]
    return 0.5 * r @ batch["A"] @ r


@pytest.fixture(scope="module")
def problem():
    params = init_mlp(0)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, size=64), jnp.int32)
    flat, unravel = ravel_pytree(params)
    hess = np.asarray(jax.jit(jax.hessian(lambda f: mlp_loss(unravel(f), (x, y))))(flat),
                      np.float64)
    grad = np.asarray(jax.jit(jax.grad(lambda f: mlp_loss(unravel(f), (x, y))))(flat), np.float64)
    return {"params": params, "batch": (x, y), "flat": flat, "unravel": unravel, "H": hess,
            "g": grad, "eig": np.linalg.eigvalsh(hess)}


@pytest.fixture(scope="module")
def quad():
    rng = np.random.default_rng(0)
    d = 12
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam = np.linspace(0.2, 3.0, d)
    a = (q * lam) @ q.T
    c = rng.normal(size=d)
    w = rng.normal(size=d)
    return {"params": {"w": jnp.asarray(w, jnp.float32)},
            "batch": {"A": jnp.asarray(a, jnp.float32), "c": jnp.asarray(c, jnp.float32)},
            "A": a, "c": c, "w": w}


# -- Hessian-vector products --------------------------------------------------------------------

def test_hvp_matches_exact_hessian_and_has_aux(problem):
    v = problem["unravel"](jnp.asarray(np.random.default_rng(3).normal(size=problem["flat"].size),
                                       jnp.float32))
    hv = S.hvp(mlp_loss, problem["params"], v, problem["batch"])
    exact = problem["H"] @ np.asarray(ravel_pytree(v)[0], np.float64)
    np.testing.assert_allclose(np.asarray(ravel_pytree(hv)[0]), exact, rtol=1e-4, atol=1e-5)
    hv_aux = S.hvp(mlp_loss_aux, problem["params"], v, problem["batch"], has_aux=True)
    np.testing.assert_allclose(ravel_pytree(hv_aux)[0], ravel_pytree(hv)[0], rtol=1e-6, atol=1e-7)


def test_batches_weighting(problem):
    x, y = problem["batch"]
    parts = [(x[:40], y[:40]), (x[40:], y[40:])]  # unequal sizes 40 and 24
    v = jnp.asarray(np.random.default_rng(4).normal(size=problem["flat"].size), jnp.float32)
    op_full = S.HessianOperator(mlp_loss, problem["params"], problem["batch"])
    op_size = S.HessianOperator(mlp_loss, problem["params"], batches=iter(parts))  # generator ok
    np.testing.assert_allclose(op_size.matvec(v), op_full.matvec(v), rtol=1e-4, atol=1e-6)
    assert op_size.loss() == pytest.approx(op_full.loss(), rel=1e-5)
    op_eq = S.HessianOperator(mlp_loss, problem["params"], batches=parts, weighting="equal")
    ops = [S.HessianOperator(mlp_loss, problem["params"], b) for b in parts]
    np.testing.assert_allclose(op_eq.matvec(v), 0.5 * (ops[0].matvec(v) + ops[1].matvec(v)),
                               rtol=1e-5, atol=1e-6)
    op_w = S.HessianOperator(mlp_loss, problem["params"], batches=parts, weighting=[3.0, 1.0])
    np.testing.assert_allclose(op_w.matvec(v), 0.75 * ops[0].matvec(v) + 0.25 * ops[1].matvec(v),
                               rtol=1e-5, atol=1e-6)
    # size weighting differs from equal weighting here, so the test above can fail
    assert not np.allclose(op_eq.matvec(v), op_full.matvec(v), rtol=1e-3)


# -- Hutchinson trace ---------------------------------------------------------------------------

@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_trace_within_3_stderr(problem, probe):
    h = problem["H"]
    exact = np.trace(h)
    est = S.hutchinson_trace(mlp_loss, problem["params"], problem["batch"], key=jax.random.key(5),
                             probe=probe, max_samples=400, rtol=0.0)
    assert est.num_samples == 400 and not est.converged
    assert abs(est.trace - exact) <= 3 * est.stderr
    # the standard error is the right size: per-probe variance of zᵀHz is known exactly
    off = h - np.diag(np.diag(h))
    var = 2 * np.sum(off**2) + (2 * np.sum(np.diag(h) ** 2) if probe == "gaussian" else 0.0)
    assert 0.8 < est.stderr / np.sqrt(var / 400) < 1.25
    np.testing.assert_allclose(est.trace, est.samples.mean())


def test_hutchinson_stopping_rule_and_determinism(problem):
    kw = dict(key=jax.random.key(6), max_samples=500, min_samples=10, rtol=0.1)
    est = S.hutchinson_trace(mlp_loss, problem["params"], problem["batch"], **kw)
    assert est.converged and 10 <= est.num_samples < 500
    assert est.stderr <= 0.1 * abs(est.trace)
    for n in range(10, est.num_samples):  # the rule was not met earlier
        s = est.samples[:n]
        assert np.std(s, ddof=1) / np.sqrt(n) > 0.1 * abs(s.mean())
    again = S.hutchinson_trace(mlp_loss, problem["params"], problem["batch"], **kw)
    np.testing.assert_array_equal(again.samples, est.samples)
    other = S.hutchinson_trace(mlp_loss, problem["params"], problem["batch"],
                               **{**kw, "key": jax.random.key(7)})
    assert not np.array_equal(other.samples[:10], est.samples[:10])
    blocked = S.hutchinson_trace(mlp_loss, problem["params"], problem["batch"],
                                 key=jax.random.key(6), max_samples=40, rtol=0.0, block_size=8)
    assert blocked.num_samples == 40
    assert abs(blocked.trace - np.trace(problem["H"])) <= 3 * blocked.stderr


# -- eigenvalues --------------------------------------------------------------------------------

def test_lanczos_top3(problem):
    top = problem["eig"][::-1][:3]
    res = S.lanczos_eigenvalues(mlp_loss, problem["params"], problem["batch"],
                                key=jax.random.key(8), k=3, num_iters=60, return_vectors=True)
    np.testing.assert_allclose(res.eigenvalues, top, rtol=1e-3)
    for lam, vec in zip(res.eigenvalues, res.eigenvectors):
        v = np.asarray(ravel_pytree(vec)[0], np.float64)
        assert np.linalg.norm(problem["H"] @ v - lam * v) < 1e-3 * top[0]
    low = S.lanczos_eigenvalues(mlp_loss, problem["params"], problem["batch"],
                                key=jax.random.key(8), k=2, num_iters=139, which="smallest")
    np.testing.assert_allclose(low.eigenvalues, problem["eig"][:2], rtol=1e-3)


def test_power_iteration_top3(problem):
    eig = problem["eig"]
    top = eig[np.argsort(-np.abs(eig))][:3]  # power iteration finds the largest magnitudes
    res = S.power_iteration(mlp_loss, problem["params"], problem["batch"], key=jax.random.key(9),
                            k=3, max_iters=1000, tol=1e-7)
    assert res.converged
    np.testing.assert_allclose(res.eigenvalues, top, rtol=1e-3)


def test_lanczos_tridiagonal_exact_on_small_matrix():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(30, 30))
    a = (m + m.T) / 2
    tri = S.lanczos_tridiagonal(lambda v: jnp.asarray(a, jnp.float32) @ v,
                                jnp.asarray(rng.normal(size=30), jnp.float32), 30)
    np.testing.assert_allclose(np.sort(tri.eigh()[0]), np.linalg.eigvalsh(a), atol=1e-4)


# -- spectral density ---------------------------------------------------------------------------

def test_slq_density(problem):
    d = problem["flat"].size
    dens = S.slq_density(mlp_loss, problem["params"], problem["batch"], key=jax.random.key(10),
                         num_runs=16, num_iters=30)
    np.testing.assert_allclose(dens.weights.sum(axis=1), 1.0, rtol=1e-6)
    grid, phi = dens.evaluate()
    assert trapezoid(phi, grid) == pytest.approx(1.0, abs=1e-3)
    mean_grid = trapezoid(grid * phi, grid)
    assert mean_grid == pytest.approx(dens.mean(), abs=1e-3 * np.abs(problem["eig"]).max())
    per_run = np.sum(dens.nodes * dens.weights, axis=1)  # = v_rᵀ H v_r, unbiased for Tr(H)/d
    se = per_run.std(ddof=1) / np.sqrt(per_run.size)
    assert abs(dens.mean() - np.trace(problem["H"]) / d) <= 3 * se
    # nodes lie inside the spectrum; the extreme nodes converge to the extreme eigenvalues
    assert dens.nodes.max() == pytest.approx(problem["eig"][-1], rel=1e-3)
    assert dens.nodes.min() >= problem["eig"][0] - 1e-4


# -- CR-SAM / RWP / NSO measures ----------------------------------------------------------------

def test_normalized_trace(problem):
    res = S.normalized_hessian_trace(mlp_loss, problem["params"], problem["batch"],
                                     key=jax.random.key(11), max_samples=300, rtol=0.0)
    gn = np.linalg.norm(problem["g"])
    assert res.grad_norm == pytest.approx(gn, rel=1e-5)
    exact = np.trace(problem["H"]) / gn
    assert abs(res.value - exact) <= 3 * res.stderr
    assert res.value == pytest.approx(res.trace.trace / gn, rel=1e-5)
    reuse = S.normalized_hessian_trace(mlp_loss, problem["params"], problem["batch"],
                                       trace=res.trace)
    assert reuse.value == res.value


def _trust_region_max(a, g, rho):
    """max_{||e|| <= rho} gᵀe + ½ eᵀAe by the secular equation (A PSD, g generic)."""
    lam = np.linalg.eigvalsh(a)
    lo, hi = lam[-1] + 1e-12, lam[-1] + np.linalg.norm(g) / rho + 1.0
    for _ in range(200):  # ||(μI - A)^{-1} g|| decreases in μ > λ_max
        mu = 0.5 * (lo + hi)
        e = np.linalg.solve(mu * np.eye(len(g)) - a, g)
        lo, hi = (mu, hi) if np.linalg.norm(e) > rho else (lo, mu)
    return g @ e + 0.5 * e @ a @ e


def test_sam_approximation_ratio_quadratic(quad):
    a, w, c = quad["A"], quad["w"], quad["c"]
    g = a @ (w - c)
    rho = 0.8
    res = S.sam_approximation_ratio(quad_loss, quad["params"], quad["batch"], rho=rho,
                                    num_steps=100)
    e_sam = rho * g / np.linalg.norm(g)
    assert res.sam_gap == pytest.approx(g @ e_sam + 0.5 * e_sam @ a @ e_sam, rel=1e-4)
    best = _trust_region_max(a, g, rho)
    assert res.best_gap == pytest.approx(best, rel=1e-3)
    assert res.ratio == pytest.approx(res.sam_gap / best, rel=1e-3)
    assert res.ratio < 0.999  # curvature makes one step suboptimal here
    one = S.sam_approximation_ratio(quad_loss, quad["params"], quad["batch"], rho=rho,
                                    num_steps=1)
    assert one.ratio == 1.0


def test_random_gaps_against_second_order_formula(quad):
    a = quad["A"]
    d = a.shape[0]
    tr = np.trace(a)
    sig = np.array([0.1, 0.3])
    gauss = S.random_perturbation_gaps(quad_loss, quad["params"], quad["batch"],
                                       key=jax.random.key(12), scales=sig, kind="gaussian",
                                       num_samples=200, trace=tr)
    np.testing.assert_allclose(gauss.predicted, 0.5 * sig**2 * tr)
    # for a quadratic E[L(w+U)] - L(w) = (σ²/2) Tr(A) exactly
    assert np.all(np.abs(gauss.mean_gap - gauss.predicted) <= 3 * gauss.stderr)
    assert np.all(gauss.max_gap >= gauss.mean_gap)
    np.testing.assert_allclose(gauss.mean_norm, sig * np.sqrt(d), rtol=0.1)
    sph = S.random_perturbation_gaps(quad_loss, quad["params"], quad["batch"],
                                     key=jax.random.key(13), scales=[0.0, 0.5], kind="sphere",
                                     num_samples=200, trace=tr)
    np.testing.assert_allclose(sph.mean_norm, [0.0, 0.5], rtol=1e-5)
    assert sph.mean_gap[0] == 0.0
    assert abs(sph.mean_gap[1] - 0.125 * tr / d) <= 3 * sph.stderr[1]
    adv = S.adversarial_perturbation_gaps(quad_loss, quad["params"], quad["batch"],
                                          radii=[0.0, 0.5], num_steps=50)
    g = a @ (quad["w"] - quad["c"])
    assert adv.mean_gap[0] == 0.0
    assert adv.mean_gap[1] == pytest.approx(_trust_region_max(a, g, 0.5), rel=1e-3)
    assert adv.mean_gap[1] > sph.max_gap[1]


def test_filter_gaps_direct(problem):
    key = jax.random.key(14)
    res = S.random_perturbation_gaps(mlp_loss, problem["params"], problem["batch"], key=key,
                                     scales=[0.05], kind="filter", num_samples=3)
    base = float(ref_loss(problem["params"], problem["batch"]))
    direct, points = [], []
    for i in range(3):
        e = S.filter_wise_noise(jax.random.fold_in(key, i), problem["params"], 0.05)
        gp = float(ref_loss(jax.tree.map(jnp.add, problem["params"], e), problem["batch"])) - base
        gm = float(ref_loss(jax.tree.map(jnp.subtract, problem["params"], e),
                            problem["batch"])) - base
        direct.append(0.5 * (gp + gm))
        points += [gp, gm]
    assert res.mean_gap[0] == pytest.approx(np.mean(direct), rel=1e-3, abs=1e-6)
    assert res.max_gap[0] == pytest.approx(max(points), rel=1e-3, abs=1e-6)


# -- directions and landscapes ------------------------------------------------------------------

def test_filter_normalization_flax_conv():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(5, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=True)(x)
            x = nn.relu(x).reshape((x.shape[0], -1))
            return nn.Dense(3)(x)

    variables = jax.jit(Net().init)(jax.random.key(0), jnp.ones((1, 4, 4, 2)))
    params = jax.tree.map(np.asarray, variables["params"])
    # make filter norms very different, so a wrong axis cannot pass by accident
    params = jax.tree.map(lambda p: p * np.arange(1, p.shape[-1] + 1) if p.ndim > 1 else p + 1.0,
                          params)
    d = jax.tree.map(np.asarray, S.filter_normalized_direction(jax.random.key(1), params))
    conv_w, conv_d = params["Conv_0"]["kernel"], d["Conv_0"]["kernel"]
    dense_w, dense_d = params["Dense_0"]["kernel"], d["Dense_0"]["kernel"]
    assert conv_w.shape == (3, 3, 2, 5) and dense_w.shape == (80, 3)
    np.testing.assert_allclose(np.linalg.norm(conv_d.reshape(-1, 5), axis=0),
                               np.linalg.norm(conv_w.reshape(-1, 5), axis=0), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(dense_d, axis=0), np.linalg.norm(dense_w, axis=0),
                               rtol=1e-5)
    for leaf in (d["Conv_0"]["bias"], d["Dense_0"]["bias"], d["BatchNorm_0"]["scale"],
                 d["BatchNorm_0"]["bias"]):
        assert leaf.ndim == 1 and not np.any(leaf)
    d2 = S.filter_normalized_direction(jax.random.key(1), params, one_d="filter")
    for mod, name in [("Conv_0", "bias"), ("BatchNorm_0", "scale")]:
        assert float(np.linalg.norm(d2[mod][name])) == pytest.approx(
            float(np.linalg.norm(params[mod][name])), rel=1e-5)
    np.testing.assert_array_equal(d2["Conv_0"]["kernel"], conv_d)
    # RWP's filter-wise noise: per-filter std σ||w_f|| (Dense fan-in 80 per filter)
    e = S.filter_wise_noise(jax.random.key(2), params, 0.1)["Dense_0"]["kernel"]
    ratio = np.std(np.asarray(e), axis=0) / (0.1 * np.linalg.norm(dense_w, axis=0))
    assert np.all(np.abs(ratio - 1.0) < 0.3)


def test_landscapes_match_direct_evaluation(problem):
    params, batch = problem["params"], problem["batch"]
    l1 = S.loss_landscape_1d(mlp_loss, params, batch, key=jax.random.key(15),
                             alphas=[-0.5, 0.0, 0.25, 1.0], chunk_size=3)
    for a, val in zip(l1.alphas, l1.losses):
        p = jax.tree.map(lambda w, dd: w + a * dd, params, l1.direction)
        assert val == pytest.approx(float(ref_loss(p, batch)), rel=1e-5)
    assert l1.losses[1] == pytest.approx(l1.center_loss, rel=1e-6)
    alphas, betas = np.array([-1.0, 0.0, 0.5]), np.array([-0.5, 0.0, 0.5, 1.0])
    l2 = S.loss_landscape_2d(mlp_loss, params, batch, key=jax.random.key(16), alphas=alphas,
                             betas=betas, chunk_size=5)
    assert l2.losses.shape == (3, 4)
    d1, d2 = l2.directions
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            p = jax.tree.map(lambda w, x, y: w + a * x + b * y, params, d1, d2)
            assert l2.losses[i, j] == pytest.approx(float(ref_loss(p, batch)), rel=1e-5)
    assert l2.summary()["center_loss"] == pytest.approx(float(ref_loss(params, batch)), rel=1e-6)
    same = S.loss_landscape_2d(mlp_loss, params, batch, directions=(d1, d2), alphas=alphas,
                               betas=betas)
    np.testing.assert_allclose(same.losses, l2.losses, rtol=1e-6)


# -- argument checking --------------------------------------------------------------------------

def test_bad_arguments_raise_value_error(problem):
    p, b = problem["params"], problem["batch"]
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="probe"):
        S.hutchinson_trace(mlp_loss, p, b, key=key, probe="uniform")
    with pytest.raises(ValueError, match="max_samples"):
        S.hutchinson_trace(mlp_loss, p, b, key=key, max_samples=5, min_samples=10)
    with pytest.raises(ValueError, match="batch/batches"):
        S.hutchinson_trace(mlp_loss, p, b, key=key, batches=[b])
    with pytest.raises(ValueError, match="batches"):
        S.HessianOperator(mlp_loss, p, batches=[])
    with pytest.raises(ValueError, match="weighting"):
        S.HessianOperator(mlp_loss, p, batches=[b, b], weighting=[1.0])
    with pytest.raises(ValueError, match="key"):
        S.hutchinson_trace(mlp_loss, p, b, key=None)
    with pytest.raises(ValueError, match="k must be"):
        S.lanczos_eigenvalues(mlp_loss, p, b, key=key, k=500, num_iters=600)
    with pytest.raises(ValueError, match="which"):
        S.lanczos_eigenvalues(mlp_loss, p, b, key=key, which="top")
    with pytest.raises(ValueError, match="rho"):
        S.sam_approximation_ratio(mlp_loss, p, b, rho=0.0)
    with pytest.raises(ValueError, match="scales"):
        S.random_perturbation_gaps(mlp_loss, p, b, key=key, scales=[-0.1])
    with pytest.raises(ValueError, match="kind"):
        S.random_perturbation_gaps(mlp_loss, p, b, key=key, scales=[0.1], kind="laplace")
    with pytest.raises(ValueError, match="one_d"):
        S.filter_normalized_direction(key, p, one_d="keep")
    with pytest.raises(ValueError, match="has_aux"):
        S.hutchinson_trace(mlp_loss, p, b, key=key, has_aux=True)


def test_toolkit_and_methods_share_one_error_style(problem):
    """The sharpness toolkit checks its arguments with flatjax.core.validate: same message shape as the methods."""
    p, b = problem["params"], problem["batch"]
    key = jax.random.key(0)
    style = r"^(\S+) must be (.+), got (.+)$"
    errors = []
    for call in (lambda: S.hutchinson_trace(mlp_loss, p, b, key=key, probe="uniform"),
                 lambda: S.hutchinson_trace(mlp_loss, p, b, key=key, min_samples=1),
                 lambda: S.hutchinson_trace(mlp_loss, p, b, key=key, rtol=-1.0),
                 lambda: S.hutchinson_trace(mlp_loss, p, b, key="seed"),
                 lambda: S.sam_approximation_ratio(mlp_loss, p, b, rho=0.0),
                 lambda: S.filter_normalized_direction(key, p, one_d="keep"),
                 lambda: flatjax.sam(mlp_loss, rho=-1.0),
                 lambda: flatjax.nso(mlp_loss, noise="cauchy"),
                 lambda: flatjax.nso(mlp_loss, k=0)):
        with pytest.raises(ValueError) as err:
            call()
        errors.append(str(err.value))
    names = [m.group(1) if (m := re.match(style, e, flags=re.S)) else e for e in errors]
    assert names == ["probe", "min_samples", "rtol", "key", "rho", "one_d", "rho", "noise", "k"], errors
    assert "an integer >= 2" in errors[1] and "[0, inf)" in errors[2] and "(0, inf)" in errors[4]
