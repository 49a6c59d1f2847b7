"""Bad hyper-parameters raise ValueError naming the parameter and its range."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import flatjax
from flat_toys import make_batch, mlp_loss, mlp_params

CASES = [
    (flatjax.sam, {"rho": -0.1}, "rho"),
    (flatjax.sam, {"rho": float("nan")}, "rho"),
    (flatjax.sam, {"m": 0}, "m"),
    (flatjax.sam, {"m": 2.5}, "m"),
    (flatjax.sam, {"per_device": True}, "axis_name"),
    (flatjax.sam, {"strategy": "threads"}, "strategy"),
    (flatjax.sam, {"rho": lambda step: -1.0}, "rho"),
    (flatjax.asam, {"rho": -1.0}, "rho"),
    (flatjax.asam, {"eta": -0.01}, "eta"),
    (flatjax.rwp, {"sigma": -0.01}, "sigma"),
    (flatjax.arwp, {"sigma": -0.01}, "sigma"),
    (flatjax.arwp, {"eta": -1.0}, "eta"),
    (flatjax.arwp, {"beta": 0.0}, "beta"),
    (flatjax.arwp, {"beta": 1.0}, "beta"),
    (flatjax.mrwp, {"lam": 1.5}, "lam"),
    (flatjax.mrwp, {"lam": -0.1}, "lam"),
    (flatjax.mrwp, {"sigma": -1.0}, "sigma"),
    (flatjax.marwp, {"lam": 2.0}, "lam"),
    (flatjax.marwp, {"eta": -0.1}, "eta"),
    (flatjax.marwp, {"beta": 1.2}, "beta"),
    (flatjax.wpsgd, {"sigma": -0.1}, "sigma"),
    (flatjax.wpsgd, {"k": 0}, "k"),
    (flatjax.wpsgd, {"noise": "cauchy"}, "noise"),
    (flatjax.nso, {"sigma": -0.1}, "sigma"),
    (flatjax.nso, {"lam": 1.1}, "lam"),
    (flatjax.nso, {"k": -2}, "k"),
    (flatjax.nso, {"noise": "binomial"}, "noise"),
    (flatjax.crsam, {"rho": -0.1}, "rho"),
    (flatjax.crsam, {"alpha": -1.0}, "alpha"),
    (flatjax.crsam, {"beta": -1.0}, "beta"),
    (flatjax.crsam, {"form": "exp"}, "form"),
    (flatjax.crsam, {"log_floor": 0.0}, "log_floor"),
]


@pytest.mark.parametrize("factory,kwargs,name", CASES, ids=[f"{f.__name__}-{n}-{i}" for i, (f, _, n) in enumerate(CASES)])
def test_bad_hyperparameter_names_itself(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(mlp_loss, **kwargs)


def test_range_is_in_message():
    with pytest.raises(ValueError, match=r"lam must be finite and in \[0, 1\], got 1.5"):
        flatjax.mrwp(mlp_loss, lam=1.5)
    with pytest.raises(ValueError, match=r"beta must be finite and in \(0, 1\)"):
        flatjax.arwp(mlp_loss, beta=1.0)


def test_loss_fn_must_be_callable():
    with pytest.raises(ValueError, match="loss_fn"):
        flatjax.sam("not a function")


def test_aux_init_required_with_has_aux():
    with pytest.raises(ValueError, match="aux_init"):
        flatjax.marwp(mlp_loss, has_aux=True)


def test_update_needs_batch_and_params():
    params = mlp_params()
    tx = flatjax.sam(mlp_loss)
    state = tx.init(params)
    with pytest.raises(ValueError, match="batch"):
        tx.update(None, state, params)
    with pytest.raises(ValueError, match="params"):
        tx.update(None, state, batch=make_batch())


def test_non_scalar_loss_is_explained():
    params = mlp_params()
    tx = flatjax.sam(lambda p, b: jnp.ones(3) * mlp_loss(p, b))
    with pytest.raises(ValueError, match="scalar loss"):
        tx.update(None, tx.init(params), params, batch=make_batch())


def test_m_must_divide_batch():
    params = mlp_params()
    tx = flatjax.sam(mlp_loss, m=3)
    with pytest.raises(ValueError, match="m must divide"):
        tx.update(None, tx.init(params), params, batch=make_batch(n=8))


def test_cosine_increasing_validation_and_values():
    with pytest.raises(ValueError, match="total_steps"):
        flatjax.cosine_increasing(0.001, 10.0, 0)
    sched = flatjax.cosine_increasing(0.001, 10.0, 100)
    assert float(sched(0)) == pytest.approx(0.001)
    assert float(sched(50)) == pytest.approx(0.001 * 6.0)
    assert float(sched(100)) == pytest.approx(0.011)
    assert float(sched(1000)) == pytest.approx(0.011)


@pytest.mark.parametrize("factory, arg", [(flatjax.arwp, "eta"), (flatjax.arwp, "beta"), (flatjax.marwp, "eta"),
                                          (flatjax.marwp, "lam"), (flatjax.mrwp, "lam")])
def test_d4_none_does_not_silently_select_another_variant(factory, arg):
    with pytest.raises(ValueError, match=f"{arg} must be a number"):
        factory(mlp_loss, **{arg: None})
