"""Optax protocol for every method, after Optax's own contrib test matrix.

Extra args pass through ``optax.chain``; hyper-parameters under ``inject_hyperparams`` and as schedules
take effect every step; no recompilation; donation; bf16; ``MultiSteps``; ``apply_if_finite``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flatjax
from flat_toys import assert_tree_close, make_batch, mlp_loss, mlp_params


def _bias_leaves(params):
    """SAM-ON's normalization mask on the toy MLP, which has no normalization layer: its biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "bias", params)


# method-specific arguments the toy problem needs (the matrix itself comes from flatjax.registry)
EXTRA = {"samon": {"norm_mask": _bias_leaves}}
# every method whose Optax form is chained before a base optimizer (LETS wraps its own: test_lets.py)
METHODS = [name for name, m in flatjax.registry.METHODS.items() if not m.wraps_optimizer]
FACTORIES = {name: (lambda name: lambda **kw: getattr(flatjax, name)(mlp_loss, **EXTRA.get(name, {}), **kw))(name)
             for name in METHODS}
# the hyper-parameter each protocol test varies, with two values that must give different updates
HYPER = {name: flatjax.registry.METHODS[name].hyperparameters[0] for name in METHODS}
VALUES = {"rho": (0.05, 0.3), "sigma": (0.01, 0.2), "lam": (0.2, 0.9), "alpha": (0.1, 2.0)}
SEED = {name: {"seed": 5} for name in METHODS if flatjax.registry.METHODS[name].seeded}


def _needs_extra():
    """A transformation that requires its own extra argument ``scale_by``."""

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None, *, scale_by, **extra):
        return jax.tree.map(lambda u: u * scale_by, updates), state

    return optax.GradientTransformationExtraArgs(init, update)


@pytest.mark.parametrize("name", METHODS)
def test_unknown_extra_args_pass_through_chain(name):
    params, batch = mlp_params(), make_batch()
    plain = optax.chain(FACTORIES[name](), optax.sgd(0.1))
    scaled = optax.chain(FACTORIES[name](), _needs_extra(), optax.sgd(0.1))
    u1, _ = plain.update(None, plain.init(params), params, batch=batch, unrelated_flag=True)
    u2, _ = scaled.update(None, scaled.init(params), params, batch=batch, scale_by=3.0, unrelated_flag=True)
    assert_tree_close(u2, jax.tree.map(lambda u: 3.0 * u, u1), rtol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_inject_hyperparams_value_takes_effect_each_step(name):
    params, batch, hp = mlp_params(), make_batch(), HYPER[name]
    a, b = VALUES[hp]
    factory = getattr(flatjax, name)
    tx = flatjax.inject_hyperparams(factory)(mlp_loss, **EXTRA.get(name, {}), **{hp: a})
    state = tx.init(params)
    step = jax.jit(lambda s, hv: tx.update(None, s._replace(hyperparams={**s.hyperparams, hp: hv}), params, batch=batch))
    u_a, state = step(state, jnp.float32(a))
    u_b, state = step(state, jnp.float32(b))
    # references: plain factories at the same step index (count 0 then 1: same noise stream)
    ref = FACTORIES[name](**{hp: a})
    r_state = ref.init(params)
    r_a, r_state = ref.update(None, r_state, params, batch=batch)
    ref_b = FACTORIES[name](**{hp: b})
    r_b, _ = ref_b.update(None, r_state, params, batch=batch)
    assert_tree_close(u_a, r_a, rtol=1e-5)
    assert_tree_close(u_b, r_b, rtol=1e-5)
    assert not np.allclose(jax.tree.leaves(u_a)[0], jax.tree.leaves(u_b)[0])
    assert float(flatjax.step_info(state).diagnostics[hp]) == pytest.approx(b)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("wrap", ["schedule", "inject_schedule"])
def test_schedules_take_effect_every_step(name, wrap):
    params, batch, hp = mlp_params(), make_batch(), HYPER[name]
    a, b = VALUES[hp]
    schedule = lambda count: jnp.where(count % 2 == 0, a, b)  # noqa: E731 — alternates a, b, a, ...
    if wrap == "schedule":
        tx = FACTORIES[name](**{hp: schedule})
    else:
        factory = getattr(flatjax, name)
        tx = flatjax.inject_hyperparams(factory)(mlp_loss, **EXTRA.get(name, {}), **{hp: schedule})
    state = tx.init(params)
    step = jax.jit(lambda s: tx.update(None, s, params, batch=batch))
    seen = []
    for _ in range(3):
        _, state = step(state)
        seen.append(float(flatjax.step_info(state).diagnostics[hp]))
    np.testing.assert_allclose(seen, [a, b, a], rtol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_no_recompilation_and_donation(name):
    params, batch = mlp_params(), make_batch()
    tx = optax.chain(FACTORIES[name](), optax.sgd(0.1, momentum=0.9))
    state = tx.init(params)

    def train_step(params, state, batch):
        updates, state = tx.update(None, state, params, batch=batch)
        return optax.apply_updates(params, updates), state

    step = jax.jit(train_step, donate_argnums=(0, 1))
    for i in range(3):
        params, state = step(params, state, make_batch(seed=10 + i))
    assert step._cache_size() == 1
    assert int(state[0].count) == 3


@pytest.mark.parametrize("name", METHODS)
def test_bf16_params_keep_dtype(name):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), mlp_params())
    batch = make_batch()
    tx = optax.chain(FACTORIES[name](), optax.sgd(0.1))
    state = tx.init(params)
    updates, state = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch))(params, state)
    new = optax.apply_updates(params, updates)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(updates))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new))


