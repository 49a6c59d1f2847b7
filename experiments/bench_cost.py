"""Per-device compiled cost of every method's training step, relative to SGD: FLOPs, bytes, memory.

    python -m experiments.bench_cost                 # writes experiments/results/bench_cost.md
    python -m experiments.bench_cost --models cnn    # the small conv net only (about a minute)

XLA's own cost and memory analysis of the jitted step (``jit(step).lower(...).compile()``): FLOPs, bytes
accessed and temporary memory PER DEVICE, for the small conv net and ResNet-18 (CIFAR shape, batch 64,
BatchNorm statistics as aux), every method in ``flatjax.registry`` under each probe strategy
(``sequential``, ``vmap``, and ``ShardMapProbes`` over 2 virtual CPU devices for methods with
independent passes). Nothing runs: this is the hardware-independent evidence for the papers' cost
columns (e.g. m-ARWP: 2x SGD's FLOPs, but 1x per device on two device groups) until an accelerator
run exists. The step is the training CLI's: ``chain(method, add_decayed_weights, sgd)``.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # keep a caller's count
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import flatjax  # noqa: E402
from experiments.bench_step import machine_description  # noqa: E402
from experiments.run_files import write_results  # noqa: E402
from flatjax import models as fmodels  # noqa: E402

#: The papers' cost columns, relative to SGD: (FLOPs, wall time on 2 devices) where a paper states them.
PAPER = {"sam": "2x / 2x", "rwp": "1x / 1x", "arwp": "1x / 1x", "mrwp": "2x / 1x", "marwp": "2x / 1x"}


def make_problem(model_name: str, batch_size: int = 64):
    """``(loss_fn, params, model_state, batch)``: a Flax NNX model with BatchNorm, CIFAR-shaped inputs."""
    name, kw = {"cnn": ("small_cnn", {}), "resnet18": ("resnet18", {})}[model_name]
    graphdef, params, model_state = fmodels.split_model(fmodels.create(name, 10, seed=0, **kw))
    loss_fn = fmodels.make_loss_fn(graphdef)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(batch_size, 32, 32, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}
    return loss_fn, params, model_state, batch


def probe_mesh():
    return jax.make_mesh((2,), ("probe",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])


def method_step(loss_fn, params, model_state, batch, method: str | None, strategy: Any = "sequential"):
    """``(step, args)``: the jitted training step of ``method`` (None: SGD) and its arguments."""
    base = [optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)]
    kwargs = {"loss_kwargs": {"model_state": model_state}}
    if method is None:
        tx = optax.chain(*base)
    elif flatjax.registry.METHODS[method].wraps_optimizer:
        tx = getattr(flatjax, method)(loss_fn, optax.chain(*base), has_aux=True, aux_init=model_state)
        kwargs["val_batch"] = batch
    else:
        extra = {"strategy": strategy} if flatjax.registry.METHODS[method].parallel_passes else {}
        if method == "samon":  # the conv nets' BatchNorm leaves are found by name
            extra = {}
        tx = optax.chain(getattr(flatjax, method)(loss_fn, has_aux=True, aux_init=model_state, **extra), *base)

    def step(params, state, batch):
        if method is None:
            (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, model_state)
            updates, state = tx.update(grads, state, params)
        else:
            updates, state = tx.update(None, state, params, batch=batch, **kwargs)
        return optax.apply_updates(params, updates), state

    return jax.jit(step), (params, tx.init(params), batch)


def step_cost(loss_fn, params, model_state, batch, method: str | None, strategy: Any = "sequential") -> dict:
    """Per-device ``{"flops", "bytes", "temp"}`` of one jitted training step (``method=None``: SGD)."""
    step, args = method_step(loss_fn, params, model_state, batch, method, strategy)
    compiled = step.lower(*args).compile()
    cost, memory = compiled.cost_analysis(), compiled.memory_analysis()
    return {"flops": float(cost.get("flops", np.nan)), "bytes": float(cost.get("bytes accessed", np.nan)),
            "temp": float(memory.temp_size_in_bytes)}


def compile_seconds(problem, method: str | None) -> float:
    """Seconds to trace, lower and compile ``method``'s step afresh (what a user waits for before step 1)."""
    step, args = method_step(*problem, method)
    t0 = time.perf_counter()
    step.lower(*args).compile()
    return time.perf_counter() - t0


def strategies_of(method: str) -> dict:
    if not flatjax.registry.METHODS[method].parallel_passes:
        return {"sequential": "sequential"}
    return {"sequential": "sequential", "vmap": "vmap", "2 devices": flatjax.ShardMapProbes(probe_mesh())}


def bench_model(model_name: str) -> list[dict]:
    problem = make_problem(model_name)
    sgd = step_cost(*problem, None)
    sam = step_cost(*problem, "sam")
    rows = [{"method": "sgd", "strategy": "-", **sgd}]
    for method in flatjax.registry.METHODS:
        for label, strategy in strategies_of(method).items():
            cost = sam if method == "sam" else step_cost(*problem, method, strategy)
            rows.append({"method": method, "strategy": label, **cost})
    for row in rows:
        row.update(flops_x=row["flops"] / sgd["flops"], bytes_x=row["bytes"] / sgd["bytes"],
                   temp_x=row["temp"] / sgd["temp"], temp_sam=row["temp"] / sam["temp"])
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| method | strategy | FLOPs / SGD | bytes / SGD | temp memory / SGD | temp / SAM | paper FLOPs / time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['strategy']} | {r['flops_x']:.2f} | {r['bytes_x']:.2f} | "
                     f"{r['temp_x']:.2f} | {r['temp_sam']:.2f} | {PAPER.get(r['method'], '')} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet18"], choices=["cnn", "resnet18"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_cost.md"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    lines = ["# Compiled cost per device", "",
             f"Machine: {machine_description()}; 2 virtual CPU devices.",
             f"Command: `python -m experiments.bench_cost{'' if args.models == ['cnn', 'resnet18'] else ' --models ' + ' '.join(args.models)}`.",
             "Numbers are XLA's cost and memory analysis of the compiled step on ONE device (batch 64, "
             "CIFAR shape, BatchNorm statistics as aux), relative to plain SGD; nothing is timed.", ""]
    titles = {"cnn": "cnn (ResNet-8: flatjax.models small_cnn, 78K parameters)",
              "resnet18": "resnet18 (11.2M parameters: one parameter-sized buffer is 7% of SAM's temporary memory)"}
    for model in args.models:
        lines += [f"## {titles[model]}", ""] + table(bench_model(model)) + [""]
    lines.append(f"Whole run (compilation only): {time.perf_counter() - started:.0f} s.")
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(Path(args.out), text)


if __name__ == "__main__":
    main()
