"""Step-time benchmark: every flatjax method's jitted training step relative to plain SGD, side by side.

    python -m experiments.bench_step                    # writes experiments/results/bench_step.md
    python -m experiments.bench_step --quick            # fewer repeats (smoke run)

Two models on the host CPU: an MLP (784-512-512-10, batch 128) and a small conv net (conv 16-32-32,
32×32×3 inputs, batch 32). For each model the steps are timed in interleaved rounds (every method once
per round, so machine load affects all alike) and the median per-step time is reported, with its ratio
to the SGD step and, for SAM, to ``optax.contrib.sam`` (opaque mode, sync_period=2: the same two passes).
m-ARWP, NSO (k = 1, 2, 4) and CR-SAM run with each probe strategy, the device one on 2 virtual CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``, set here before JAX is imported). The estimator
form (``flatjax.estimators``) of SAM, RWP, m-ARWP, NSO and CR-SAM runs in a plain loop beside its Optax
form; their ratio (time and compiled FLOPs) is reported.

Compile time (``--compile-only`` runs just this part): every method's step of the training CLI
(``experiments.bench_cost.method_step``: Flax NNX ResNet-18 and the small net ResNet-8, CIFAR shape,
batch 64, BatchNorm statistics as aux) traced, lowered and compiled afresh, in interleaved rounds (5 by
default: compile times vary by about 10% from run to run); the median seconds and the ratio to SGD's and
to SAM's.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # keep a caller's count
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import optax.contrib  # noqa: E402

import flatjax  # noqa: E402
from experiments.run_files import write_results  # noqa: E402


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for width in (512, 512):
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(10)(x)


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def make_problem(name: str):
    rng = np.random.default_rng(0)
    if name == "mlp":
        model, shape, batch = MLP(), (784,), 128
    else:
        model, shape, batch = SmallCNN(), (32, 32, 3), 32
    x = jnp.asarray(rng.normal(size=(batch,) + shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=batch), jnp.int32)
    params = model.init(jax.random.key(0), x)["params"]

    def loss_fn(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, b["x"]), b["y"]).mean()

    return loss_fn, params, {"x": x, "y": y}


def build_steps(loss_fn, devices_ok: bool):
    """name -> (tx, kind); kind 'grad' steps take the user's gradient, 'flat' steps compute their own."""
    base = lambda: optax.sgd(0.01, momentum=0.9)  # noqa: E731
    steps = {
        "sgd": (base(), "grad"),
        "sam": (optax.chain(flatjax.sam(loss_fn, 0.05), base()), "flat"),
        "optax.contrib.sam": (
            optax.contrib.sam(base(), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)), opaque_mode=True),
            "contrib",
        ),
        "asam": (optax.chain(flatjax.asam(loss_fn, 0.5), base()), "flat"),
        "rwp": (optax.chain(flatjax.rwp(loss_fn, 0.01), base()), "flat"),
        "arwp": (optax.chain(flatjax.arwp(loss_fn, 0.01), base()), "flat"),
        "mrwp [sequential]": (optax.chain(flatjax.mrwp(loss_fn, strategy="sequential"), base()), "flat"),
    }
    mesh = None
    if devices_ok:
        mesh = jax.make_mesh((2,), ("probe",), axis_types=(jax.sharding.AxisType.Auto,))
    strategies = {"sequential": "sequential", "vmap": "vmap"}
    if mesh is not None:
        strategies["2 devices"] = flatjax.ShardMapProbes(mesh)
    # methods with independent probes, each under every strategy
    with_probes = {
        "marwp": lambda s: flatjax.marwp(loss_fn, strategy=s),
        "nso k=1": lambda s: flatjax.nso(loss_fn, k=1, strategy=s),
        "nso k=2": lambda s: flatjax.nso(loss_fn, k=2, strategy=s),
        "nso k=4": lambda s: flatjax.nso(loss_fn, k=4, strategy=s),
        "crsam": lambda s: flatjax.crsam(loss_fn, strategy=s),
    }
    for method, make in with_probes.items():
        for label, strategy in strategies.items():
            steps[f"{method} [{label}]"] = (optax.chain(make(strategy), base()), "flat")
    # the estimator form in a plain loop, beside its Optax form above (same rule, same strategy)
    estimators = {
        "sam": flatjax.estimators.sam(loss_fn, 0.05),
        "rwp": flatjax.estimators.rwp(loss_fn, 0.01),
        "marwp [sequential]": flatjax.estimators.marwp(loss_fn, strategy="sequential"),
        "nso k=1 [sequential]": flatjax.estimators.nso(loss_fn, k=1, strategy="sequential"),
        "crsam [sequential]": flatjax.estimators.crsam(loss_fn, strategy="sequential"),
    }
    for optax_name, est in estimators.items():
        steps[f"{optax_name} estimator"] = ((est, base()), "estimator")
    return steps


def init_state(tx, kind, params):
    if kind == "estimator":
        est, base = tx
        return est.init(params), base.init(params)
    return tx.init(params)


