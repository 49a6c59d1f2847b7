"""LETS (learned SAM/ASAM/CR-SAM radius): hypergradient accuracy, one update against an independent
reference, equality with SAM/ASAM/CR-SAM at radius learning rate 0, the direction α moves on a toy
problem built for it, non-finite validation losses, hyper-parameter checks, data parallelism.

The reference is written from ALGORITHMS.md (LETS section) with the test's own ``jax.grad`` /
``jax.jvp`` for gradients and Hessian-vector products, and NumPy for everything else (ascent step,
momentum, weight decay, gap, chain rule, Adam on α).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import flatjax
from flatjax import lets, lets_radius_optimizer
from flatjax.methods.lets import LetsState
from flat_toys import assert_tree_close, make_batch, mlp_loss, mlp_params, np_norm, np_tree, tmap

grad_fn = jax.jit(jax.grad(mlp_loss))
loss_jit = jax.jit(mlp_loss)


def hvp(params, batch, vec):
    """The test's own exact Hessian-vector product (forward over reverse)."""
    cast = lambda t: tmap(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
    return np_tree(jax.jvp(lambda p: jax.grad(mlp_loss)(p, batch), (cast(params),), (cast(vec),))[1])


def jit_update(tx, train, val):
    return jax.jit(lambda p, s: tx.update(None, s, p, batch=train, val_batch=val))


def eager_update(tx, train, val):
    """Un-jitted: on this tiny MLP, op-by-op dispatch is faster than compiling each variant."""
    return lambda p, s: tx.update(None, s, p, batch=train, val_batch=val)


def hypergrad(params, train, val, state_steps=0, **kw):
    """dF/dα of one step (after ``state_steps`` warm-up steps on the same batches)."""
    tx = lets(mlp_loss, radius_optimizer=optax.sgd(0.0), **kw)
    step, state, p = eager_update(tx, train, val), tx.init(params), params
    for _ in range(state_steps + 1):
        updates, state = step(p, state)
        p = optax.apply_updates(p, updates)
    return float(flatjax.step_info(state).diagnostics["hypergrad"])


# ---- (a) finite difference vs exact autodiff ---------------------------------------------------


@pytest.mark.parametrize("inner", ["sam", "asam", "crsam"])
def test_fd_hypergradient_matches_exact(inner):
    """Bounds (float32, MLP 5-7-3, batches of 16): central fd (fd_step 1e-2) within 1e-3 relative of
    the exact forward-over-reverse hypergradient (measured 5e-5 to 1e-4); one-sided fd (fd_step 1e-3)
    within 1e-2 (measured 0.2 %); forward mode through the whole step ("exact_total") within 1e-5."""
    params, train, val = mlp_params(), make_batch(1, n=16), make_batch(2, n=16)
    base = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.5, momentum=0.9))
    hg = {mode: hypergrad(params, train, val, base_optimizer=base, inner=inner, hypergradient=mode)
          for mode in ("exact", "exact_total", "fd", "fd_forward", "diag")}
    exact = hg["exact"]
    assert abs(exact) > 1e-6
    rel = {k: abs(v - exact) / abs(exact) for k, v in hg.items()}
    assert rel["exact_total"] < 1e-5, rel
    assert rel["fd"] < 1e-3, rel
    assert rel["fd_forward"] < 1e-2, rel
    assert np.isfinite(hg["diag"])  # a cheap hypothesis: no accuracy claim


def test_exact_jacobian_through_adam_base_matches_forward_mode():
    """With Adam as base optimizer the Jacobian of its update (ν̂ included) enters the chain rule;
    jvp of the base update ("exact") equals forward mode through the whole step ("exact_total")."""
    params, train, val = mlp_params(), make_batch(1, n=16), make_batch(2, n=16)
    kw = dict(base_optimizer=optax.adam(1e-2), inner="sam", state_steps=3)
    exact = hypergrad(params, train, val, hypergradient="exact", **kw)
    total = hypergrad(params, train, val, hypergradient="exact_total", **kw)
    fd = hypergrad(params, train, val, hypergradient="fd", **kw)
    assert abs(exact) > 0
    np.testing.assert_allclose(total, exact, rtol=1e-4)
    np.testing.assert_allclose(fd, exact, rtol=1e-2)


