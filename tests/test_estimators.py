"""The estimator form: identical to the Optax form for every method, plain SGD as its trivial member,
the guardrails against silent misuse, and float64 arithmetic under ``jax_enable_x64``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.sharding import PartitionSpec as P

import flatjax
from flat_toys import assert_tree_close, make_batch, mlp_loss, mlp_params

# name -> (estimator factory, Optax factory, keyword arguments)
FORMS = {
    "sam": (flatjax.estimators.sam, flatjax.sam, {"rho": 0.1}),
    "asam": (flatjax.estimators.asam, flatjax.asam, {"rho": 0.5}),
    "rwp": (flatjax.estimators.rwp, flatjax.rwp, {"sigma": 0.05, "seed": 3}),
    "arwp": (flatjax.estimators.arwp, flatjax.arwp, {"sigma": 0.05, "seed": 3}),
    "mrwp": (flatjax.estimators.mrwp, flatjax.mrwp, {"sigma": 0.05, "seed": 3}),
    "marwp": (flatjax.estimators.marwp, flatjax.marwp, {"sigma": 0.05, "seed": 3}),
    "wpsgd": (flatjax.estimators.wpsgd, flatjax.wpsgd, {"sigma": 0.05, "k": 2, "seed": 3}),
    "nso": (flatjax.estimators.nso, flatjax.nso, {"sigma": 0.05, "lam": 0.2, "seed": 3}),
    "crsam": (flatjax.estimators.crsam, flatjax.crsam, {"rho": 0.1}),
    "crsam-log": (flatjax.estimators.crsam, flatjax.crsam, {"rho": 0.1, "form": "log"}),
    "gsam": (flatjax.estimators.gsam, flatjax.gsam, {"rho": 0.1, "alpha": 0.3}),
    "samon": (flatjax.estimators.samon, flatjax.samon,
              {"rho": 0.2, "norm_mask": lambda p: jax.tree_util.tree_map_with_path(lambda k, _: k[-1].key == "bias", p)}),
}


def _batches(step):
    return make_batch(seed=10 + step), make_batch(seed=100 + step)


@pytest.mark.parametrize("name", sorted(FORMS))
def test_estimator_and_optax_forms_give_identical_updates(name):
    est_factory, tx_factory, kw = FORMS[name]
    params, base = mlp_params(), optax.sgd(0.1, momentum=0.9)
    est = est_factory(mlp_loss, **kw)
    tx = optax.chain(tx_factory(mlp_loss, **kw), base)

    @jax.jit
    def est_step(params, est_state, opt_state, b0, b1):
        loss, grads, est_state, info = est.value_and_grad(params, est_state, b0, perturbed_batch=b1)
        updates, opt_state = base.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), est_state, opt_state, loss, info

    @jax.jit
    def tx_step(params, state, b0, b1):
        updates, state = tx.update(None, state, params, batch=b0, perturbed_batch=b1)
        return optax.apply_updates(params, updates), state

    p_est, est_state, opt_state = params, est.init(params), base.init(params)
    p_tx, state = params, tx.init(params)
    for step in range(3):
        b0, b1 = _batches(step)
        p_est, est_state, opt_state, loss, info = est_step(p_est, est_state, opt_state, b0, b1)
        p_tx, state = tx_step(p_tx, state, b0, b1)
        chex.assert_trees_all_equal(p_est, p_tx)
        step_info = flatjax.step_info(state)
        chex.assert_trees_all_equal(info.probe_losses, step_info.probe_losses)
        chex.assert_trees_all_equal(info.diagnostics, step_info.diagnostics)
        np.testing.assert_array_equal(loss, step_info.loss)
    chex.assert_trees_all_equal(est_state.method, state[0].method)
    assert int(est_state.count) == int(state[0].count) == 3


class EagerAndJitTest(chex.TestCase):
    """Every estimator gives the same direction, state and info eagerly and under ``jax.jit``."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*[(name, name) for name in sorted(FORMS)])
    def test_same_result_eagerly_and_jitted(self, name):
        est_factory, _, kw = FORMS[name]
        est = est_factory(mlp_loss, **kw)
        params, (b0, b1) = mlp_params(), _batches(0)
        run = self.variant(lambda p, s, a, b: est.value_and_grad(p, s, a, perturbed_batch=b))
        state = est.init(params)
        for _ in range(2):
            loss, direction, state, info = run(params, state, b0, b1)
        ref_state = est.init(params)
        for _ in range(2):
            ref = jax.jit(lambda p, s: est.value_and_grad(p, s, b0, perturbed_batch=b1))(params, ref_state)
            ref_state = ref[2]
        chex.assert_trees_all_close((loss, direction, state, info), ref, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_equal_shapes_and_dtypes(direction, params)


def test_lets_estimator_and_optax_forms_give_identical_updates():
    base = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))
    kw = {"inner": "sam", "rho": 0.1, "radius_optimizer": optax.sgd(0.5)}
    est = flatjax.estimators.lets(mlp_loss, base, **kw)
    tx = flatjax.lets(mlp_loss, base, **kw)
    params = mlp_params()

    @jax.jit
    def est_step(params, est_state, opt_state, b0, b1):
        loss, grads, est_state, info = est.value_and_grad(params, est_state, b0, val_batch=b1, base_state=opt_state)
        updates, opt_state = base.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), est_state, opt_state, info

    @jax.jit
    def tx_step(params, state, b0, b1):
        updates, state = tx.update(None, state, params, batch=b0, val_batch=b1)
        return optax.apply_updates(params, updates), state

    p_est, est_state, opt_state = params, est.init(params), base.init(params)
    p_tx, state = params, tx.init(params)
    for step in range(3):
        b0, b1 = _batches(step)
        p_est, est_state, opt_state, info = est_step(p_est, est_state, opt_state, b0, b1)
        p_tx, state = tx_step(p_tx, state, b0, b1)
        chex.assert_trees_all_equal(p_est, p_tx)
        chex.assert_trees_all_equal(info.diagnostics, flatjax.step_info(state).diagnostics)
    np.testing.assert_array_equal(est_state.log_rho, state.log_rho)
    assert float(est_state.log_rho) != pytest.approx(float(np.log(0.1)))  # the radius was learned
    chex.assert_trees_all_equal(opt_state, state.base_state)


