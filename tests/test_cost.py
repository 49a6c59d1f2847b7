"""Compiled cost of the training step (XLA's cost and memory analysis, per device): the papers' FLOPs
columns, the memory-lean "sequential" strategy, and m-ARWP at SGD's per-device FLOPs on two devices."""

from __future__ import annotations

import pytest

import flatjax
from experiments import bench_cost


@pytest.fixture(scope="module")
def costs():
    problem = bench_cost.make_problem("cnn", batch_size=32)
    run = lambda method, strategy="sequential": bench_cost.step_cost(*problem, method, strategy)  # noqa: E731
    out = {"sgd": run(None), "sam": run("sam")}
    for method in ("marwp", "nso", "crsam"):
        out[method] = run(method)
    out["marwp 2 devices"] = run("marwp", flatjax.ShardMapProbes(bench_cost.probe_mesh()))
    return out


@pytest.mark.parametrize("method, passes", [("sam", 2), ("marwp", 2), ("nso", 3), ("crsam", 3)])
def test_flops_match_the_pass_count(costs, method, passes):
    # NSO with BatchNorm aux evaluates its clean pass too: 2k + 1 = 3 passes
    assert costs[method]["flops"] / costs["sgd"]["flops"] == pytest.approx(passes, rel=0.01)


@pytest.mark.parametrize("method", ["marwp", "nso", "crsam"])
def test_sequential_strategy_holds_one_pass_of_memory(costs, method):
    """Independent passes run one after another: temporary memory at most 1.1x SAM's (was 1.8x)."""
    assert costs[method]["temp"] <= 1.1 * costs["sam"]["temp"], costs[method]["temp"] / costs["sam"]["temp"]


def test_marwp_on_two_device_groups_costs_sgd_flops_per_device(costs):
    assert costs["marwp 2 devices"]["flops"] <= 1.05 * costs["sgd"]["flops"]