# ---- (b) one full update against an independent reference ---------------------------------------


def reference_steps(params, train, val, *, inner, rho0, lr, mu, wd, lr_a, n_steps, eta=0.01):
    """LETS-SAM / LETS-ASAM with base = chain(add_decayed_weights(wd), sgd(lr, momentum=mu)) and
    radius optimizer Adam(lr_a), in NumPy; gradients and HVPs from the test's own jax.grad/jax.jvp."""
    w = np_tree(params)
    alpha = float(np.log(np.float32(rho0)))
    mom = tmap(np.zeros_like, w)
    m_a = v_a = 0.0
    out = []
    for t in range(1, n_steps + 1):
        rho = float(np.exp(np.float32(alpha)))
        g = np_tree(grad_fn(tmap(jnp.asarray, w), train))
        if inner == "sam":
            v = tmap(lambda x: x / (np_norm(g) + 1e-12), g)
        else:  # ASAM: T = |w| + η on kernels, 1 on biases
            tt = {k: {"kernel": np.abs(l["kernel"]) + eta, "bias": np.ones_like(l["bias"])} for k, l in w.items()}
            tg = tmap(lambda a, b: a * b, tt, g)
            v = tmap(lambda a, b: a * b / (np_norm(tg) + 1e-12), tt, tg)
        w_pert = tmap(lambda p, x: p + rho * x, w, v)
        d = np_tree(grad_fn(tmap(lambda x: jnp.asarray(x, jnp.float32), w_pert), train))
        mom = tmap(lambda m, dd, p: mu * m + dd + wd * p, mom, d, w)
        u = tmap(lambda m: -lr * m, mom)
        w1 = tmap(lambda p, x: p + x, w, u)
        hv = hvp(w_pert, train, v)  # dd/dρ = H_B(w + e) v
        du = tmap(lambda x: -lr * x, hv)  # J_u = −γ for SGD with momentum and coupled decay
        w1_j = tmap(lambda x: jnp.asarray(x, jnp.float32), w1)
        lv, lb = float(loss_jit(w1_j, val)), float(loss_jit(w1_j, train))
        q = tmap(lambda a, b: a - b, np_tree(grad_fn(w1_j, val)), np_tree(grad_fn(w1_j, train)))
        gap = lv - lb
        dot = sum(float(np.sum(a * b)) for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(du)))
        h = rho * gap * dot  # dF/dα = ρ dF/dρ
        m_a = 0.9 * m_a + 0.1 * h
        v_a = 0.999 * v_a + 0.001 * h * h
        alpha = alpha - lr_a * (m_a / (1 - 0.9**t)) / (np.sqrt(v_a / (1 - 0.999**t)) + 1e-8)
        out.append(dict(updates=u, alpha=alpha, gap=gap, hypergrad=h, rho=rho, probes=[lv, lb]))
        w = w1
    return out


