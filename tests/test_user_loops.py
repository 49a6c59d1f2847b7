"""The estimator form in the training loops users already have, with BatchNorm: Flax NNX with
``nnx.Optimizer``, Linen with ``TrainState``, and a plain Optax loop. SAM, m-ARWP, NSO and LETS-SAM each
train a few steps; the BatchNorm statistics are those of the clean pass."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import flatjax
import flatjax.models

METHODS = ("sam", "marwp", "nso", "lets")
STEPS = 4


def make_estimator(name, loss_fn, base):
    if name == "sam":
        return flatjax.estimators.sam(loss_fn, rho=0.05, has_aux=True)
    if name == "marwp":
        return flatjax.estimators.marwp(loss_fn, sigma=0.01, has_aux=True)
    if name == "nso":
        return flatjax.estimators.nso(loss_fn, sigma=0.01, has_aux=True)
    return flatjax.estimators.lets(loss_fn, base, inner="sam", rho=0.05, has_aux=True)


def batches():
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        x = rng.normal(size=(16, 6)).astype(np.float32)
        yield {"x": jnp.asarray(x), "y": jnp.asarray((x[:, 0] > 0).astype(np.int32))}


def second_batch(name, b):
    """m-ARWP's perturbed batch / LETS's validation batch: another mini-batch (here: reversed)."""
    other = jax.tree.map(lambda x: x[::-1], b)
    return {"marwp": {"perturbed_batch": other}, "lets": {"val_batch": other}}.get(name, {})


def expected_mean(x, kernel, bias):
    """Running mean after one BatchNorm update (momentum 0.9, from 0) on the clean pass."""
    return 0.1 * np.mean(np.asarray(x) @ np.asarray(kernel) + np.asarray(bias), axis=0)


# ---- Flax NNX ----------------------------------------------------------------------------------------


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(6, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.dense(x))))


def nnx_loss(model, batch):
    return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean()


@pytest.mark.parametrize("name", METHODS)
def test_flax_nnx_loop_with_nnx_optimizer(name):
    model = NNXNet(nnx.Rngs(0))
    base = optax.sgd(0.1, momentum=0.9)
    optimizer = nnx.Optimizer(model, base, wrt=nnx.Param)
    est = make_estimator(name, flatjax.models.pure_loss(nnx_loss, model), base)
    est_state = est.init(flatjax.models.params_of(model))

    @nnx.jit
    def train_step(model, optimizer, est_state, batch, extra):
        loss, grads, est_state, info = flatjax.models.value_and_grad(est, model, est_state, batch,
                                                                     optimizer=optimizer, **extra)
        optimizer.update(model, grads)
        return loss, est_state

    losses = []
    for i, b in enumerate(batches()):
        if i == 0:
            kernel, bias = np.asarray(model.dense.kernel[...]), np.asarray(model.dense.bias[...])
        loss, est_state = train_step(model, optimizer, est_state, b, second_batch(name, b))
        if i == 0:
            np.testing.assert_allclose(model.bn.mean[...], expected_mean(b["x"], kernel, bias), rtol=1e-5, atol=1e-6)
        losses.append(float(loss))
    assert int(est_state.count) == STEPS and int(optimizer.step[...]) == STEPS
    assert all(np.isfinite(losses))
    assert not np.allclose(np.asarray(model.dense.kernel[...]), kernel)


# ---- Flax Linen --------------------------------------------------------------------------------------


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(2)(nn.relu(x))



@pytest.mark.parametrize("name", METHODS)
def test_linen_loop_with_train_state(name):
    net = LinenNet()
    variables = net.init(jax.random.key(0), jnp.zeros((1, 6)), train=False)

    def loss_fn(params, batch, batch_stats):
        logits, updates = net.apply({"params": params, "batch_stats": batch_stats}, batch["x"], train=True,
                                    mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), updates["batch_stats"]

    base = optax.sgd(0.1, momentum=0.9)
    state = train_state.TrainState.create(apply_fn=net.apply, params=variables["params"], tx=base)
    est = make_estimator(name, loss_fn, base)
    est_state, batch_stats = est.init(state.params), variables["batch_stats"]

    @jax.jit
    def train_step(state, batch_stats, est_state, batch, extra):
        if name == "lets":
            extra = {**extra, "base_state": state.opt_state}
        (loss, batch_stats), grads, est_state, info = est.value_and_grad(
            state.params, est_state, batch, loss_kwargs={"batch_stats": batch_stats}, **extra)
        return state.apply_gradients(grads=grads), batch_stats, est_state, loss

    dense0 = variables["params"]["Dense_0"]
    for i, b in enumerate(batches()):
        state, batch_stats, est_state, loss = train_step(state, batch_stats, est_state, b, second_batch(name, b))
        if i == 0:
            np.testing.assert_allclose(batch_stats["BatchNorm_0"]["mean"],
                                       expected_mean(b["x"], dense0["kernel"], dense0["bias"]), rtol=1e-5, atol=1e-6)
        assert np.isfinite(float(loss))
    assert int(state.step) == STEPS and int(est_state.count) == STEPS


# ---- plain Optax -------------------------------------------------------------------------------------


def init_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"dense": {"kernel": jnp.asarray(rng.normal(size=(6, 8)) / 2.5, jnp.float32),
                      "bias": jnp.zeros(8, jnp.float32)},
            "bn": {"scale": jnp.ones(8, jnp.float32), "bias": jnp.zeros(8, jnp.float32)},
            "head": {"kernel": jnp.asarray(rng.normal(size=(8, 2)) / 2.8, jnp.float32),
                     "bias": jnp.zeros(2, jnp.float32)}}


def functional_loss(params, batch, stats):
    h = batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"]
    mean, var = h.mean(0), h.var(0)
    h = (h - mean) / jnp.sqrt(var + 1e-5) * params["bn"]["scale"] + params["bn"]["bias"]
    logits = jax.nn.relu(h) @ params["head"]["kernel"] + params["head"]["bias"]
    new_stats = {"mean": 0.9 * stats["mean"] + 0.1 * mean, "var": 0.9 * stats["var"] + 0.1 * var}
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), new_stats


@pytest.mark.parametrize("name", METHODS)
def test_plain_optax_loop(name):
    params = init_params()
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
    opt_state = optimizer.init(params)
    est = make_estimator(name, functional_loss, optimizer)
    est_state, stats = est.init(params), {"mean": jnp.zeros(8), "var": jnp.ones(8)}

    @jax.jit
    def train_step(params, opt_state, est_state, stats, batch, extra):
        if name == "lets":
            extra = {**extra, "base_state": opt_state}
        (loss, stats), grads, est_state, info = est.value_and_grad(
            params, est_state, batch, loss_kwargs={"stats": stats}, **extra)
        updates, opt_state = optimizer.update(grads, opt_state, params)  # clipping applies to the direction
        return optax.apply_updates(params, updates), opt_state, est_state, stats, loss

    for i, b in enumerate(batches()):
        before = params
        params, opt_state, est_state, stats, loss = train_step(params, opt_state, est_state, stats, b,
                                                               second_batch(name, b))
        if i == 0:
            np.testing.assert_allclose(stats["mean"], expected_mean(b["x"], before["dense"]["kernel"],
                                                                    before["dense"]["bias"]), rtol=1e-5, atol=1e-6)
        assert np.isfinite(float(loss))
    assert int(est_state.count) == STEPS