def test_lets_estimator_rejects_a_base_state_of_another_optimizer():
    est = flatjax.estimators.lets(mlp_loss, optax.sgd(0.1, momentum=0.9))
    params, (b0, b1) = mlp_params(), _batches(0)
    with pytest.raises(ValueError, match="base_state"):
        est.value_and_grad(params, est.init(params), b0, val_batch=b1, base_state=optax.adam(0.1).init(params))
    with pytest.raises(ValueError, match="base_state="):
        est.value_and_grad(params, est.init(params), b0, val_batch=b1)


def test_sgd_estimator_is_value_and_grad():
    est = flatjax.estimators.sgd(mlp_loss)
    params, batch = mlp_params(), make_batch()
    loss, grads, state, info = jax.jit(est.value_and_grad)(params, est.init(params), batch)
    ref_loss, ref_grads = jax.value_and_grad(mlp_loss)(params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert_tree_close(grads, ref_grads, rtol=1e-6)
    assert int(state.count) == 1 and info.probe_losses.shape == (1,)


def test_aux_is_returned_not_stored():
    def loss_with_aux(params, batch):
        return mlp_loss(params, batch), {"mean_x": jnp.mean(batch["x"]), "calls": jnp.int32(1)}

    est = flatjax.estimators.marwp(loss_with_aux, has_aux=True)
    params, b0, b1 = mlp_params(), make_batch(seed=1), make_batch(seed=2)
    (loss, aux), _, state, info = est.value_and_grad(params, est.init(params), b0, perturbed_batch=b1)
    np.testing.assert_allclose(aux["mean_x"], jnp.mean(b0["x"]), rtol=1e-6)  # the clean pass, on B0
    np.testing.assert_allclose(loss, mlp_loss(params, b0), rtol=1e-6)
    assert set(state._fields) == {"count", "key", "method"}


# ---- guardrails --------------------------------------------------------------------------------------


def test_member_chained_before_the_method_raises():
    params, batch = mlp_params(), make_batch()
    grads = jax.grad(mlp_loss)(params, batch)
    tx = optax.chain(optax.clip_by_global_norm(1.0), flatjax.sam(mlp_loss), optax.sgd(0.1))
    with pytest.raises(ValueError, match="chained BEFORE"):
        tx.update(grads, tx.init(params), params, batch=batch, clean_grad=grads)
    with pytest.raises(ValueError, match="chained BEFORE"):
        tx.update(grads, tx.init(params), params, batch=batch)
    # the fix the message names: clipping after the method clips the method's direction
    fixed = optax.chain(flatjax.sam(mlp_loss, rho=0.5), optax.clip_by_global_norm(1e-3), optax.sgd(1.0))
    updates, _ = fixed.update(None, fixed.init(params), params, batch=batch)
    assert float(optax.tree.norm(updates)) == pytest.approx(1e-3, rel=1e-4)


def test_clean_grad_handed_as_updates_is_reused():
    params, batch = mlp_params(), make_batch()
    calls = []

    def counting_loss(p, b):
        calls.append(1)  # traced once per pass
        return mlp_loss(p, b)

    tx = optax.chain(flatjax.sam(counting_loss), optax.sgd(0.1))
    grads = jax.grad(mlp_loss)(params, batch)
    reused, _ = tx.update(grads, tx.init(params), params, batch=batch, clean_grad=grads)
    assert len(calls) == 1
    full, _ = tx.update(None, tx.init(params), params, batch=batch)
    assert len(calls) == 3
    assert_tree_close(reused, full, rtol=1e-5)


def _data_mesh():
    return jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])