@pytest.mark.parametrize("inner", ["sam", "asam"])
@pytest.mark.parametrize("mode", ["exact", "fd"])
def test_two_updates_match_reference(inner, mode):
    """Parameter updates AND the new α over two steps (momentum and weight decay carry over)."""
    params, train, val = mlp_params(), make_batch(1, n=16), make_batch(2, n=16)
    hp = dict(rho0=0.1 if inner == "sam" else 0.5, lr=0.5, mu=0.9, wd=1e-3, lr_a=0.05)
    ref = reference_steps(params, train, val, inner=inner, n_steps=2, **hp)
    base = optax.chain(optax.add_decayed_weights(hp["wd"]), optax.sgd(hp["lr"], momentum=hp["mu"]))
    tx = lets(mlp_loss, base, inner=inner, rho=hp["rho0"], radius_optimizer=optax.adam(hp["lr_a"]),
              hypergradient=mode)
    step, state, p = eager_update(tx, train, val), tx.init(params), params
    tol = dict(rtol=1e-5, atol=1e-6) if mode == "exact" else dict(rtol=2e-3, atol=1e-6)
    alpha_tol = 1e-6 if mode == "exact" else 5e-5  # Adam's 2nd step: ~lr × (fd's 1e-4 relative error)
    for r in ref:
        updates, state = step(p, state)
        info = flatjax.step_info(state)
        assert_tree_close(updates, r["updates"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(info.diagnostics["rho"], r["rho"], rtol=1e-6)
        np.testing.assert_allclose(info.diagnostics["gap"], r["gap"], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(info.diagnostics["upper_loss"], 0.5 * r["gap"] ** 2, rtol=2e-4, atol=1e-12)
        np.testing.assert_allclose(info.diagnostics["hypergrad"], r["hypergrad"], **tol)
        np.testing.assert_allclose(info.probe_losses[2:], r["probes"], rtol=1e-5)
        np.testing.assert_allclose(state.log_rho, r["alpha"], rtol=0, atol=alpha_tol)
        p = optax.apply_updates(p, updates)
    assert abs(float(state.log_rho) - np.log(hp["rho0"])) > 0.01  # α did move


# ---- (c)/(g) radius learning rate 0 = the fixed-radius method ------------------------------------

FIXED = {
    "sam": lambda rho: flatjax.sam(mlp_loss, rho),
    "asam": lambda rho: flatjax.asam(mlp_loss, rho, 0.01),
    "crsam": lambda rho: flatjax.crsam(mlp_loss, rho, 0.1, 0.01, form="code"),
}


@pytest.mark.parametrize("inner", sorted(FIXED))
def test_radius_lr_zero_equals_fixed_radius_method(inner):
    """Same updates as chain(method(ρ = exp(α₀)), base) over 3 steps (same base state evolution:
    momentum and decay), and α stays α₀. Bit for bit for SAM/ASAM (un-jitted here; bit equality under jit
    was checked too when this was written, and the toy and NaN tests run the jitted step). CR-SAM to
    float32 round-off: its sequential step forms (1 + α + β)∇L+ − 2αg in a compiled loop (stored before
    the third pass), whose fused arithmetic rounds differently from LETS's op-by-op sum."""
    tol = {"rtol": 1e-6, "atol": 1e-8} if inner == "crsam" else {"rtol": 0, "atol": 0}
    params, train, val = mlp_params(), make_batch(1, n=16), make_batch(2, n=16)
    base = lambda: optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.3, momentum=0.9))  # noqa: E731
    tx = lets(mlp_loss, base(), inner=inner, radius_optimizer=optax.adam(0.0))
    state = tx.init(params)
    alpha0 = np.asarray(state.log_rho)
    ref = optax.chain(FIXED[inner](float(jnp.exp(state.log_rho))), base())
    ref_state = ref.init(params)
    step = eager_update(tx, train, val)
    ref_step = lambda p, s: ref.update(None, s, p, batch=train)  # noqa: E731
    p = q = params
    for _ in range(3):
        updates, state = step(p, state)
        ref_updates, ref_state = ref_step(q, ref_state)
        for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol)
        p, q = optax.apply_updates(p, updates), optax.apply_updates(q, ref_updates)
    np.testing.assert_array_equal(np.asarray(state.log_rho), alpha0)
    assert_tree_close(state.base_state, ref_state[1], **tol)


# ---- (d) the direction α moves on a toy problem -------------------------------------------------


def toy_loss(params, batch):
    return jnp.mean(0.5 * batch["curv"] * params["w"][0] ** 2 + batch["offset"])


