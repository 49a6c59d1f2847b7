"""One update of every method against an independent NumPy reference written from ALGORITHMS.md.

Gradients come from ``jax.grad`` of the test's own loss; everything else (norms, perturbations, mixing,
ARWP history) is recomputed here in NumPy. The random directions are fixed by replacing flatjax's
unit-noise generator with pre-drawn NumPy arrays, so the references see the same z.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flatjax
from flatjax.core import perturb
from flat_toys import (
    assert_tree_close, fixed_noise, make_batch, mlp_loss, mlp_params, np_filter_norm, np_filter_sum,
    np_grad, np_norm, np_tree, tmap,
)

LR = 0.1


def one_step(tx, params, batch, n=1, **kw):
    """Run ``n`` un-jitted updates of ``chain(tx, sgd(LR))`` on fixed params; return the directions."""
    chain = optax.chain(tx, optax.sgd(LR))
    state = chain.init(params)
    dirs = []
    for _ in range(n):
        updates, state = chain.update(None, state, params, batch=batch, **kw)
        dirs.append(tmap(lambda u: -np.asarray(u) / LR, updates))
    return dirs, state


@pytest.fixture
def noise_queue(monkeypatch):
    """Replace unit_noise by a queue of pre-drawn NumPy noises (one per call)."""
    queue = []

    def fake_unit_noise(key, tree, distribution="gaussian"):
        return tmap(jnp.asarray, queue.pop(0))

    monkeypatch.setattr(perturb, "unit_noise", fake_unit_noise)
    return queue


def test_sam_matches_reference():
    params, batch, rho = mlp_params(), make_batch(), 0.07
    g = np_grad(params, batch)
    norm = np_norm(g)
    e = tmap(lambda x: rho * x / (norm + 1e-12), g)
    expected = np_grad(tmap(lambda p, x: np.asarray(p) + x, params, e), batch)
    (d,), state = one_step(flatjax.sam(mlp_loss, rho=rho), params, batch)
    assert_tree_close(d, expected)
    info = flatjax.step_info(state)
    np.testing.assert_allclose(info.probe_losses[0], mlp_loss(params, batch), rtol=1e-6)
    np.testing.assert_allclose(info.diagnostics["grad_norm"], norm, rtol=1e-5)


def test_sam_m_sharpness_matches_reference():
    params, batch, rho, m = mlp_params(), make_batch(n=12), 0.1, 4
    dirs = []
    for i in range(3):
        part = tmap(lambda x: x[i * m : (i + 1) * m], batch)
        g = np_grad(params, part)
        e = tmap(lambda x: rho * x / (np_norm(g) + 1e-12), g)
        dirs.append(np_grad(tmap(lambda p, x: np.asarray(p) + x, params, e), part))
    expected = tmap(lambda *x: np.mean(x, axis=0), *dirs)
    for strategy in ("sequential", "vmap"):
        (d,), _ = one_step(flatjax.sam(mlp_loss, rho=rho, m=m, strategy=strategy), params, batch)
        assert_tree_close(d, expected)


def test_asam_matches_reference():
    params, batch, rho, eta = mlp_params(), make_batch(), 0.5, 0.01
    g = np_grad(params, batch)
    # kernels are adaptive, biases use T = 1 (the reference ASAM's weight/bias split)
    t = {k: {"kernel": np.abs(np.asarray(v["kernel"])) + eta, "bias": np.ones_like(v["bias"])} for k, v in params.items()}
    tg = tmap(lambda a, b: a * b, t, g)
    e = tmap(lambda a, b: rho * a * b / (np_norm(tg) + 1e-12), t, tg)
    expected = np_grad(tmap(lambda p, x: np.asarray(p) + x, params, e), batch)
    (d,), _ = one_step(flatjax.asam(mlp_loss, rho=rho, eta=eta), params, batch)
    assert_tree_close(d, expected)


def _rwp_noise(params, z, sigma, history=None, eta=0.0):
    def leaf(p, zz, s):
        p = np.asarray(p, np.float64)
        std = sigma * np_filter_norm(p)
        if s is not None:
            std = std / np.sqrt(1.0 + eta * np_filter_sum(s))
        return std * zz

    if history is None:
        return tmap(lambda p, zz: leaf(p, zz, None), params, z)
    return tmap(leaf, params, z, history)


def test_rwp_matches_reference(noise_queue):
    params, batch, sigma = mlp_params(), make_batch(), 0.05
    z = fixed_noise(params)
    noise_queue.append(z)
    e = _rwp_noise(params, z, sigma)
    expected = np_grad(tmap(lambda p, x: np.asarray(p) + x, params, e), batch)
    (d,), state = one_step(flatjax.rwp(mlp_loss, sigma=sigma), params, batch)
    assert_tree_close(d, expected)
    np.testing.assert_allclose(flatjax.step_info(state).diagnostics["noise_norm"], np_norm(e), rtol=1e-5)


def test_arwp_three_steps_match_reference(noise_queue):
    """History s ← β s + g_pert² (no 1−β), per-filter SUM, noise / sqrt(1 + η F); first step unscaled."""
    params, batch, sigma, eta, beta = mlp_params(), make_batch(), 0.05, 0.1, 0.9
    zs = [fixed_noise(params, seed=s) for s in (1, 2, 3)]
    noise_queue.extend(zs)
    s = tmap(lambda p: np.zeros(np.shape(p)), params)
    expected = []
    for z in zs:
        e = _rwp_noise(params, z, sigma, s, eta)
        g = np_grad(tmap(lambda p, x: np.asarray(p) + x, params, e), batch)
        expected.append(g)
        s = tmap(lambda a, b: beta * a + np.square(np.asarray(b, np.float64)), s, g)
    dirs, state = one_step(flatjax.arwp(mlp_loss, sigma=sigma, eta=eta, beta=beta), params, batch, n=3)
    for d, ref in zip(dirs, expected):
        assert_tree_close(d, ref)
    assert_tree_close(state[0].method, s, rtol=1e-5)


@pytest.mark.parametrize("adaptive", [False, True])
def test_mixed_rwp_two_batches_match_reference(noise_queue, adaptive):
    """m-(A)RWP: d = λ ∇L_B1(w + e) + (1 − λ) ∇L_B0(w), history from the perturbed gradient only."""
    params, b0, b1 = mlp_params(), make_batch(seed=1), make_batch(seed=2)
    sigma, lam, eta, beta = 0.05, 0.3, 0.2, 0.9
    zs = [fixed_noise(params, seed=s) for s in (4, 5)]
    noise_queue.extend(zs)
    s = tmap(lambda p: np.zeros(np.shape(p)), params)
    expected = []
    for z in zs:
        e = _rwp_noise(params, z, sigma, s if adaptive else None, eta)
        g1 = np_grad(tmap(lambda p, x: np.asarray(p) + x, params, e), b1)
        g0 = np_grad(params, b0)
        expected.append(tmap(lambda a, b: lam * a + (1 - lam) * b, g1, g0))
        s = tmap(lambda a, b: beta * a + np.square(np.asarray(b, np.float64)), s, g1)
    tx = (flatjax.marwp(mlp_loss, sigma, lam, eta, beta) if adaptive else flatjax.mrwp(mlp_loss, sigma, lam))
    dirs, state = one_step(tx, params, b0, n=2, perturbed_batch=b1)
    for d, ref in zip(dirs, expected):
        assert_tree_close(d, ref)
    info = flatjax.step_info(state)
    np.testing.assert_allclose(info.loss, mlp_loss(params, b0), rtol=1e-6)


# ---- limits: the method reduces to the base optimizer ------------------------------------------------


def _sgd_direction(params, batch):
    return np_grad(params, batch)


@pytest.mark.parametrize(
    "make",
    [
        lambda: flatjax.sam(mlp_loss, rho=0.0),
        lambda: flatjax.asam(mlp_loss, rho=0.0),
        lambda: flatjax.rwp(mlp_loss, sigma=0.0),
        lambda: flatjax.arwp(mlp_loss, sigma=0.0),
        lambda: flatjax.mrwp(mlp_loss, sigma=0.0),
        lambda: flatjax.marwp(mlp_loss, sigma=0.0),
        lambda: flatjax.mrwp(mlp_loss, sigma=0.1, lam=0.0),
        lambda: flatjax.marwp(mlp_loss, sigma=0.1, lam=0.0),
    ],
    ids=["sam-rho0", "asam-rho0", "rwp-sigma0", "arwp-sigma0", "mrwp-sigma0", "marwp-sigma0", "mrwp-lam0", "marwp-lam0"],
)
def test_limits_reduce_to_base_optimizer(make):
    params, batch = mlp_params(), make_batch()
    (d,), _ = one_step(make(), params, batch, n=1)
    assert_tree_close(d, _sgd_direction(params, batch), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("adaptive", [False, True])
def test_lambda_one_is_rwp(adaptive):
    params, b0, b1 = mlp_params(), make_batch(seed=1), make_batch(seed=2)
    if adaptive:
        mixed, single = flatjax.marwp(mlp_loss, 0.05, lam=1.0, seed=3), flatjax.arwp(mlp_loss, 0.05, seed=3)
    else:
        mixed, single = flatjax.mrwp(mlp_loss, 0.05, lam=1.0, seed=3), flatjax.rwp(mlp_loss, 0.05, seed=3)
    d_mixed, _ = one_step(mixed, params, b0, n=2, perturbed_batch=b1)
    d_single, _ = one_step(single, params, b1, n=2)
    for a, b in zip(d_mixed, d_single):
        assert_tree_close(a, b, rtol=1e-6, atol=1e-7)


def test_reused_clean_gradient_equals_own_clean_pass():
    params, batch = mlp_params(), make_batch()
    grads = jax.grad(mlp_loss)(params, batch)
    for make in (lambda: flatjax.sam(mlp_loss, 0.1), lambda: flatjax.mrwp(mlp_loss, 0.05, seed=1)):
        tx = make()
        own, _ = tx.update(None, tx.init(params), params, batch=batch)
        reused, state = tx.update(None, tx.init(params), params, batch=batch, clean_grad=grads)
        assert_tree_close(own, reused, rtol=1e-6)
        assert np.isnan(flatjax.step_info(state).loss)  # documented: the user has the clean loss


@pytest.mark.parametrize("method", [flatjax.sam, flatjax.asam])
def test_zero_gradient_gives_no_nan(method):
    params = {"w": jnp.zeros((3,)), "b": jnp.zeros(())}
    loss = lambda p, b: jnp.sum(p["w"] * 0.0) + 0.0 * p["b"]  # noqa: E731
    tx = method(loss)
    updates, state = tx.update(None, tx.init(params), params, batch=jnp.ones(3))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert np.isfinite(flatjax.step_info(state).diagnostics["grad_norm"])


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_gsam_matches_reference(alpha):
    """GSAM (Zhuang et al. 2022): d = g_p − α (g − ⟨g, g_p⟩ g_p / ‖g_p‖²); α = 0 is SAM."""
    params, batch, rho = mlp_params(), make_batch(), 0.07
    g = np_grad(params, batch)
    e = tmap(lambda x: rho * x / (np_norm(g) + 1e-12), g)
    g_p = np_grad(tmap(lambda p, x: np.asarray(p) + x, params, e), batch)
    gp_norm = np_norm(g_p)
    along = sum(np.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_p))) / gp_norm
    expected = tmap(lambda gp, g0: gp - alpha * (g0 - along * gp / gp_norm), g_p, g)
    (d,), state = one_step(flatjax.gsam(mlp_loss, rho=rho, alpha=alpha), params, batch)
    assert_tree_close(d, expected, rtol=2e-5)
    info = flatjax.step_info(state)
    np.testing.assert_allclose(info.diagnostics["surrogate_gap"], info.probe_losses[1] - info.probe_losses[0])
    if alpha == 0.0:
        (sam_d,), _ = one_step(flatjax.sam(mlp_loss, rho=rho), params, batch)
        assert_tree_close(d, sam_d)


def test_samon_matches_reference():
    """SAM-ON (Mueller et al. 2023): the ascent uses the normalization parameters' gradient only."""
    params = {"dense0": mlp_params()["dense0"], "LayerNorm_0": {"scale": jnp.linspace(0.5, 1.5, 7),
                                                                 "bias": jnp.linspace(-0.1, 0.1, 7)},
              "dense1": mlp_params()["dense1"]}

    def loss(p, b):
        h = b["x"] @ p["dense0"]["kernel"] + p["dense0"]["bias"]
        h = (h - h.mean(-1, keepdims=True)) / (h.std(-1, keepdims=True) + 1e-5)
        h = jnp.tanh(h * p["LayerNorm_0"]["scale"] + p["LayerNorm_0"]["bias"])
        logp = jax.nn.log_softmax(h @ p["dense1"]["kernel"] + p["dense1"]["bias"])
        return -jnp.mean(jnp.take_along_axis(logp, b["y"][:, None], axis=1))

    batch, rho = make_batch(), 0.3
    grad = jax.jit(jax.grad(loss))
    g = np_tree(grad(params, batch))
    g_norm_layer = g["LayerNorm_0"]
    scale = rho / (np_norm(g_norm_layer) + 1e-12)
    perturbed = {**params, "LayerNorm_0": tmap(lambda p, x: np.asarray(p) + scale * x, params["LayerNorm_0"],
                                               g_norm_layer)}
    expected = np_tree(grad(tmap(jnp.asarray, perturbed), batch))
    est = flatjax.estimators.samon(loss, rho=rho)
    _, d, _, _ = est.value_and_grad(params, est.init(params), batch)
    assert_tree_close(np_tree(d), expected, rtol=2e-5)
    sam_est = flatjax.estimators.sam(loss, rho=rho)
    _, d_sam, _, _ = sam_est.value_and_grad(params, sam_est.init(params), batch)
    assert not np.allclose(np.asarray(d["dense0"]["kernel"]), np.asarray(d_sam["dense0"]["kernel"]))
    with pytest.raises(ValueError, match="norm_mask selects no parameter"):
        bad = flatjax.estimators.samon(mlp_loss)
        bad.value_and_grad(mlp_params(), bad.init(mlp_params()), batch)
