"""Offline default job: train a small MLP on scikit-learn's 8×8 digits with every flatjax method.

    python -m experiments.quickstart                 # all methods, ~1–2 minutes on 2 CPU cores
    python -m experiments.quickstart --methods sgd sam marwp --epochs 30

Prints, per method, the final train loss, the test accuracy and the step time relative to plain SGD.
The digits dataset ships inside scikit-learn, so this runs without network access.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flatjax


def load_digits_split(seed: int = 0, test_fraction: float = 0.25):
    """scikit-learn digits as float32 features in [0, 1] and int labels, split deterministically."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train].astype(np.int32)), (x[test], y[test].astype(np.int32))


def init_mlp(key, sizes=(64, 128, 10)):
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"dense{i}"] = {"kernel": jax.random.normal(sub, (a, b)) * jnp.sqrt(2.0 / a), "bias": jnp.zeros(b)}
    return params


def logits_fn(params, x):
    n = len(params)
    for i in range(n):
        x = x @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def loss_fn(params, batch):
    logits = logits_fn(params, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def make_method(name: str, total_steps: int):
    """Each method at its paper default, scaled where the digits MLP needs it (documented inline)."""
    return {
        "sgd": lambda: None,
        "sam": lambda: flatjax.sam(loss_fn, rho=0.05),
        "asam": lambda: flatjax.asam(loss_fn, rho=0.5),
        "rwp": lambda: flatjax.rwp(loss_fn, sigma=flatjax.cosine_increasing(0.001, 10.0, total_steps)),
        "arwp": lambda: flatjax.arwp(loss_fn, sigma=flatjax.cosine_increasing(0.001, 10.0, total_steps)),
        "mrwp": lambda: flatjax.mrwp(loss_fn, sigma=0.015),
        "marwp": lambda: flatjax.marwp(loss_fn, sigma=0.015),
        "wpsgd": lambda: flatjax.wpsgd(loss_fn, sigma=0.01),
        "nso": lambda: flatjax.nso(loss_fn, sigma=0.01),
        "crsam": lambda: flatjax.crsam(loss_fn, rho=0.1, alpha=0.1, beta=0.01),
    }[name]()


METHODS = ("sgd", "sam", "asam", "rwp", "arwp", "mrwp", "marwp", "wpsgd", "nso", "crsam")


def train(name: str, data, *, epochs: int, batch_size: int, lr: float, seed: int):
    (xtr, ytr), (xte, yte) = data
    steps_per_epoch = len(xtr) // batch_size
    total = epochs * steps_per_epoch
    base = optax.sgd(optax.cosine_decay_schedule(lr, total), momentum=0.9)
    method = make_method(name, total)
    tx = base if method is None else optax.chain(method, base)
    params = init_mlp(jax.random.key(seed))
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch):
        if method is None:
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, state = tx.update(grads, state, params)
        else:
            updates, state = tx.update(None, state, params, batch=batch)
            loss = flatjax.step_info(state).probe_losses[0]
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(seed)
    batch0 = {"x": xtr[:batch_size], "y": ytr[:batch_size]}
    jax.block_until_ready(step(params, state, batch0))  # compile outside the timing
    losses, seconds = [], 0.0
    for _ in range(epochs):
        order = rng.permutation(len(xtr))
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            t0 = time.perf_counter()
            params, state, loss = step(params, state, {"x": xtr[idx], "y": ytr[idx]})
            loss.block_until_ready()
            seconds += time.perf_counter() - t0
            losses.append(float(loss))
    accuracy = float(jnp.mean(jnp.argmax(logits_fn(params, xte), -1) == yte))
    return {"train_loss": float(np.mean(losses[-steps_per_epoch:])), "test_acc": accuracy,
            "step_ms": 1e3 * seconds / total}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    data = load_digits_split(args.seed)
    results = {}
    for name in tqdm(args.methods, desc="methods"):
        results[name] = train(name, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    sgd_ms = results.get("sgd", {}).get("step_ms")
    print(f"\ndigits MLP 64-128-10, {args.epochs} epochs, batch {args.batch_size}, jax {jax.__version__} "
          f"on {jax.default_backend()}")
    print("| method | train loss | test acc | step ms | step / SGD |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{r['step_ms'] / sgd_ms:.2f}" if sgd_ms else "-"
        print(f"| {name} | {r['train_loss']:.4f} | {r['test_acc']:.4f} | {r['step_ms']:.3f} | {ratio} |")
    return results


if __name__ == "__main__":
    main()