@pytest.mark.parametrize("rho0", [0.1, 3.0])
def test_alpha_moves_towards_the_radius_that_closes_the_gap(rho0):
    """Toy problem (1 parameter w; the loss of an example is ½ c w² + o):

    training examples c = 1, o = 0 → L_B(w) = ½ w²;  validation examples c = ½, o = k = 0.01 →
    L_V(w) = ¼ w² + k, so the gap is L_V − L_B = k − ¼ w² (q = ½). LETS-SAM with plain SGD (γ = ½):
    w' = w − γ(w + ρ sign w), which settles (contraction ½ per step) into the period-2 orbit
    w = ±ρ/3. So gap(w') = k − ρ²/36 is DECREASING in ρ while ρ < ρ* = 6√k = 0.6, where the gap is 0,
    and the squared gap is minimal exactly at ρ*. Expected: from ρ₀ = 0.1 α increases (a larger radius
    reduces the gap) and ρ reaches ρ* = 0.6; from ρ₀ = 3 α decreases towards ρ*. Radius optimizer:
    Adam(0.02), 300 jitted steps.
    """
    train = {"curv": jnp.ones(4), "offset": jnp.zeros(4)}
    val = {"curv": jnp.full(4, 0.5), "offset": jnp.full(4, 0.01)}
    tx = lets(toy_loss, optax.sgd(0.5), rho=rho0, radius_optimizer=optax.adam(0.02))
    params = {"w": jnp.array([1.0])}
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        updates, s = tx.update(None, s, p, batch=train, val_batch=val)
        return optax.apply_updates(p, updates), s

    rhos = []
    for _ in range(300):
        params, state = step(params, state)
        rhos.append(float(jnp.exp(state.log_rho)))
    assert step._cache_size() == 1
    if rho0 < 0.6:
        assert rhos[-1] > rhos[0] and abs(rhos[-1] - 0.6) < 0.03, rhos[::30]
        assert abs(abs(float(params["w"][0])) - 0.2) < 0.01  # the orbit ±ρ*/3
    else:
        assert rhos[-1] < 0.5 * rho0 and rhos[-1] > 0.6, rhos[::30]  # monotone approach from above
    assert int(state.radius_skips) == 0


# ---- (e) non-finite validation losses ----------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_validation_batch_skips_the_radius_update(bad):
    """The radius update is SKIPPED (α and Adam state kept, radius_skips counts it); the lower-level
    step does not read the validation batch and is applied unchanged (equal to SAM's)."""
    params, train = mlp_params(), make_batch(1, n=16)
    val = make_batch(2, n=16)
    bad_val = dict(val, x=val["x"].at[0, 0].set(bad))
    base = optax.sgd(0.3, momentum=0.9)
    tx = lets(mlp_loss, base, radius_optimizer=optax.adam(0.1))
    state0 = tx.init(params)
    step = jax.jit(lambda p, s, v: tx.update(None, s, p, batch=train, val_batch=v))
    updates, state = step(params, state0, bad_val)
    assert np.isfinite(float(state.log_rho))
    np.testing.assert_array_equal(np.asarray(state.log_rho), np.asarray(state0.log_rho))
    assert_tree_close(state.radius_state, state0.radius_state, rtol=0, atol=0)
    assert int(state.radius_skips) == 1
    info = flatjax.step_info(state)
    assert float(info.diagnostics["radius_skips"]) == 1.0
    assert not np.isfinite(float(info.diagnostics["hypergrad"]))
    sam = optax.chain(flatjax.sam(mlp_loss, float(jnp.exp(state0.log_rho))), optax.sgd(0.3, momentum=0.9))
    ref_updates, _ = sam.update(None, sam.init(params), params, batch=train)
    assert_tree_close(updates, ref_updates, rtol=1e-6, atol=1e-7)
    # a good validation batch afterwards moves α again (same compiled step)
    _, state = step(optax.apply_updates(params, updates), state, val)
    assert float(state.log_rho) != float(state0.log_rho) and int(state.radius_skips) == 1
    assert step._cache_size() == 1


