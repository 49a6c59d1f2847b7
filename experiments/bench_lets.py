"""Step-time benchmark of LETS-SAM / LETS-ASAM relative to SAM, side by side.

    python -m experiments.bench_lets              # writes experiments/results/bench_lets.md
    python -m experiments.bench_lets --quick      # fewer rounds (smoke run)

The MLP of ``experiments/bench_step.py`` (784-512-512-10, batch 128, host CPU). Every step is jitted
with donated buffers and timed in interleaved rounds (each variant once per round, so machine load
affects all alike); the table reports the median step time and its ratio to
``optax.chain(flatjax.sam(loss_fn, 0.05), sgd(0.01, momentum=0.9))``. LETS steps get a second
mini-batch of the same shape as the validation batch.

Expected gradient passes per step (SAM: 2): LETS clean 1 + perturbed 1 + upper 2 + HVP
(fd 2, fd_forward 1, exact: a jvp of a gradient, diag 0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.bench_step import machine_description, make_problem, time_interleaved  # sets XLA_FLAGS before jax

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import flatjax  # noqa: E402


def build_steps(loss_fn):
    base = lambda: optax.sgd(0.01, momentum=0.9)  # noqa: E731
    steps = {"sam": (optax.chain(flatjax.sam(loss_fn, 0.05), base()), False),
             "asam": (optax.chain(flatjax.asam(loss_fn, 0.5), base()), False)}
    for inner, rho in (("sam", 0.05), ("asam", 0.5)):
        for mode in ("fd", "fd_forward", "exact", "diag"):
            steps[f"lets-{inner} [{mode}]"] = (flatjax.lets(loss_fn, base(), inner=inner, rho=rho, hypergradient=mode), True)
    return steps


def jitted_step(tx, is_lets):
    def step(params, state, batch, val_batch):
        if is_lets:
            updates, state = tx.update(None, state, params, batch=batch, val_batch=val_batch)
        else:
            updates, state = tx.update(None, state, params, batch=batch)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def bench(rounds: int, steps_per_round: int):
    loss_fn, params0, batch = make_problem("mlp")
    rng = np.random.default_rng(1)
    val_batch = {"x": jnp.asarray(rng.normal(size=batch["x"].shape), jnp.float32),
                 "y": jnp.asarray(rng.integers(0, 10, size=batch["y"].shape), jnp.int32)}
    runners = {}
    for name, (tx, is_lets) in build_steps(loss_fn).items():
        step = jitted_step(tx, is_lets)
        params = jax.tree.map(jnp.array, params0)
        state = tx.init(params)
        params, state = jax.block_until_ready(step(params, state, batch, val_batch))  # compile + warm up
        runners[name] = [step, params, state]
    return time_interleaved(runners, rounds, steps_per_round, batch, val_batch)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_lets.md"))
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 7
    ms = bench(rounds, 10)
    lines = [
        "# LETS step-time benchmark",
        "",
        f"Machine: {machine_description()}.",
        f"Command: `python -m experiments.bench_lets{' --quick' if args.quick else ''}` "
        f"({rounds} interleaved rounds of 10 steps, median step time). Model: the MLP of bench_step "
        "(784-512-512-10, batch 128; validation batch of 128). Base: sgd(0.01, momentum=0.9).",
        "",
        "| step | ms | / SAM | / ASAM |",
        "|---|---|---|---|",
    ]
    for name, t in ms.items():
        lines.append(f"| {name} | {t:.3f} | {t / ms['sam']:.2f} | {t / ms['asam']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