def test_shard_map_without_axis_name_raises_and_with_it_matches_one_device():
    params, batch = mlp_params(), make_batch(n=8)
    mesh = _data_mesh()

    def run(est):
        def body(p, b):
            _, grads, _, _ = est.value_and_grad(p, est.init(p), b)
            return grads
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))(params, batch)

    with pytest.raises(ValueError, match="axis_name='data'"):
        run(flatjax.estimators.sam(mlp_loss))
    one = flatjax.estimators.sam(mlp_loss)
    one_device = one.value_and_grad(params, one.init(params), batch)[1]
    assert_tree_close(run(flatjax.estimators.sam(mlp_loss, axis_name="data")), one_device, rtol=2e-5)


def test_pmap_without_axis_name_raises():
    params, batch = mlp_params(), make_batch(n=8)
    est = flatjax.estimators.rwp(mlp_loss)
    split = jax.tree.map(lambda x: x.reshape((2, 4) + x.shape[1:]), batch)

    def step(p, b):
        return est.value_and_grad(p, est.init(p), b)[1]

    with pytest.raises(ValueError, match="pmap"):
        jax.pmap(step, axis_name="data", in_axes=(None, 0), devices=jax.devices()[:2])(params, split)
    est_dp = flatjax.estimators.rwp(mlp_loss, axis_name="data")
    out = jax.pmap(lambda p, b: est_dp.value_and_grad(p, est_dp.init(p), b)[1], axis_name="data",
                   in_axes=(None, 0), devices=jax.devices()[:2])(params, split)
    one = est.value_and_grad(params, est.init(params), batch)[1]
    assert_tree_close(jax.tree.map(lambda x: x[0], out), one, rtol=2e-5)