@pytest.mark.parametrize("name", METHODS)
def test_multisteps_around_base_optimizer_accumulates_directions(name):
    """Recommended accumulation: the method sees every micro-batch, MultiSteps averages its directions."""
    params, b1, b2 = mlp_params(), make_batch(seed=1), make_batch(seed=2)
    tx = optax.chain(FACTORIES[name](**SEED.get(name, {})),
                     optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2))
    state = tx.init(params)
    u1, state = tx.update(None, state, params, batch=b1)
    u2, state = tx.update(None, state, params, batch=b2)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u1))  # accumulating
    ref = FACTORIES[name](**SEED.get(name, {}))
    r_state = ref.init(params)
    d1, r_state = ref.update(None, r_state, params, batch=b1)
    d2, _ = ref.update(None, r_state, params, batch=b2)
    assert_tree_close(u2, jax.tree.map(lambda a, b: -0.1 * (a + b) / 2, d1, d2), rtol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_multisteps_around_whole_chain_raises(name):
    """MultiSteps around the whole chain would hand the method accumulated gradients and run it on the
    last micro-batch only (silently): it raises and names the fix."""
    params, batch = mlp_params(), make_batch()
    tx = optax.MultiSteps(optax.chain(FACTORIES[name](), optax.sgd(0.1)), every_k_schedule=2)
    state = tx.init(params)
    grads = jax.grad(mlp_loss)(params, batch)
    with pytest.raises(ValueError, match="MultiSteps"):
        jax.jit(lambda p, s, g: tx.update(g, s, p, batch=batch, clean_grad=g))(params, state, grads)
    with pytest.raises(ValueError, match="MultiSteps"):
        tx.update(grads, state, params, batch=batch)


@pytest.mark.parametrize("name", METHODS)
def test_apply_if_finite_with_clean_gradient_skips_nan_batches(name):
    """optax.apply_if_finite checks the gradient handed in: hand in the clean gradient (also reused)."""
    params, batch = mlp_params(), make_batch()
    bad = {"x": batch["x"].at[0, 0].set(jnp.nan), "y": batch["y"]}
    tx = optax.apply_if_finite(optax.chain(FACTORIES[name](), optax.sgd(0.1, momentum=0.9)), 3)
    state = tx.init(params)

    @jax.jit
    def step(p, s, b):
        grads = jax.grad(mlp_loss)(p, b)
        return tx.update(grads, s, p, batch=b, clean_grad=grads)

    _, good_state = step(params, state, batch)
    updates, state = step(params, good_state, bad)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(updates))
    assert int(state.notfinite_count) == 1
    assert_tree_close(state.inner_state, good_state.inner_state)


@pytest.mark.parametrize("name", METHODS)
def test_skip_nonfinite_guards_nan_inside_the_method(name):
    """flatjax.skip_nonfinite checks the produced updates: params, momentum and the method's own state
    stay untouched; only the method's step count advances (fresh noise next step)."""
    params, batch = mlp_params(), make_batch()
    bad = {"x": batch["x"].at[0, 0].set(jnp.inf), "y": batch["y"]}
    tx = flatjax.skip_nonfinite(optax.chain(FACTORIES[name](), optax.sgd(0.1, momentum=0.9)))
    state = tx.init(params)
    step = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))
    _, good_state = step(params, state, batch)
    updates, state = step(params, good_state, bad)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(updates))
    assert int(state.notfinite_count) == 1 and int(state.total_notfinite) == 1
    assert_tree_close(state.inner_state[1], good_state.inner_state[1])  # momentum
    assert_tree_close(state.inner_state[0].method, good_state.inner_state[0].method)
    np.testing.assert_array_equal(state.inner_state[0].key, good_state.inner_state[0].key)
    assert int(state.inner_state[0].count) == 2
    # the skipped step's own measurements are reported (not the previous step's): D2
    est, flat = getattr(flatjax.estimators, name)(mlp_loss, **EXTRA.get(name, {})), good_state.inner_state[0]
    _, _, _, info = est.value_and_grad(params, flatjax.estimators.EstimatorState(flat.count, flat.key, flat.method), bad)
    np.testing.assert_allclose(flatjax.step_info(state).probe_losses, info.probe_losses, rtol=1e-6)
    updates, state = step(params, state, batch)  # recovers
    assert int(state.notfinite_count) == 0 and bool(state.last_finite)
    assert int(state.inner_state[0].count) == 3


def test_d1_skipped_noise_step_draws_fresh_noise():
    """D1: a NaN caused by one noise draw must not repeat for ever under skip_nonfinite."""
    params = mlp_params()
    w00 = params["dense0"]["kernel"][0, 0]

    def loss(p, b):  # NaN (value and gradient) whenever w[0,0] is perturbed upward
        return mlp_loss(p, b) + 1e-3 * jnp.sqrt(1e-9 - (p["dense0"]["kernel"][0, 0] - w00))

    tx = flatjax.skip_nonfinite(optax.chain(flatjax.rwp(loss, sigma=0.01, seed=1), optax.sgd(0.05)))
    state, p = tx.init(params), params
    step = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))
    applied = 0
    for i in range(20):
        u, state = step(p, state, make_batch(seed=i))
        applied += int(state.last_finite)
        p = optax.apply_updates(p, u)
    assert int(state.inner_state[0].count) == 20  # the method's count advanced on every step
    assert 0 < applied < 20 and int(state.total_notfinite) == 20 - applied