def jitted_step(tx, kind, loss_fn):
    def step(params, state, batch):
        if kind == "grad":
            grads = jax.grad(loss_fn)(params, batch)
            updates, state = tx.update(grads, state, params)
        elif kind == "estimator":
            est, base = tx
            est_state, opt_state = state
            _, grads, est_state, _ = est.value_and_grad(params, est_state, batch)
            updates, opt_state = base.update(grads, opt_state, params)
            state = (est_state, opt_state)
        elif kind == "contrib":
            grads = jax.grad(loss_fn)(params, batch)
            grad_fn = jax.grad(lambda p, _: loss_fn(p, batch))
            updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        else:
            updates, state = tx.update(None, state, params, batch=batch)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def bench_model(model_name: str, rounds: int, steps_per_round: int):
    loss_fn, params0, batch = make_problem(model_name)
    runners, flops = {}, {}
    for name, (tx, kind) in build_steps(loss_fn, len(jax.devices()) >= 2).items():
        step = jitted_step(tx, kind, loss_fn)
        params = jax.tree.map(jnp.array, params0)
        state = init_state(tx, kind, params)
        flops[name] = step.lower(params, state, batch).compile().cost_analysis().get("flops", float("nan"))
        params, state = jax.block_until_ready(step(params, state, batch))  # compile + warm up
        runners[name] = [step, params, state]
    return time_interleaved(runners, rounds, steps_per_round, batch), flops


def time_interleaved(runners: dict, rounds: int, steps_per_round: int, *step_args) -> dict:
    """Median ms per step of each ``runners[name] = [step, params, state]``, timed in interleaved rounds.

    Every step runs once per round, so machine load affects all alike; ``step(params, state, *step_args)``.
    """
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            step, params, state = runner
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                params, state = step(params, state, *step_args)
            jax.block_until_ready(params)
            times[name].append((time.perf_counter() - t0) / steps_per_round)
            runner[1], runner[2] = params, state
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


#: The methods whose compile time is measured (registry names; None is SGD).
COMPILE_METHODS = (None, "sam", "asam", "rwp", "arwp", "mrwp", "marwp", "wpsgd", "nso", "crsam", "gsam", "lets")


def compile_times(model_name: str, rounds: int) -> dict:
    """Median seconds to trace + lower + compile each method's step, timed in interleaved rounds."""
    from experiments import bench_cost  # imports this module: loaded here, not at import time

    problem = bench_cost.make_problem(model_name)
    times = {m or "sgd": [] for m in COMPILE_METHODS}
    for _ in range(rounds):
        for m in COMPILE_METHODS:
            times[m or "sgd"].append(bench_cost.compile_seconds(problem, m))
    return {name: statistics.median(t) for name, t in times.items()}


def compile_table(rounds: int) -> list[str]:
    measured = {m: compile_times(m, rounds) for m in ("cnn", "resnet18")}
    lines = ["## Compile time", "",
             f"Trace + lower + compile of each method's step, afresh ({rounds} interleaved rounds, median); "
             "cnn = ResNet-8, resnet18 = ResNet-18, CIFAR shape, batch 64, one CPU device.", "",
             "| method | cnn s | cnn / SGD | cnn / SAM | resnet18 s | resnet18 / SGD | resnet18 / SAM |",
             "|---|---|---|---|---|---|---|"]
    for name in measured["cnn"]:
        cells = []
        for m in ("cnn", "resnet18"):
            t = measured[m]
            cells += [f"{t[name]:.1f}", f"{t[name] / t['sgd']:.2f}", f"{t[name] / t['sam']:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def machine_description() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__}, jaxlib {jax.lib.__version__}, "
            f"optax {optax.__version__}, flax {flax.__version__}, backend {jax.default_backend()}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round instead of 3")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument("--compile-only", action="store_true",
                        help="only the compile-time table (printed; the results file is left as it is)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_step.md"))
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    # compile times vary by ±10% from run to run on a quiet 2-core machine: at least 5 rounds for the table
    compile_rounds = rounds if args.quick or args.rounds else 5
    started = time.perf_counter()
    if args.compile_only:
        print("\n".join(compile_table(compile_rounds)))
        return
    measured = {m: bench_model(m, rounds, 10 if m == "mlp" else 4) for m in ("mlp", "cnn")}
    results = {m: r[0] for m, r in measured.items()}
    flops = {m: r[1] for m, r in measured.items()}
    lines = [
        "# Step-time benchmark",
        "",
        f"Machine: {machine_description()}.",
        f"Command: `python -m experiments.bench_step{' --quick' if args.quick else ''}"
        f"{f' --rounds {args.rounds}' if args.rounds else ''}` "
        f"({rounds} interleaved rounds, median step time).",
        "",
        "| step | MLP ms | MLP / SGD | CNN ms | CNN / SGD |",
        "|---|---|---|---|---|",
    ]
    for name in results["mlp"]:
        m, c = results["mlp"][name], results["cnn"][name]
        lines.append(f"| {name} | {m:.3f} | {m / results['mlp']['sgd']:.2f} | {c:.2f} | {c / results['cnn']['sgd']:.2f} |")
    ratio = lambda k: results[k]["sam"] / results[k]["optax.contrib.sam"]  # noqa: E731
    lines += ["", f"flatjax SAM / optax.contrib.sam: MLP {ratio('mlp'):.2f}, CNN {ratio('cnn'):.2f}.", "",
              "Estimator form / Optax form of the same method (step time, and compiled FLOPs from XLA's cost "
              "analysis):", "",
              "| method | MLP time | MLP FLOPs | CNN time | CNN FLOPs |", "|---|---|---|---|---|"]
    for name in results["mlp"]:
        if name.endswith(" estimator"):
            optax_name = name[: -len(" estimator")]
            cells = []
            for k in ("mlp", "cnn"):
                cells += [f"{results[k][name] / results[k][optax_name]:.2f}",
                          f"{flops[k][name] / flops[k][optax_name]:.3f}"]
            lines.append(f"| {optax_name} | " + " | ".join(cells) + " |")
    lines += [""] + compile_table(compile_rounds)
    lines += ["", f"Whole run (compilation included): {time.perf_counter() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(Path(args.out), text)


if __name__ == "__main__":
    main()