def test_averaged_clean_grad_is_reused_under_axis_name():
    params, batch = mlp_params(), make_batch(n=8)
    mesh, calls = _data_mesh(), []

    def counting_loss(p, b):
        calls.append(1)
        return mlp_loss(p, b)

    est = flatjax.estimators.sam(counting_loss, axis_name="data")

    def body(p, b):
        g = jax.lax.pmean(jax.grad(mlp_loss)(flatjax.core.to_varying(p, "data"), b), "data")
        return est.value_and_grad(p, est.init(p), b, clean_grad=g)[1]

    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))(params, batch)
    assert len(calls) == 1  # the perturbed pass only
    ref = flatjax.estimators.sam(mlp_loss).value_and_grad(params, est.init(params), batch)[1]
    assert_tree_close(out, ref, rtol=2e-5)


def test_clean_grad_that_cannot_stand_for_the_rule_raises():
    params, batch = mlp_params(), make_batch(n=8)
    grads = jax.grad(mlp_loss)(params, batch)
    est = flatjax.estimators.sam(mlp_loss, m=4)
    with pytest.raises(ValueError, match="m-sharpness"):
        est.value_and_grad(params, est.init(params), batch, clean_grad=grads)
    with pytest.raises(ValueError, match="structure and shapes"):
        flatjax.estimators.sam(mlp_loss).value_and_grad(params, est.init(params), batch, clean_grad={"w": 1.0})


def test_float_aux_into_integer_aux_init_raises():
    def loss_with_aux(params, batch):
        return mlp_loss(params, batch), jnp.mean(batch["x"])

    tx = flatjax.sam(loss_with_aux, has_aux=True, aux_init=jnp.int32(0))
    params = mlp_params()
    with pytest.raises(ValueError, match="truncate"):
        tx.update(None, tx.init(params), params, batch=make_batch())


# ---- float64 -----------------------------------------------------------------------------------------

X64_SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, numpy as np, flatjax

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(32, 6)), np.sign(rng.normal(size=32))
    w0 = {"w": rng.normal(size=6), "b": rng.normal(size=(1,))}

    def loss_fn(p, batch):
        z = batch["x"] @ p["w"] + p["b"][0]
        return jnp.mean(jnp.logaddexp(0.0, -batch["y"] * z))

    def np_loss(p):
        return float(np.mean(np.logaddexp(0.0, -y * (X @ p["w"] + p["b"][0]))))

    def np_grad(p):
        z = X @ p["w"] + p["b"][0]
        s = -y / (1.0 + np.exp(y * z)) / len(y)
        return {"w": X.T @ s, "b": np.array([s.sum()])}

    def add(p, e, c=1.0):
        return {k: p[k] + c * e[k] for k in p}

    def norm(t):
        return np.sqrt(sum(np.sum(v * v) for v in t.values()))

    rho, alpha, beta = 0.1, 0.1, 0.01
    g = np_grad(w0)
    e = {k: rho * v / (norm(g) + 1e-12) for k, v in g.items()}
    sam_ref = np_grad(add(w0, e))
    lp, lm, l0 = np_loss(add(w0, e)), np_loss(add(w0, e, -1.0)), np_loss(w0)
    c, s = lp + lm - 2 * l0, lp - lm
    gp, gm = np_grad(add(w0, e)), np_grad(add(w0, e, -1.0))
    cr_ref = {k: gp[k] + alpha / c * (gp[k] + gm[k] - 2 * g[k]) + beta / s * (gp[k] - gm[k]) for k in g}

    batch = {"x": jnp.asarray(X), "y": jnp.asarray(y)}
    params = jax.tree.map(jnp.asarray, w0)
    worst = 0.0
    for est, ref in [(flatjax.estimators.sam(loss_fn, rho), sam_ref),
                     (flatjax.estimators.crsam(loss_fn, rho, alpha, beta, form="log"), cr_ref)]:
        _, d, _, info = jax.jit(est.value_and_grad)(params, est.init(params), batch)
        assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(d)), d
        for k in ref:
            rel = np.max(np.abs(np.asarray(d[k]) - ref[k])) / np.max(np.abs(ref[k]))
            worst = max(worst, rel)
    print("WORST", worst)
    """
)


def test_float64_params_get_float64_arithmetic():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", X64_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    worst = float(out.stdout.split("WORST")[1])
    assert worst < 1e-12, worst
