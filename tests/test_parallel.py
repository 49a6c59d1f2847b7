"""Same update under jit / no jit, every probe strategy, and data-parallel shard_map on 2 and 4 devices.

Tolerance: float32 with different reduction orders — rtol 1e-5, atol 1e-6 (single device, jit vs not,
sequential vs vmap) and rtol 1e-4, atol 1e-6 across devices (psum/pmean reorders the sums).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec as P

import flatjax
from flat_toys import assert_tree_close, make_batch, mlp_loss, mlp_params

needs = lambda n: pytest.mark.skipif(len(jax.devices()) < n, reason=f"needs {n} devices (XLA_FLAGS)")  # noqa: E731


def probe_mesh(n=2, explicit=False):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh((n,), ("probe",), axis_types=(kind,), devices=jax.devices()[:n])


def direction(tx, params, batch, jit=True, **kw):
    fn = lambda p, s: tx.update(None, s, p, batch=batch, **kw)  # noqa: E731
    return (jax.jit(fn) if jit else fn)(params, tx.init(params))[0]


CASES = {  # name: (factory of a strategy, uses a second batch for the perturbed pass)
    "mrwp-same-batch": (lambda s: flatjax.mrwp(mlp_loss, 0.05, 0.5, seed=2, strategy=s), False),
    "mrwp-two-batches": (lambda s: flatjax.mrwp(mlp_loss, 0.05, 0.5, seed=2, strategy=s), True),
    "marwp-two-batches": (lambda s: flatjax.marwp(mlp_loss, 0.05, 0.5, seed=2, strategy=s), True),
    "sam-m4": (lambda s: flatjax.sam(mlp_loss, 0.1, m=4, strategy=s), False),
    "asam-m2": (lambda s: flatjax.asam(mlp_loss, 0.5, m=2, strategy=s), False),
    "nso-k1": (lambda s: flatjax.nso(mlp_loss, 0.05, 0.3, seed=2, strategy=s), False),
    "nso-k2": (lambda s: flatjax.nso(mlp_loss, 0.05, k=2, seed=2, strategy=s), False),
    "wpsgd-k2": (lambda s: flatjax.wpsgd(mlp_loss, 0.05, k=2, seed=2, strategy=s), False),
    "crsam-code": (lambda s: flatjax.crsam(mlp_loss, 0.1, strategy=s), False),
    "crsam-log": (lambda s: flatjax.crsam(mlp_loss, 0.1, form="log", strategy=s), False),
}


@needs(2)
@pytest.mark.parametrize("name", sorted(CASES))
def test_strategies_and_jit_give_the_same_update(name):
    make, two_batches = CASES[name]
    params, b0, b1 = mlp_params(), make_batch(seed=1), make_batch(seed=2)
    kw = {"perturbed_batch": b1} if two_batches else {}
    reference = direction(make("sequential"), params, b0, jit=False, **kw)
    strategies = ["sequential", "vmap", flatjax.ShardMapProbes(probe_mesh(2))]
    if name == "marwp-two-batches":  # jax.make_mesh's default Explicit axes take another code path
        strategies.append(flatjax.ShardMapProbes(probe_mesh(2, explicit=True)))
    for strategy in strategies:
        assert_tree_close(direction(make(strategy), params, b0, **kw), reference, rtol=1e-5, atol=1e-6)


def probe_data_mesh(explicit=False):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh((2, 2), ("probe", "data"), axis_types=(kind, kind), devices=jax.devices()[:4])


def mlp_loss_with_aux(params, batch):
    """mlp_loss plus aux: a float batch statistic (averaged over data shards) and an int (max)."""
    return mlp_loss(params, batch), {"x_mean": batch["x"].mean(0), "n": jnp.int32(3)}


@needs(4)
@pytest.mark.parametrize("name", ["marwp-two-batches", "nso-k1", "crsam-code", "sam-m4"])
def test_probe_groups_split_the_batch_over_a_data_axis(name):
    """(probe x data) mesh: each probe group is data-parallel inside; same update as one device."""
    make, two_batches = CASES[name]
    params, b0, b1 = mlp_params(), make_batch(seed=1, n=16), make_batch(seed=2, n=16)
    kw = {"perturbed_batch": b1} if two_batches else {}
    reference = direction(make("sequential"), params, b0, jit=False, **kw)
    for explicit in (False, True):
        strategy = flatjax.ShardMapProbes(probe_data_mesh(explicit), "probe", data_axis="data")
        assert_tree_close(direction(make(strategy), params, b0, **kw), reference, rtol=1e-4, atol=1e-6)


@needs(4)
def test_probe_groups_with_a_data_axis_average_the_aux():
    params, b0, b1 = mlp_params(), make_batch(seed=1, n=16), make_batch(seed=2, n=16)
    strategy = flatjax.ShardMapProbes(probe_data_mesh(), "probe", data_axis="data")
    aux0 = {"x_mean": jnp.zeros(5), "n": jnp.int32(0)}
    outs = []
    for s in ("sequential", strategy):
        tx = flatjax.marwp(mlp_loss_with_aux, 0.05, 0.5, seed=2, strategy=s, has_aux=True, aux_init=aux0)
        fn = jax.jit(lambda p, st: tx.update(None, st, p, batch=b0, perturbed_batch=b1))
        _, state = fn(params, tx.init(params))
        outs.append(flatjax.step_info(state))
    assert_tree_close(outs[1].aux, outs[0].aux, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs[1].loss, outs[0].loss, rtol=1e-5)
    assert int(outs[1].aux["n"]) == 3


def test_shard_map_probes_rejects_a_bad_data_axis():
    mesh = jax.make_mesh((1,), ("probe",), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="strategy.data_axis"):
        flatjax.ShardMapProbes(mesh, "probe", data_axis="data")
    with pytest.raises(ValueError, match="strategy.data_axis"):
        flatjax.ShardMapProbes(mesh, "probe", data_axis="probe")


@needs(4)
def test_shard_map_with_more_probes_than_devices():
    params, batch = mlp_params(), make_batch(n=16)
    ref = direction(flatjax.sam(mlp_loss, 0.1, m=2), params, batch, jit=False)  # 8 groups
    got = direction(flatjax.sam(mlp_loss, 0.1, m=2, strategy=flatjax.ShardMapProbes(probe_mesh(4))), params, batch)
    assert_tree_close(got, ref, rtol=1e-5, atol=1e-6)


@needs(2)
def test_shard_map_rejects_uneven_split():
    params, batch = mlp_params(), make_batch(n=12)
    tx = flatjax.sam(mlp_loss, 0.1, m=4, strategy=flatjax.ShardMapProbes(probe_mesh(2)))  # 3 groups
    with pytest.raises(ValueError, match="split evenly"):
        direction(tx, params, batch)


def test_same_seed_same_update_and_different_seed_differs():
    params, batch = mlp_params(), make_batch()
    for factory in (flatjax.rwp, flatjax.marwp):
        step = jax.jit(lambda p, s: factory(mlp_loss).update(None, s, p, batch=batch)[0])
        a = step(params, factory(mlp_loss, seed=11).init(params))
        b = step(params, factory(mlp_loss, seed=11).init(params))
        c = step(params, factory(mlp_loss, seed=12).init(params))
        assert_tree_close(a, b, rtol=0, atol=0)
        assert not np.allclose(a["dense0"]["kernel"], c["dense0"]["kernel"])


def test_explicit_key_overrides_state_stream():
    params, batch = mlp_params(), make_batch()
    key = jax.random.key(3)
    a = direction(flatjax.rwp(mlp_loss, seed=0), params, batch, key=key)
    b = direction(flatjax.rwp(mlp_loss, seed=99), params, batch, key=key)
    assert_tree_close(a, b, rtol=0, atol=0)


# ---- data parallelism inside the user's shard_map ------------------------------------------------


def data_parallel_direction(tx, params, batch, n, **kw):
    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])

    def local_step(params, state, batch):
        updates, _ = tx.update(None, state, params, batch=batch, **kw)
        return updates

    fn = jax.shard_map(local_step, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P())
    return jax.jit(fn)(params, tx.init(params), batch)


@pytest.mark.parametrize("n", [2, 4])
def test_global_sam_data_parallel_equals_one_device(n):
    if len(jax.devices()) < n:
        pytest.skip("needs virtual devices")
    params, batch = mlp_params(), make_batch(n=16)
    ref = direction(flatjax.sam(mlp_loss, 0.1), params, batch)
    got = data_parallel_direction(flatjax.sam(mlp_loss, 0.1, axis_name="data"), params, batch, n)
    assert_tree_close(got, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n", [2, 4])
def test_per_device_sam_equals_m_sharpness_on_one_device(n):
    if len(jax.devices()) < n:
        pytest.skip("needs virtual devices")
    params, batch = mlp_params(), make_batch(n=16)
    ref = direction(flatjax.sam(mlp_loss, 0.1, m=16 // n), params, batch)
    got = data_parallel_direction(flatjax.sam(mlp_loss, 0.1, axis_name="data", per_device=True), params, batch, n)
    assert_tree_close(got, ref, rtol=1e-4, atol=1e-6)
    # m-sharpness inside data parallelism: groups of 2 on every device = m=2 on one device
    ref2 = direction(flatjax.sam(mlp_loss, 0.1, m=2), params, batch)
    got2 = data_parallel_direction(flatjax.sam(mlp_loss, 0.1, m=2, axis_name="data"), params, batch, n)
    assert_tree_close(got2, ref2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("factory", [flatjax.rwp, flatjax.marwp, flatjax.nso, flatjax.crsam],
                         ids=["rwp", "marwp", "nso", "crsam"])
def test_rwp_family_data_parallel_equals_one_device(n, factory):
    if len(jax.devices()) < n:
        pytest.skip("needs virtual devices")
    params, batch = mlp_params(), make_batch(n=16)
    seed = {} if factory is flatjax.crsam else {"seed": 4}
    ref = direction(factory(mlp_loss, **seed), params, batch)
    got = data_parallel_direction(factory(mlp_loss, axis_name="data", **seed), params, batch, n)
    assert_tree_close(got, ref, rtol=1e-4, atol=1e-6)


@needs(2)
def test_naive_gradient_of_replicated_params_is_summed_not_averaged():
    """The trap the methods avoid: without pcast, shard_map returns Σ over devices, N× the mean."""
    n = 2
    params, batch = mlp_params(), make_batch(n=16)
    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
    naive = jax.jit(jax.shard_map(lambda p, b: jax.grad(mlp_loss)(p, b), mesh=mesh,
                                  in_specs=(P(), P("data")), out_specs=P()))(params, batch)
    true = jax.grad(mlp_loss)(params, batch)
    assert_tree_close(naive, jax.tree.map(lambda g: n * g, true), rtol=1e-4, atol=1e-6)


@needs(4)
@pytest.mark.parametrize("name", ["marwp-two-batches", "nso-k1", "crsam-code"])
def test_auto_strategy_uses_probe_groups_under_a_probe_mesh(name):
    """strategy="auto" under jax.set_mesh with a "probe" axis: device groups (SGD's per-device FLOPs for
    m-ARWP's two passes), the same update as sequential; with no mesh it is sequential."""
    make, two = CASES[name]
    params, batch, other = mlp_params(), make_batch(n=256), make_batch(seed=3, n=256)  # passes dominate FLOPs
    kw = {"perturbed_batch": other} if two else {}
    ref = direction(make("sequential"), params, batch, **kw)
    assert_tree_close(direction(make("auto"), params, batch, **kw), ref, rtol=1e-5)
    mesh = jax.make_mesh((2, 2), ("probe", "data"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:4])
    tx = make("auto")
    step = jax.jit(lambda p, s, b: tx.update(None, s, p, batch=b, **kw))
    with jax.set_mesh(mesh):
        assert_tree_close(step(params, tx.init(params), batch)[0], ref, rtol=1e-4)
        auto_flops = step.lower(params, tx.init(params), batch).compile().cost_analysis()["flops"]
    seq = make("sequential")
    seq_flops = jax.jit(lambda p, s, b: seq.update(None, s, p, batch=b, **kw)).lower(
        params, seq.init(params), batch).compile().cost_analysis()["flops"]
    assert auto_flops < 0.75 * seq_flops  # the passes were split over the probe groups


def test_suite_has_the_virtual_devices_conftest_asks_for():
    """A module imported during collection must not change the device count (the multi-device tests
    would silently skip): conftest asks for 4."""
    import os

    if "device_count=4" in os.environ.get("XLA_FLAGS", "") and jax.default_backend() == "cpu":
        assert len(jax.devices()) == 4, os.environ["XLA_FLAGS"]
