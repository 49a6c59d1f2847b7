"""A Flax model with BatchNorm trains with SAM and m-ARWP; the returned batch statistics are those of the
unperturbed pass (ALGORITHMS.md: BN running statistics come from the clean pass)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flatjax
from flat_toys import assert_tree_close


class TinyBNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(3)(x)


MODEL = TinyBNNet()


def loss_fn(params, batch, batch_stats):
    logits, updated = MODEL.apply(
        {"params": params, "batch_stats": batch_stats}, batch["x"], train=True, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, updated["batch_stats"]


def make_data(seed, n=16):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    x = rng.normal(size=(n, 6, 6, 2)) + y[:, None, None, None]  # class shifts the mean: learnable
    return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.int32)}


@pytest.fixture(scope="module")
def init_vars():
    return MODEL.init(jax.random.key(0), make_data(0)["x"], train=False)


METHODS = {
    "sam": lambda bs: flatjax.sam(loss_fn, 0.1, has_aux=True, aux_init=bs),
    "marwp": lambda bs: flatjax.marwp(loss_fn, 0.05, has_aux=True, aux_init=bs),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_batch_stats_come_from_the_clean_pass(name, init_vars):
    params, stats = init_vars["params"], init_vars["batch_stats"]
    batch = make_data(1)
    tx = METHODS[name](stats)
    _, state = jax.jit(lambda p, s: tx.update(None, s, p, batch=batch, loss_kwargs={"batch_stats": stats}))(
        params, tx.init(params)
    )
    info = flatjax.step_info(state)
    clean_loss, clean_stats = loss_fn(params, batch, stats)
    assert_tree_close(info.aux, clean_stats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(info.loss, clean_loss, rtol=1e-5)
    # and they are not the statistics of a perturbed point (the check can fail)
    shifted = jax.tree.map(lambda p: p + 0.1, params)
    _, perturbed_stats = loss_fn(shifted, batch, stats)
    assert not np.allclose(info.aux["BatchNorm_0"]["mean"], perturbed_stats["BatchNorm_0"]["mean"])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bn_model_trains(name, init_vars):
    params, stats = init_vars["params"], init_vars["batch_stats"]
    tx = optax.chain(METHODS[name](stats), optax.sgd(0.1, momentum=0.9))
    state = tx.init(params)

    @jax.jit
    def step(params, state, stats, batch):
        updates, state = tx.update(None, state, params, batch=batch, loss_kwargs={"batch_stats": stats})
        info = flatjax.step_info(state)
        return optax.apply_updates(params, updates), state, info.aux, info.loss

    losses = []
    for i in range(40):
        params, state, stats, loss = step(params, state, stats, make_data(100 + i))
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    # running statistics moved away from their initial values (mean 0, var 1)
    assert float(jnp.abs(stats["BatchNorm_0"]["mean"]).max()) > 0.05
