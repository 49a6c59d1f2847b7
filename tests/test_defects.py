"""Regression tests of the library defects an adversarial trial found (D3, D6, D8, D9, D11-D13, D16-D18),
each named after its defect: the reproducer goes in, a clear error or the correct result comes out.
(D1/D2 are in test_optax_protocol.py and test_train.py, D4 in test_validation.py, the CLI ones in
test_train_failures.py and test_input_errors.py.)"""

from __future__ import annotations

import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flatjax
from flat_toys import assert_tree_close, make_batch, mlp_loss, mlp_params


def _step(tx, params, batch, state=None):
    state = tx.init(params) if state is None else state
    return tx.update(None, state, params, batch=batch)


# ---- D3: validation of +inf, schedules at every step, injected values under jit ----------------------


@pytest.mark.parametrize("factory, arg", [(flatjax.sam, "rho"), (flatjax.rwp, "sigma"), (flatjax.crsam, "alpha"),
                                          (flatjax.nso, "sigma"), (flatjax.asam, "eta")])
def test_d3_infinite_hyperparameters_are_rejected(factory, arg):
    with pytest.raises(ValueError, match=f"{arg} must be finite"):
        factory(mlp_loss, **{arg: float("inf")})


def test_d3_lets_fd_step_and_log_floor_ranges():
    with pytest.raises(ValueError, match="fd_step must be finite and in"):
        flatjax.lets(mlp_loss, optax.sgd(0.1), fd_step=1e-30)
    with pytest.raises(ValueError, match="log_floor must be finite"):
        flatjax.crsam(mlp_loss, form="log", log_floor=float("inf"))


def test_d3_schedule_leaving_its_range_raises_eagerly():
    tx = optax.chain(flatjax.sam(mlp_loss, rho=lambda t: 0.05 - 0.1 * t), optax.sgd(0.1))
    params, state = mlp_params(), None
    _, state = _step(tx, params, make_batch(), state)
    with pytest.raises(ValueError, match=r"rho must be finite and in \[0, inf\); its schedule gave -0.05"):
        _step(tx, params, make_batch(), state)


def test_d3_schedule_leaving_its_range_under_jit_gives_a_skipped_step():
    tx = flatjax.skip_nonfinite(optax.chain(flatjax.mrwp(mlp_loss, lam=lambda t: 0.5 + t), optax.sgd(0.1)))
    params = mlp_params()
    step = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))
    state = tx.init(params)
    _, state = step(params, state, make_batch())
    assert bool(state.last_finite)
    updates, state = step(params, state, make_batch())  # λ = 1.5: out of [0, 1]
    assert not bool(state.last_finite) and int(state.total_notfinite) == 1
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))


def test_d3_injected_value_out_of_range_is_caught_under_jit():
    tx = optax.chain(flatjax.inject_hyperparams(flatjax.sam)(mlp_loss, rho=0.05), optax.sgd(0.1))
    params, batch = mlp_params(), make_batch()
    state = tx.init(params)
    state[0].hyperparams["rho"] = -0.5
    updates, _ = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))(params, state, batch)
    assert not all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))  # NaN, never a descent


# ---- D6: frozen parameters --------------------------------------------------------------------------


FROZEN = {"dense0": {"kernel": False, "bias": True}, "dense1": {"kernel": True, "bias": False}}


def _sub_problem_reference(est_factory, params, batch, **kw):
    """The method on the trainable leaves only, the frozen ones closed over (what torch does with
    requires_grad=False)."""
    trainable = {"a": params["dense0"]["bias"], "b": params["dense1"]["kernel"]}

    def sub_loss(t, b):
        full = {"dense0": {"kernel": params["dense0"]["kernel"], "bias": t["a"]},
                "dense1": {"kernel": t["b"], "bias": params["dense1"]["bias"]}}
        return mlp_loss(full, b)

    est = est_factory(sub_loss, **kw)
    return est.value_and_grad(trainable, est.init(trainable), batch)[1]


@pytest.mark.parametrize("name, kw", [("sam", {"rho": 0.5}), ("asam", {}), ("crsam", {}), ("mrwp", {"seed": 2})])
def test_d6_frozen_leaves_are_neither_perturbed_nor_counted(name, kw):
    params, batch = mlp_params(), make_batch()
    est = getattr(flatjax.estimators, name)(mlp_loss, trainable=FROZEN, **kw)
    _, d, _, _ = est.value_and_grad(params, est.init(params), batch)
    assert float(jnp.abs(d["dense0"]["kernel"]).max()) == 0.0 and float(jnp.abs(d["dense1"]["bias"]).max()) == 0.0
    if name != "mrwp":  # noise draws differ with the number of leaves; the deterministic rules must match
        ref = _sub_problem_reference(getattr(flatjax.estimators, name), params, batch, **kw)
        assert_tree_close({"a": d["dense0"]["bias"], "b": d["dense1"]["kernel"]}, ref, rtol=1e-5)


