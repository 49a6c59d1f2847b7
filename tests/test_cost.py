"""Compiled cost of the training step (XLA's cost and memory analysis, per device): the papers' FLOPs
columns, the memory-lean "sequential" strategy, and m-ARWP at SGD's per-device FLOPs on two devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flatjax
from experiments import bench_cost
from flat_toys import make_batch, mlp_loss, mlp_params
from flatjax.core import perturb


@pytest.fixture(scope="module")
def costs():
    problem = bench_cost.make_problem("cnn", batch_size=32)
    run = lambda method, strategy="sequential": bench_cost.step_cost(*problem, method, strategy)  # noqa: E731
    out = {"sgd": run(None), "sam": run("sam")}
    for method in ("marwp", "nso", "crsam"):
        out[method] = run(method)
    out["marwp 2 devices"] = run("marwp", flatjax.ShardMapProbes(bench_cost.probe_mesh()))
    return out


@pytest.mark.parametrize("method, passes", [("sam", 2), ("marwp", 2), ("nso", 2 + 1 / 3), ("crsam", 3)])
def test_flops_match_the_pass_count(costs, method, passes):
    # NSO with BatchNorm aux (λ = 0) runs its clean point forward only, for the aux: 2k passes + a forward
    # (a third of a pass)
    assert costs[method]["flops"] / costs["sgd"]["flops"] == pytest.approx(passes, rel=0.01)


@pytest.mark.parametrize("method", ["marwp", "nso", "crsam"])
def test_sequential_strategy_holds_one_pass_of_memory(costs, method):
    """Independent passes run one after another: temporary memory at most 1.1x SAM's (was 1.8x)."""
    assert costs[method]["temp"] <= 1.1 * costs["sam"]["temp"], costs[method]["temp"] / costs["sam"]["temp"]


def test_marwp_on_two_device_groups_costs_sgd_flops_per_device(costs):
    assert costs["marwp 2 devices"]["flops"] <= 1.05 * costs["sgd"]["flops"]


def test_noise_is_one_traced_draw_whatever_the_number_of_leaves():
    """Compile time of the noise methods: one threefry in the program for 3 or 30 leaves (a draw per leaf made
    ResNet-18's RWP-family steps compile ~4x longer than SAM's)."""
    def threefry_ops(n_leaves):
        tree = {str(i): jnp.zeros((7, 5)) for i in range(n_leaves)}
        text = jax.jit(lambda k: perturb.unit_noise(k, tree)).lower(jax.random.key(0)).as_text()
        return text.count("shift_left")

    assert threefry_ops(30) == threefry_ops(3) > 0


def test_scaled_noise_is_scales_times_the_unit_noise_with_its_norm_in_one_reduction():
    """``scaled_noise`` gives ``scales · unit_noise`` (same numbers) and its global norm, per-filter and scalar
    scales and a bfloat16 leaf included; the norm is one reduction over the flat noise, whatever the number
    of leaves (62 per-leaf norms were about 40% of the RWP noise code's compile time on ResNet-18)."""
    from flatjax.core.tree import global_norm

    params = {"k": jax.random.normal(jax.random.key(1), (3, 3, 4, 5)), "b": jnp.ones((5,)),
              "h": jnp.full((6, 2), 0.5, jnp.bfloat16)}
    scales = perturb.filterwise_scales(params, 0.1)
    scales["b"] = jnp.float32(0.3)  # a scalar scale broadcasts too
    key = jax.random.key(5)
    e, norm = perturb.scaled_noise(key, params, scales)
    z = perturb.unit_noise(key, params)
    for name in params:
        assert e[name].dtype == jnp.float32 and e[name].shape == params[name].shape
        np.testing.assert_allclose(np.asarray(e[name]), np.asarray(scales[name] * z[name]), rtol=1e-6)
    np.testing.assert_allclose(float(norm), float(global_norm(e)), rtol=1e-5)
    gaussian = perturb.filterwise_gaussian(key, params, 0.1)
    np.testing.assert_allclose(np.asarray(gaussian["k"]), np.asarray(e["k"]), rtol=1e-6)
    assert gaussian["h"].dtype == jnp.bfloat16

    def reductions(n_leaves):
        tree = {str(i): jnp.zeros((7, 5)) for i in range(n_leaves)}
        jaxpr = jax.make_jaxpr(lambda k: perturb.scaled_noise(k, tree, jax.tree.map(lambda _: 1.0, tree)))(key)
        return str(jaxpr).count("reduce_sum")

    assert reductions(30) == reductions(3) == 1


