"""WP-SGD, NSO and CR-SAM against references written from the formulas (ALGORITHMS.md), plus the
properties the papers rest on: NSO's first-order cancellation and its σ²/2 ∇Tr(H) bias, CR-SAM's
reduction to SAM and its finite-difference curvature."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flatjax
from flatjax.core import perturb
from flat_toys import (
    assert_tree_close, fixed_noise, make_batch, mlp_loss, mlp_params, np_grad, np_norm, tmap,
)


@pytest.fixture
def noise_queue(monkeypatch):
    queue = []
    monkeypatch.setattr(perturb, "unit_noise", lambda key, tree, distribution="gaussian": tmap(jnp.asarray, queue.pop(0)))
    return queue


def direction(tx, params, batch, jit=False):
    fn = lambda p, s: tx.update(None, s, p, batch=batch)  # noqa: E731
    updates, state = (jax.jit(fn) if jit else fn)(params, tx.init(params))
    return updates, flatjax.step_info(state)


def shifted(params, u, sign=1.0):
    return tmap(lambda p, x: np.asarray(p, np.float64) + sign * x, params, u)


def test_wpsgd_matches_reference(noise_queue):
    params, batch, sigma, k = mlp_params(), make_batch(), 0.05, 3
    zs = [fixed_noise(params, seed=s) for s in range(k)]
    noise_queue.extend(zs)
    grads = [np_grad(shifted(params, tmap(lambda z: sigma * z, z)), batch) for z in zs]
    expected = tmap(lambda *g: np.mean(g, axis=0), *grads)
    d, _ = direction(flatjax.wpsgd(mlp_loss, sigma, k=k), params, batch)
    assert_tree_close(d, expected)


@pytest.mark.parametrize("k,lam", [(1, 0.0), (3, 0.0), (2, 0.3)])
def test_nso_matches_reference(noise_queue, k, lam):
    params, batch, sigma = mlp_params(), make_batch(), 0.05
    zs = [fixed_noise(params, seed=10 + s) for s in range(k)]
    noise_queue.extend(zs)
    pair_sums = []
    for z in zs:
        u = tmap(lambda x: sigma * x, z)
        pair_sums.append(tmap(lambda a, b: a + b, np_grad(shifted(params, u), batch), np_grad(shifted(params, u, -1), batch)))
    g0 = np_grad(params, batch)
    expected = tmap(lambda c, *s: lam * c + (1 - lam) / (2 * k) * np.sum(s, axis=0), g0, *pair_sums)
    d, info = direction(flatjax.nso(mlp_loss, sigma, lam, k=k), params, batch)
    assert_tree_close(d, expected)
    assert info.probe_losses.shape == (2 * k + 1,)
    assert np.isnan(info.loss) == (lam == 0.0)  # the clean pass is skipped only for the literal λ = 0


def quadratic(seed=0, n=6):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, n))
    a, b = jnp.asarray(m @ m.T / n + np.eye(n), jnp.float32), jnp.asarray(rng.normal(size=n), jnp.float32)
    return (lambda w, batch: 0.5 * w @ a @ w + b @ w), a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nso_cancels_first_order_term_on_a_quadratic(seed):
    """f = ½wᵀAw + bᵀw: ∇f(w+U) + ∇f(w−U) = 2∇f(w) for EVERY U, so each pair returns ∇f(w) exactly;
    a single WP-SGD draw returns ∇f(w) + AU instead."""
    f, a, b = quadratic()
    w = jnp.linspace(-1.0, 1.0, 6)
    exact = a @ w + b
    nso_d, _ = direction(flatjax.nso(f, sigma=0.3, k=1, seed=seed), w, batch=0)
    wp_d, _ = direction(flatjax.wpsgd(f, sigma=0.3, k=1, seed=seed), w, batch=0)
    np.testing.assert_allclose(nso_d, exact, rtol=1e-5, atol=1e-5)
    assert np.linalg.norm(wp_d - exact) > 1e-2


def test_nso_expected_direction_on_a_cubic():
    """f(w) = Σ a_i w_i³/6: H = diag(a ⊙ w), Tr H = aᵀw, ∇Tr H = a, and E[NSO] = ∇f + (σ²/2) a.

    Each pair gives ½ a ⊙ (w² + U²): mean over K pairs has std a σ² / √(2K) per coordinate; the test
    allows 5 of those."""
    a = jnp.asarray([1.0, -2.0, 3.0, 0.5], jnp.float32)
    f = lambda w, batch: jnp.sum(a * w**3) / 6.0  # noqa: E731
    w, sigma, pairs, draws = jnp.asarray([0.3, -0.2, 0.5, 1.0], jnp.float32), 0.2, 64, 64
    k = pairs * draws
    tx = flatjax.nso(f, sigma=sigma, k=pairs, strategy="vmap")
    step = jax.jit(lambda key: tx.update(None, tx.init(w), w, batch=0, key=key)[0])
    d = np.mean([np.asarray(step(jax.random.key(i))) for i in range(draws)], axis=0)
    expected = 0.5 * a * w**2 + 0.5 * sigma**2 * a
    tol = 5 * np.abs(np.asarray(a)) * sigma**2 / np.sqrt(2 * k)
    assert np.all(np.abs(np.asarray(d) - np.asarray(expected)) < tol), (d, expected, tol)
    # and the bias is really there: the plain gradient is outside the tolerance
    assert np.any(np.abs(np.asarray(d) - np.asarray(0.5 * a * w**2)) > tol)


@pytest.mark.parametrize("form", ["code", "log"])
def test_crsam_matches_reference(form):
    params, batch, rho, alpha, beta = mlp_params(), make_batch(), 0.1, 0.3, 0.05
    g = np_grad(params, batch)
    v = tmap(lambda x: x / (np_norm(g) + 1e-12), g)
    plus, minus = shifted(params, tmap(lambda x: rho * x, v)), shifted(params, tmap(lambda x: rho * x, v), -1)
    gp, gm = np_grad(plus, batch), np_grad(minus, batch)
    l0 = float(mlp_loss(params, batch))
    lp = float(mlp_loss(tmap(jnp.asarray, plus), batch))
    lm = float(mlp_loss(tmap(jnp.asarray, minus), batch))
    c, s = lp + lm - 2 * l0, lp - lm
    wc, ws = (alpha, beta) if form == "code" else (alpha / c, beta / s)
    assert c > 0 and s > 0  # the log form's unclamped branch is what this case checks
    expected = tmap(lambda p, m, g0: p + wc * (p + m - 2 * g0) + ws * (p - m), gp, gm, g)
    d, info = direction(flatjax.crsam(mlp_loss, rho, alpha, beta, form=form), params, batch)
    assert_tree_close(d, expected, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(info.probe_losses, [l0, lp, lm], rtol=1e-5)
    np.testing.assert_allclose(info.diagnostics["regularizer"], alpha * np.log(c) + beta * np.log(s), rtol=1e-3)


def test_crsam_log_form_clamps_nonconvex_direction():
    """Along a concave direction c < 0: the curvature term is dropped (zero gradient), no NaN."""
    f = lambda w, batch: -jnp.sum(w**2) + jnp.sum(w)  # noqa: E731 — concave: c = −2ρ²
    w = jnp.asarray([0.2, -0.4, 0.1])
    d, info = direction(flatjax.crsam(f, 0.1, 1.0, 0.0, form="log"), w, batch=0)
    sam_d, _ = direction(flatjax.sam(f, 0.1), w, batch=0)
    assert float(info.diagnostics["curvature"]) < 0
    np.testing.assert_allclose(d, sam_d, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(info.diagnostics["regularizer"])))


def test_crsam_with_zero_weights_equals_sam_exactly():
    params, batch = mlp_params(), make_batch()
    for rho in (0.05, 0.2):
        cr, _ = direction(flatjax.crsam(mlp_loss, rho, 0.0, 0.0, strategy="sequential"), params, batch)
        sam, _ = direction(flatjax.sam(mlp_loss, rho), params, batch)
        assert_tree_close(cr, sam, rtol=0, atol=0)


def test_crsam_curvature_matches_hessian():
    """c/ρ² → vᵀHv as ρ → 0 (error O(ρ²)); checked against the exact jax.hessian of the MLP."""
    params, batch = mlp_params(), make_batch()
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    loss_flat = lambda x: mlp_loss(unravel(x), batch)  # noqa: E731
    h = jax.hessian(loss_flat)(flat)
    g = jax.grad(loss_flat)(flat)
    v = g / jnp.linalg.norm(g)
    vhv = float(v @ h @ v)
    _, info = direction(flatjax.crsam(mlp_loss, rho=0.02), params, batch)
    np.testing.assert_allclose(float(info.diagnostics["curvature"]), vhv, rtol=2e-2)
    np.testing.assert_allclose(float(info.diagnostics["slope"]), float(jnp.linalg.norm(g)), rtol=1e-2)


@pytest.mark.parametrize("make", [
    lambda: flatjax.nso(mlp_loss, sigma=0.0, k=2),
    lambda: flatjax.nso(mlp_loss, sigma=0.3, lam=1.0),
    lambda: flatjax.wpsgd(mlp_loss, sigma=0.0, k=2),
    lambda: flatjax.crsam(mlp_loss, rho=0.0),
], ids=["nso-sigma0", "nso-lam1", "wpsgd-sigma0", "crsam-rho0"])
def test_limits_reduce_to_base_gradient(make):
    params, batch = mlp_params(), make_batch()
    d, _ = direction(make(), params, batch)
    assert_tree_close(d, np_grad(params, batch), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("noise", ["laplace", "uniform", "filterwise"])
def test_noise_families_have_the_documented_scale(noise):
    """Unit variance before σ for i.i.d. noises; σ‖w_f‖ per filter for the filter-wise one."""
    params = {"kernel": jnp.ones((200, 300)) * jnp.arange(1, 301) / 300.0}
    from flatjax.methods.nso import draw_noise
    u = draw_noise(jax.random.key(0), params, jnp.float32(0.1), noise)[0]["kernel"]
    if noise == "filterwise":
        per_filter_std = np.std(np.asarray(u), axis=0)
        expected = 0.1 * np.sqrt(200) * np.arange(1, 301) / 300.0
        np.testing.assert_allclose(per_filter_std, expected, rtol=0.2)
    else:
        np.testing.assert_allclose(np.std(np.asarray(u)), 0.1, rtol=0.02)
        np.testing.assert_allclose(np.mean(np.asarray(u)), 0.0, atol=0.002)


def test_nso_trains_an_mlp():
    params, tx = mlp_params(), optax.chain(flatjax.nso(mlp_loss, 0.01, k=2), optax.sgd(0.2, momentum=0.9))
    state, batch = tx.init(params), make_batch(n=32)
    step = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))
    first = float(mlp_loss(params, batch))
    for _ in range(50):
        u, state = step(params, state)
        params = optax.apply_updates(params, u)
    assert float(mlp_loss(params, batch)) < 0.5 * first