# ---- (f) construction and call checks ----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(rho=0.0), "rho"),
        (dict(rho=-0.1), "rho"),
        (dict(rho=float("nan")), "rho"),
        (dict(rho=float("inf")), "rho"),
        (dict(rho=lambda t: 0.1), "rho"),
        (dict(fd_step=0.0), "fd_step"),
        (dict(fd_step=-1e-3), "fd_step"),
        (dict(eta=-0.01), "eta"),
        (dict(crsam_alpha=-1.0), "crsam_alpha"),
        (dict(crsam_beta=-1.0), "crsam_beta"),
        (dict(inner="gsam"), "inner"),
        (dict(hypergradient="hessian"), "hypergradient"),
        (dict(radius_optimizer=0.1), "radius_optimizer"),
        (dict(base_optimizer="sgd"), "base_optimizer"),
        (dict(loss_fn=3), "loss_fn"),
        (dict(has_aux=True), "aux_init"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, name):
    args = dict(loss_fn=mlp_loss, base_optimizer=optax.sgd(0.1))
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        lets(**args)


def test_radius_optimizer_helper_checks_and_defaults():
    with pytest.raises(ValueError, match="decay_rate"):
        lets_radius_optimizer(decay_rate=1.5)
    with pytest.raises(ValueError, match="transition_steps"):
        lets_radius_optimizer(transition_steps=0)
    tx = lets(mlp_loss, optax.sgd(0.1))  # default: Adam(1e-4, exponential decay)
    params, train, val = mlp_params(), make_batch(1), make_batch(2)
    state = tx.init(params)
    assert isinstance(state, LetsState)
    np.testing.assert_allclose(np.exp(float(state.log_rho)), 0.05, rtol=1e-6)
    _, new = tx.update(None, state, params, batch=train, val_batch=val)
    # Adam's first step moves α by about its learning rate
    np.testing.assert_allclose(abs(float(new.log_rho) - float(state.log_rho)), 1e-4, rtol=1e-2)


def test_update_needs_val_batch():
    tx = lets(mlp_loss, optax.sgd(0.1))
    params = mlp_params()
    with pytest.raises(ValueError, match="val_batch"):
        tx.update(None, tx.init(params), params, batch=make_batch())
    with pytest.raises(ValueError, match="batch"):
        tx.update(None, tx.init(params), params, val_batch=make_batch())


# ---- aux, clean_grad and data parallelism --------------------------------------------------------