@pytest.mark.parametrize("distribution", perturb.NOISE_DISTRIBUTIONS)
def test_chunked_noise_is_unit_variance_and_independent_across_leaves_and_chunks(monkeypatch, distribution):
    monkeypatch.setattr(perturb, "NOISE_CHUNK", 1000)  # leaves span chunk boundaries
    tree = {"a": jnp.zeros((1500,)), "b": jnp.zeros((35, 20)), "c": jnp.zeros((3000,)),
            "d": jnp.zeros((3000,), jnp.bfloat16)}  # bfloat16 leaves draw in float32
    z = perturb.unit_noise(jax.random.key(3), tree, distribution)
    assert z["d"].dtype == jnp.float32 and z["a"].shape == (1500,) and z["b"].shape == (35, 20)
    flat = {k: np.asarray(v, np.float64).ravel() for k, v in z.items()}
    for k, x in flat.items():
        assert abs(x.mean()) < 0.1 and abs(x.std() - 1.0) < 0.08, (k, x.mean(), x.std())
    chunks = np.concatenate([flat["a"], flat["b"], flat["c"]])[:5000].reshape(5, 1000)
    corr = np.corrcoef(np.vstack([chunks, flat["d"][:1000]]))
    assert np.max(np.abs(corr - np.eye(len(corr)))) < 0.15  # no chunk or stream repeats another
    again = perturb.unit_noise(jax.random.key(3), tree, distribution)
    jax.tree.map(np.testing.assert_array_equal, z, again)  # deterministic per key
    assert not np.array_equal(np.asarray(perturb.unit_noise(jax.random.key(4), tree, distribution)["a"]), flat["a"])


def test_materialized_is_fn_of_its_operands_whatever_their_values():
    from flatjax.core.evaluate import materialized

    fn = lambda x, y: (jnp.sin(x) * y, jnp.sum(x))  # noqa: E731
    for x in (jnp.arange(6.0).reshape(2, 3), jnp.array([[jnp.nan, 1.0, 2.0], [3.0, 4.0, 5.0]])):
        y = jnp.full((2, 3), 2.0)
        step = jax.jit(lambda x, y: materialized(fn, x, y, like=(y, jnp.zeros(()))))
        got, want = step(x, y), fn(x, y)
        for a, b in zip(got, want):  # the same values, a NaN in the first element included (one trip)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert "while" in step.lower(x, y).as_text()  # a loop XLA cannot unroll away (start not constant)


@pytest.mark.parametrize("method", ["rwp", "mrwp"])
def test_the_noisy_point_is_stored_once_not_fused_into_its_consumers(monkeypatch, method):
    """On a conv net (ResNet-8, batch 32) the perturbed point built inside the one-trip loop replaces the
    noise; fused into its consumers, the noise stays live through the pass beside copies of the perturbed
    kernels (measured: one parameter buffer more with the flat noise of ``scaled_noise``; about three with
    the per-leaf noise before it)."""
    from flatjax.methods import rwp as rwp_module

    problem = bench_cost.make_problem("cnn", batch_size=32)
    param_bytes = 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(problem[1]))
    stored = bench_cost.step_cost(*problem, method)["temp"]
    monkeypatch.setattr(rwp_module, "materialized", lambda fn, *operands, like: fn(*operands))
    fused = bench_cost.step_cost(*problem, method)["temp"]
    assert stored <= fused - 0.75 * param_bytes, ((fused - stored) / param_bytes)


def test_crsam_sequential_folds_two_gradients_into_one_buffer_before_its_third_pass(monkeypatch):
    """CR-SAM's code form under "sequential" stores (1 + α + β)∇L+ − 2αg before the − pass: that pass holds
    one gradient-sized buffer instead of two. Seen on a parameter-heavy MLP at batch 8, where parameter-sized
    buffers make the peak (measured: 2.0 against 3.0 parameter buffers); same direction either way."""
    from flatjax.core.estimator import StepContext

    params, batch = mlp_params(sizes=(256, 256, 256, 256)), make_batch(n=8, d=256, classes=256)
    param_bytes = 4 * sum(x.size for x in jax.tree.leaves(params))

    def temp_and_direction():
        est = flatjax.estimators.crsam(mlp_loss, strategy="sequential")
        step = jax.jit(lambda p, s, b: est.value_and_grad(p, s, b)[1])
        args = (params, est.init(params), batch)
        return step.lower(*args).compile().memory_analysis().temp_size_in_bytes, step(*args)

    folded, d_folded = temp_and_direction()
    monkeypatch.setattr(StepContext, "sequential", lambda self, n_probes=2: False)  # one ± probes call, combined after
    unfolded, d_unfolded = temp_and_direction()
    assert folded <= unfolded - 0.9 * param_bytes, (unfolded - folded) / param_bytes
    for a, b in zip(jax.tree.leaves(d_folded), jax.tree.leaves(d_unfolded)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