def test_d6_frozen_leaves_get_no_noise():
    params, batch = mlp_params(), make_batch()
    tx = optax.chain(flatjax.rwp(mlp_loss, sigma=0.5, trainable=FROZEN), optax.sgd(1.0))
    updates, _ = _step(tx, params, batch)
    assert float(jnp.abs(updates["dense0"]["kernel"]).max()) == 0.0
    with pytest.raises(ValueError, match="trainable must be a pytree"):
        flatjax.estimators.rwp(mlp_loss, trainable={"dense0": True}).init(params)
    with pytest.raises(ValueError, match="Python bools"):
        flatjax.estimators.rwp(mlp_loss, trainable=jax.tree.map(lambda x: jnp.array(True), params)).init(params)


def test_d6_lets_with_frozen_leaves_equals_lets_on_the_sub_problem_direction():
    params, b0, b1 = mlp_params(), make_batch(seed=1), make_batch(seed=2)
    base = optax.sgd(0.1)
    est = flatjax.estimators.lets(mlp_loss, base, trainable=FROZEN, hypergradient="exact")
    _, d, state, _ = est.value_and_grad(params, est.init(params), b0, val_batch=b1, base_state=base.init(params))
    assert float(jnp.abs(d["dense0"]["kernel"]).max()) == 0.0
    ref = _sub_problem_reference(flatjax.estimators.sam, params, b0, rho=0.05)
    assert_tree_close({"a": d["dense0"]["bias"], "b": d["dense1"]["kernel"]}, ref, rtol=1e-5)
    assert np.isfinite(float(state.log_rho))


def test_d6_optax_masked_around_a_method_points_to_trainable():
    params, batch = mlp_params(), make_batch()
    tx = optax.masked(flatjax.sam(mlp_loss), FROZEN)
    with pytest.raises(ValueError, match="trainable="):
        tx.update(params, tx.init(params), params, batch=batch)


# ---- D8 / D9: has_aux and aux_init mistakes --------------------------------------------------------


def _loss_aux(p, b):
    return mlp_loss(p, b), {"acc": jnp.float32(0.7)}


def test_d8_tuple_loss_without_has_aux_names_the_fix():
    tx = flatjax.sam(_loss_aux)
    params = mlp_params()
    with pytest.raises(ValueError, match="pass has_aux=True"):
        jax.jit(lambda p, b: tx.update(None, tx.init(p), p, batch=b))(params, make_batch())


def test_d8_has_aux_with_a_scalar_loss_names_the_fix():
    tx = flatjax.sam(mlp_loss, has_aux=True, aux_init={"acc": 0.0})
    with pytest.raises(ValueError, match=r"must return a pair \(loss, aux\)"):
        _step(tx, mlp_params(), make_batch())


def test_d9_aux_init_of_another_dtype_kind_or_shape_raises():
    with pytest.raises(ValueError, match="truncate"):
        _step(flatjax.sam(_loss_aux, has_aux=True, aux_init={"acc": 0}), mlp_params(), make_batch())
    with pytest.raises(ValueError, match="shape"):
        _step(flatjax.sam(_loss_aux, has_aux=True, aux_init={"acc": jnp.zeros(3)}), mlp_params(), make_batch())


# ---- D11 / D12: inject_hyperparams(lets), shape-(1,) hyper-parameters ---------------------------------


def test_d11_inject_hyperparams_of_lets_runs_under_jit():
    tx = flatjax.inject_hyperparams(flatjax.lets)(mlp_loss, optax.sgd(0.1), rho=0.1, eta=0.01)
    params = mlp_params()
    updates, state = jax.jit(lambda p, s, b, v: tx.update(None, s, p, batch=b, val_batch=v))(
        params, tx.init(params), make_batch(seed=1), make_batch(seed=2))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert "eta" in state.hyperparams and "rho" not in state.hyperparams


def test_d12_shape_one_hyperparameter_does_not_retrace():
    tx = optax.chain(flatjax.sam(mlp_loss, rho=np.array([0.05], np.float32)), optax.sgd(0.1))
    params = mlp_params()
    step = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))
    state = tx.init(params)
    for i in range(3):
        _, state = step(params, state, make_batch(seed=i))
    assert step._cache_size() == 1
    assert flatjax.step_info(state).diagnostics["rho"].shape == ()


