"""Step-time benchmark of LETS-SAM / LETS-ASAM relative to SAM, side by side.

    python -m experiments.bench_lets              # writes experiments/results/bench_lets.md
    python -m experiments.bench_lets --quick      # fewer rounds (smoke run)

The MLP of ``experiments/bench_step.py`` (784-512-512-10, batch 128, host CPU). Every step is jitted
with donated buffers and timed in interleaved rounds (each variant once per round, so machine load
affects all alike); the table reports the median step time and its ratio to
``optax.chain(flatjax.sam(loss_fn, 0.05), sgd(0.01, momentum=0.9))``. LETS steps get a second
mini-batch of the same shape as the validation batch.

Expected gradient passes per step (SAM: 2): LETS clean 1 + perturbed 1 + upper 2 + HVP
(fd 2, fd_forward 1, exact: a jvp of a gradient, diag 0). A second section reports LETS-SAM with the
radius updated every K steps: compiled FLOPs per step averaged over K, and the learned radius on the
offline digits default for each K.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.bench_step import machine_description, make_problem, time_interleaved  # sets XLA_FLAGS before jax
from experiments.run_files import write_results

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


def radius_every_costs(ks=(1, 2, 4, 8)) -> list[str]:
    """Compiled FLOPs of LETS-SAM per step averaged over K (radius updated every K-th step), over SAM's."""
    loss_fn, params, batch = make_problem("mlp")
    base = optax.sgd(0.01, momentum=0.9)

    def flops(est, extra):
        step = jax.jit(lambda p, s, o, b: est.value_and_grad(p, s, b, **extra(o)))
        return step.lower(params, est.init(params), base.init(params), batch).compile().cost_analysis()["flops"]

    sam = flops(flatjax.estimators.sam(loss_fn, 0.05), lambda o: {})
    lets = flops(flatjax.estimators.lets(loss_fn, base, inner="sam", rho=0.05),
                 lambda o: {"val_batch": batch, "base_state": o})
    lines = ["| K (radius_every) | FLOPs per step / SAM (averaged over K) |", "|---|---|"]
    for k in ks:
        lines.append(f"| {k} | {(lets + (k - 1) * sam) / k / sam:.2f} |")
    return lines


def radius_trajectories(ks=(1, 2, 4, 8), epochs: int = 10, every: int = 44) -> list[str]:
    """LETS-SAM on the offline digits default (MLP 64-128-128-10, batch 64, SGD 0.05 momentum 0.9, wd 5e-4):
    the learned radius every ``every`` steps and the final test accuracy, per K."""
    from flatjax import data as fdata
    from flatjax import models as fmodels

    train, test = fdata.load_digits(seed=0)
    graphdef, params0, state0 = fmodels.split_model(fmodels.create("mlp", 10, seed=0))
    loss_fn = fmodels.make_loss_fn(graphdef)
    apply = fmodels.make_apply(graphdef)
    base = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
    it = fdata.BatchIterator(train, 64, seed=0)
    val_it = fdata.BatchIterator(train, 64, seed=1)
    rows = {}
    for k in ks:
        est = flatjax.estimators.lets(loss_fn, base, inner="sam", rho=0.05, radius_every=k, has_aux=True)

        @jax.jit
        def step(params, model_state, est_state, opt_state, b, v, est=est):
            (_, model_state), grads, est_state, _ = est.value_and_grad(
                params, est_state, b, val_batch=v, base_state=opt_state, loss_kwargs={"model_state": model_state})
            updates, opt_state = base.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), model_state, est_state, opt_state

        params, model_state, est_state, opt_state = params0, state0, est.init(params0), base.init(params0)
        rhos, n = [], 0
        for epoch in range(epochs):
            for b, v in zip(it.epoch(epoch), val_it.epoch(epoch)):
                if n % every == 0:
                    rhos.append(float(jnp.exp(est_state.log_rho)))
                params, model_state, est_state, opt_state = step(params, model_state, est_state, opt_state, b, v)
                n += 1
        rhos.append(float(jnp.exp(est_state.log_rho)))
        logits, _ = apply(params, model_state, jnp.asarray(test.image), train=False)
        rows[k] = (rhos, float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(test.label))), n)
    steps = rows[ks[0]][2]
    marks = [i * every for i in range(len(rows[ks[0]][0]) - 1)] + [steps]
    lines = ["| K | " + " | ".join(f"ρ @ {m}" for m in marks) + " | test acc |",
             "|---|" + "---|" * (len(marks) + 1)]
    for k, (rhos, acc, _) in rows.items():
        lines.append(f"| {k} | " + " | ".join(f"{r:.5f}" for r in rhos) + f" | {acc:.4f} |")
    return lines


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
    lines += ["", "## Radius every K steps (`flatjax.lets(..., radius_every=K)`)", "",
              "Compiled cost (XLA's cost analysis, the MLP above): a radius step is LETS's full step, the "
              "other K-1 steps are SAM steps at the current radius.", ""] + radius_every_costs()
    lines += ["", "Learned radius ρ on the offline digits default (LETS-SAM, MLP 64-128-128-10, batch 64, "
              "10 epochs, SGD 0.05 momentum 0.9, wd 5e-4, validation batches from an independent stream of "
              "the training set; the radius optimizer is flatjax's default, Adam lr 1e-4 decaying):", ""]
    lines += radius_trajectories()
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(Path(args.out), text)


if __name__ == "__main__":
    main()