def test_aux_from_clean_pass_and_clean_grad_reuse():
    params, train, val = mlp_params(), make_batch(1, n=16), make_batch(2, n=16)

    def loss_aux(p, b):
        loss = mlp_loss(p, b)
        return loss, {"loss_copy": loss}

    tx = lets(loss_aux, optax.sgd(0.3), has_aux=True, aux_init={"loss_copy": jnp.zeros(())})
    state = tx.init(params)
    updates, new = tx.update(None, state, params, batch=train, val_batch=val)
    info = flatjax.step_info(new)
    np.testing.assert_allclose(info.aux["loss_copy"], mlp_loss(params, train), rtol=1e-6)
    np.testing.assert_allclose(info.loss, mlp_loss(params, train), rtol=1e-6)
    assert info.probe_losses.shape == (4,)
    g = jax.grad(mlp_loss)(params, train)
    reused, new2 = tx.update(None, state, params, batch=train, val_batch=val, clean_grad=g)
    assert_tree_close(reused, updates, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(new2.log_rho, new.log_rho, rtol=1e-6)
    assert np.isnan(float(flatjax.step_info(new2).loss))


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (XLA_FLAGS)")
@pytest.mark.parametrize("mode", ["fd", "exact"])
def test_data_parallel_equals_one_device(mode):
    """Inside the user's shard_map over 2 devices, losses, gradients and the hypergradient are
    averaged: the update and the new α equal the single-device step on the whole batch."""
    params, train, val = mlp_params(), make_batch(1, n=16), make_batch(2, n=16)
    make = lambda **kw: lets(mlp_loss, optax.sgd(0.3, momentum=0.9), hypergradient=mode,  # noqa: E731
                             radius_optimizer=optax.sgd(10.0), **kw)
    ref_tx = make()
    ref_updates, ref_state = ref_tx.update(None, ref_tx.init(params), params, batch=train, val_batch=val)
    tx = make(axis_name="data")
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])

    def local(p, s, b, v):
        updates, s = tx.update(None, s, p, batch=b, val_batch=v)
        return updates, s.log_rho

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=P()))
    updates, log_rho = fn(params, tx.init(params), train, val)
    assert_tree_close(updates, ref_updates, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(log_rho, ref_state.log_rho, rtol=1e-4, atol=1e-6)
    assert abs(float(log_rho) - float(np.log(np.float32(0.05)))) > 1e-5  # α moved


@pytest.mark.parametrize("mode", ["fd", "exact"])
def test_bf16_params_keep_their_dtype(mode):
    params = tmap(lambda x: x.astype(jnp.bfloat16), mlp_params())
    tx = lets(mlp_loss, optax.sgd(0.1, momentum=0.9), hypergradient=mode, radius_optimizer=optax.adam(0.01))
    updates, state = tx.update(None, tx.init(params), params, batch=make_batch(1, n=16), val_batch=make_batch(2, n=16))
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert state.log_rho.dtype == jnp.float32 and np.isfinite(float(state.log_rho))


def test_radius_every_k_updates_the_radius_on_every_kth_step_only():
    params, base = mlp_params(), optax.sgd(0.1)
    kw = {"inner": "sam", "rho": 0.1, "radius_optimizer": optax.sgd(0.5)}
    every3 = flatjax.estimators.lets(mlp_loss, base, radius_every=3, **kw)
    every1 = flatjax.estimators.lets(mlp_loss, base, **kw)
    s3, s1, opt = every3.init(params), every1.init(params), base.init(params)
    b0, b1 = make_batch(seed=1), make_batch(seed=2)
    _, d3, s3, info3 = every3.value_and_grad(params, s3, b0, val_batch=b1, base_state=opt)
    _, d1, s1, info1 = every1.value_and_grad(params, s1, b0, val_batch=b1, base_state=opt)
    assert_tree_close(d3, d1)  # step 0: K = 1's update
    np.testing.assert_allclose(s3.log_rho, s1.log_rho)
    alpha = float(s3.log_rho)
    assert alpha != pytest.approx(float(np.log(0.1)))
    sam = flatjax.estimators.sam(mlp_loss, rho=float(np.exp(alpha)))
    for _ in range(2):  # steps 1 and 2: SAM at the current radius, no upper-level passes
        _, d, s3, info = every3.value_and_grad(params, s3, b0, val_batch=b1, base_state=opt)
        assert float(s3.log_rho) == alpha and np.isnan(float(info.diagnostics["hypergrad"]))
        assert_tree_close(d, sam.value_and_grad(params, sam.init(params), b0)[1], rtol=1e-5)
    _, _, s3, info = every3.value_and_grad(params, s3, b0, val_batch=b1, base_state=opt)  # step 3
    assert float(s3.log_rho) != alpha and np.isfinite(float(info.diagnostics["hypergrad"]))
    with pytest.raises(ValueError, match="radius_every must be a positive integer"):
        flatjax.estimators.lets(mlp_loss, base, radius_every=0)


def test_state_can_be_donated_to_a_jitted_step():
    """Every leaf of the state is its own buffer (a shared zero made donation fail)."""
    tx = flatjax.skip_nonfinite(flatjax.lets(mlp_loss, optax.sgd(0.1, momentum=0.9)))
    params, state = mlp_params(), None
    state = tx.init(params)

    def step(p, s, b, v):
        u, s = tx.update(None, s, p, batch=b, val_batch=v)
        return optax.apply_updates(p, u), s

    step = jax.jit(step, donate_argnums=(0, 1))
    for i in range(3):
        params, state = step(params, state, make_batch(seed=i), make_batch(seed=10 + i))
    assert int(state.inner_state.flat.count) == 3