# ---- D13: wrong argument types name the argument -----------------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: flatjax.sam(mlp_loss, rho=None), "rho must be a real number"),
    (lambda: flatjax.sam(mlp_loss, rho=1j), "rho must be a real number"),
    (lambda: flatjax.sam(mlp_loss, rho=lambda t: "x"), "rho must be a real number"),
    (lambda: flatjax.rwp(mlp_loss, seed="abc"), "seed must be an int"),
    (lambda: flatjax.rwp(mlp_loss, seed=None), "seed must be an int"),
    (lambda: flatjax.sam(mlp_loss, axis_name=3), "axis_name must be None or the name"),
    (lambda: flatjax.crsam(mlp_loss, form="log", log_floor=lambda t: 1e-12), "log_floor must be a number"),
    (lambda: flatjax.lets(mlp_loss, optax.sgd(0.1), fd_step=lambda t: 1e-2), "fd_step must be a number"),
    (lambda: flatjax.cosine_increasing("0.001", 10, 100), "init_value must be a real number"),
])
def test_d13_wrong_argument_types_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_d13_runtime_mistakes_name_the_argument():
    params, batch = mlp_params(), make_batch(n=16)
    with pytest.raises(ValueError, match="mask must be a pytree of bools"):
        _step(optax.chain(flatjax.asam(mlp_loss, mask={"dense0": True}), optax.sgd(0.1)), params, batch)
    scaled = lambda p, b: mlp_loss(p, b) * b["t"]  # noqa: E731
    with pytest.raises(ValueError, match=r"batch\['t'\] is a scalar"):
        _step(flatjax.sam(scaled, m=8), params, {**batch, "t": jnp.float32(1.0)})
    tx = flatjax.sam(mlp_loss)
    with pytest.raises(ValueError, match="clean_grad must have the structure"):
        bad = {"dense0": params["dense0"]}
        tx.update(bad, tx.init(params), params, batch=batch, clean_grad=bad)


# ---- D16: near-miss keyword names --------------------------------------------------------------------


@pytest.mark.parametrize("kwarg, fix", [("perturbed_batches", "perturbed_batch"), ("loss_kwarg", "loss_kwargs"),
                                        ("clean_grads", "clean_grad")])
def test_d16_misspelled_keyword_raises(kwarg, fix):
    tx = flatjax.mrwp(mlp_loss)
    params = mlp_params()
    with pytest.raises(ValueError, match=f"did you mean '{fix}'"):
        tx.update(None, tx.init(params), params, batch=make_batch(), **{kwarg: make_batch(seed=2)})
    lets = flatjax.lets(mlp_loss, optax.sgd(0.1))
    with pytest.raises(ValueError, match="did you mean 'val_batch'"):
        lets.update(None, lets.init(params), params, batch=make_batch(), val_batches=make_batch(seed=2))


def test_d16_other_members_keywords_still_pass():
    params = mlp_params()
    tx = flatjax.mrwp(mlp_loss)
    tx.update(None, tx.init(params), params, batch=make_batch(), scale_by=2.0, value=1.0)


# ---- D17: CR-SAM's log form and float32 -----------------------------------------------------------------


def test_d17_crsam_log_form_states_its_float32_sensitivity():
    """Documented, not changed: c is a difference of float32 losses; float64 is exact (test_estimators)."""
    assert "float32" in flatjax.estimators.crsam.__doc__ and "jax_enable_x64" in flatjax.estimators.crsam.__doc__


# ---- D18: compile time with many probes ------------------------------------------------------------------


def test_d18_many_noise_pairs_compile_in_bounded_time():
    """nso(k=100) compiled 17x slower than k=4 when every probe was unrolled (34 s vs 1.9 s here)."""
    params, batch = mlp_params(), make_batch()

    def compile_seconds(k, strategy="auto"):
        tx = optax.chain(flatjax.nso(mlp_loss, sigma=0.01, k=k, strategy=strategy), optax.sgd(0.1))
        step = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b))
        t0 = time.perf_counter()
        compiled = step.lower(params, tx.init(params), batch).compile()
        return time.perf_counter() - t0, compiled(params, tx.init(params), batch)[0]

    small, _ = compile_seconds(4)
    large, u = compile_seconds(100)
    assert large < 3.0 * small + 2.0, (small, large)
    _, u_ref = compile_seconds(100, "vmap")
    assert_tree_close(u, u_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["nso", "wpsgd"])
def test_d18_stacked_probes_match_the_unrolled_form(name, monkeypatch):
    """Above UNROLL_MAX_K the probes are stacked: the same noise values and the same update."""
    nso_module = importlib.import_module("flatjax.methods.nso")  # the attribute is the nso function
    params, batch = mlp_params(), make_batch()
    est = getattr(flatjax.estimators, name)(mlp_loss, sigma=0.05, k=6, seed=4)
    stacked = est.value_and_grad(params, est.init(params), batch)
    monkeypatch.setattr(nso_module, "UNROLL_MAX_K", 100)
    unrolled = est.value_and_grad(params, est.init(params), batch)
    assert_tree_close(stacked[1], unrolled[1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stacked[3].probe_losses, unrolled[3].probe_losses, rtol=1e-6)
