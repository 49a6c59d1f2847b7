"""Sharpness report for a small trained model: JSON numbers and PNG plots.

Usage::

    python -m experiments.sharpness_report --out runs/sharpness            # trains first (seconds)
    python -m experiments.sharpness_report --params mlp.msgpack --out DIR  # measures given weights

``--params`` is a file written with ``flax.serialization.msgpack_serialize(params)`` where
``params`` is the Flax ``"params"`` collection of the model (a top-level ``{"params": ...}``
wrapper is accepted too). For ``--model mlp`` (the only model for now) the structure is
``{"Dense_0": {"kernel": (64, H), "bias": (H,)}, ..., "Dense_L": {"kernel": (H, 10), "bias": (10,)}}``
— a ReLU MLP on scikit-learn's 8×8 digits (``sklearn.datasets.load_digits``, shipped offline,
pixels scaled to [0, 1]); the hidden sizes are read from the file. Without ``--params`` the MLP is
trained with SGD + momentum for ``--train-steps`` steps; ``--save-params`` writes the weights in the
same format.

All measurements use the training split (80%, fixed permutation) in batches of ``--batch-size``,
averaged with size weights, in evaluation mode (the MLP has no BatchNorm or dropout). Writes
``report.json`` and ``landscape_1d.png``, ``landscape_2d.png``, ``landscape_surface.png``,
``spectrum.png``, ``gaps.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flatjax import sharpness as S
from flatjax.sharpness import plots

MODELS = ("mlp",)


def load_digits_split(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """scikit-learn digits, pixels / 16, a fixed 80/20 split (permutation from ``seed``)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_train = int(0.8 * len(y))
    tr, te = perm[:n_train], perm[n_train:]
    return {"x": x[tr], "y": y[tr]}, {"x": x[te], "y": y[te]}


def make_mlp(hidden: Sequence[int], num_classes: int = 10) -> Any:
    """A Flax ReLU MLP; parameters ``Dense_0 .. Dense_{len(hidden)}``."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for h in hidden:
                x = nn.relu(nn.Dense(h)(x))
            return nn.Dense(num_classes)(x)

    return MLP()


def make_loss(model: Any):
    """Mean softmax cross-entropy of ``model`` on a ``{"x", "y"}`` batch."""
    import optax

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    return loss_fn


def evaluate(model: Any, loss_fn: Any, params: Any, data: dict[str, np.ndarray]
             ) -> tuple[float, float]:
    """Mean loss and accuracy on ``data`` (one compiled call)."""

    @jax.jit
    def run(params, data):
        logits = model.apply({"params": params}, data["x"])
        return loss_fn(params, data), jnp.mean(jnp.argmax(logits, -1) == data["y"])

    loss, acc = run(params, data)
    return float(loss), float(acc)


def train_mlp(model: Any, loss_fn: Any, train: dict[str, np.ndarray], steps: int, seed: int,
              lr: float = 0.1, batch_size: int = 64) -> Any:
    """SGD with momentum 0.9 on random mini-batches (seconds on a CPU)."""
    import optax

    params = jax.jit(model.init)(jax.random.key(seed), train["x"][:1])["params"]
    opt = optax.sgd(lr, momentum=0.9)
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(seed)
    n = len(train["y"])
    for _ in range(steps):
        idx = rng.choice(n, batch_size, replace=False)
        params, state = step(params, state, {"x": train["x"][idx], "y": train["y"][idx]})
    return params


def load_params(path: str) -> dict[str, Any]:
    """Read a msgpack params file (``flax.serialization.msgpack_serialize``) for ``--model mlp``."""
    from flax import serialization

    with open(path, "rb") as f:
        tree = serialization.msgpack_restore(f.read())
    if isinstance(tree, dict) and set(tree) == {"params"}:
        tree = tree["params"]
    layers = sorted((k for k in tree if k.startswith("Dense_")), key=lambda k: int(k.split("_")[1]))
    if not layers or len(layers) != len(tree) or any(
            set(tree[k]) != {"kernel", "bias"} for k in layers):
        raise ValueError(f"--params must hold an MLP params tree {{'Dense_i': {{'kernel', 'bias'}}}}; "
                         f"got keys {sorted(tree)}")
    if tree[layers[0]]["kernel"].shape[0] != 64 or tree[layers[-1]]["kernel"].shape[1] != 10:
        raise ValueError("--params: the MLP must map 64 inputs (8x8 digits) to 10 classes; got "
                         f"{tree[layers[0]]['kernel'].shape} ... {tree[layers[-1]]['kernel'].shape}")
    return jax.tree.map(jnp.asarray, tree)


def save_params(params: Any, path: str) -> None:
    """Write ``params`` with ``flax.serialization.msgpack_serialize``."""
    from flax import serialization

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))


def _versions() -> dict[str, str]:
    import flax
    import jaxlib

    return {"python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "flax": flax.__version__, "numpy": np.__version__}


def _floats(text: str) -> list[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, got {text!r}")
    return vals


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.sharpness_report",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--params", help="msgpack params file (flax.serialization.msgpack_serialize); "
                   "if omitted, the model is trained first")
    p.add_argument("--model", default="mlp", choices=MODELS)
    p.add_argument("--out", default="sharpness_report", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, nargs="+", default=[32], help="MLP hidden sizes (training)")
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--save-params", help="write the (trained) params here (msgpack)")
    p.add_argument("--batch-size", type=int, default=256, help="measurement batch size")
    p.add_argument("--trace-samples", type=int, default=500, help="max Hutchinson probes")
    p.add_argument("--trace-rtol", type=float, default=0.02, help="stop at stderr <= rtol*|trace|")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--lanczos-iters", type=int, default=60)
    p.add_argument("--slq-runs", type=int, default=4)
    p.add_argument("--rho", type=_floats, default=[0.05, 0.1, 0.2],
                   help="SAM radii for the approximation ratio (comma-separated)")
    p.add_argument("--ascent-steps", type=int, default=20)
    p.add_argument("--rel-radii", type=_floats, default=[0.0, 0.01, 0.02, 0.05, 0.1, 0.2],
                   help="perturbation norms as fractions of ||w|| (comma-separated)")
    p.add_argument("--gap-samples", type=int, default=16)
    p.add_argument("--grid", type=int, default=51, help="landscape points per axis")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.params and not os.path.isfile(args.params):
        p.error(f"--params: no such file: {args.params}")
    for name in ("train_steps", "batch_size", "trace_samples", "top_k", "lanczos_iters",
                 "slq_runs", "ascent_steps", "gap_samples", "grid"):
        minimum = 0 if name == "train_steps" else (3 if name == "grid" else 1)
        if getattr(args, name) < minimum:
            p.error(f"--{name.replace('_', '-')} must be >= {minimum}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the report; returns the report dict (also written to ``OUT/report.json``)."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    bar = not args.no_progress
    os.makedirs(args.out, exist_ok=True)
    train, test = load_digits_split(args.seed)

    if args.params:
        params = load_params(args.params)
        hidden = [int(params[f"Dense_{i}"]["kernel"].shape[1]) for i in range(len(params) - 1)]
        source = {"params_file": os.path.abspath(args.params)}
    else:
        hidden = list(args.hidden)
        source = {"trained_steps": args.train_steps, "optimizer": "sgd(lr=0.1, momentum=0.9)",
                  "train_batch_size": 64}
    model = make_mlp(hidden)
    loss_fn = make_loss(model)
    if not args.params:
        params = train_mlp(model, loss_fn, train, args.train_steps, args.seed)
    if args.save_params:
        save_params(params, args.save_params)

    n = len(train["y"])
    batches = [{"x": train["x"][i:i + args.batch_size], "y": train["y"][i:i + args.batch_size]}
               for i in range(0, n, args.batch_size)]
    op = S.HessianOperator(loss_fn, params, batches=batches, weighting="size")
    key = jax.random.key(args.seed)
    k_tr, k_lz, k_slq, k_gap, k_fil, k_l1, k_l2, k_cal = jax.random.split(key, 8)
    w_norm = float(jnp.linalg.norm(op.flat_params))
    report: dict[str, Any] = {
        "model": {"name": args.model, "hidden": hidden, "num_params": op.dim, "weight_norm": w_norm,
                  **source},
        "data": {"dataset": "sklearn load_digits (8x8), train split", "num_examples": n,
                 "num_batches": len(batches), "batch_size": args.batch_size, "weighting": "size",
                 "mode": "evaluation (no BatchNorm/dropout in this model)"},
    }
    report["train_loss"], report["train_accuracy"] = evaluate(model, loss_fn, params, train)
    report["test_loss"], report["test_accuracy"] = evaluate(model, loss_fn, params, test)

    tr = S.hutchinson_trace(op, key=k_tr, max_samples=args.trace_samples, rtol=args.trace_rtol,
                            progress_bar=bar)
    report["hessian_trace"] = {"estimate": tr.trace, "stderr": tr.stderr,
                               "num_samples": tr.num_samples, "converged": tr.converged,
                               "probe": "rademacher", "rtol": args.trace_rtol}
    eig = S.lanczos_eigenvalues(op, key=k_lz, k=args.top_k, num_iters=args.lanczos_iters,
                                progress_bar=bar)
    report["top_eigenvalues"] = {"method": "lanczos (full reorthogonalisation)",
                                 "values": eig.eigenvalues.tolist(),
                                 "residual_bounds": eig.residuals.tolist(),
                                 "num_iters": eig.num_hvps, "converged": eig.converged}
    dens = S.slq_density(op, key=k_slq, num_runs=args.slq_runs, num_iters=args.lanczos_iters,
                         progress_bar=bar)
    report["spectral_density"] = {"num_runs": args.slq_runs, "num_iters": int(dens.nodes.shape[1]),
                                  "mean_eigenvalue": dens.mean(), "trace_estimate": dens.trace(),
                                  "min_node": float(dens.nodes.min()),
                                  "max_node": float(dens.nodes.max())}
    nt = S.normalized_hessian_trace(op, trace=tr)
    report["normalized_trace"] = {"value": nt.value, "stderr": nt.stderr,
                                  "grad_norm": nt.grad_norm,
                                  "definition": "Tr(H) / ||grad L|| (CR-SAM)"}
    report["sam_approximation_ratio"] = []
    for rho in args.rho:
        if rho <= 0:
            continue
        sa = S.sam_approximation_ratio(op, rho=rho, num_steps=args.ascent_steps)
        report["sam_approximation_ratio"].append(
            {"rho": rho, "ratio": sa.ratio, "sam_gap": sa.sam_gap, "best_gap": sa.best_gap,
             "best_step": int(np.argmax(sa.gaps)) + 1, "num_steps": args.ascent_steps})

    radii = np.asarray(args.rel_radii) * w_norm
    unit_filter = float(jnp.linalg.norm(op.ravel(S.filter_wise_noise(k_cal, params, 1.0))))
    curves = [
        S.random_perturbation_gaps(op, key=k_gap, scales=radii, kind="sphere",
                                   num_samples=args.gap_samples, trace=tr, progress_bar=bar),
        S.random_perturbation_gaps(op, key=k_gap, scales=radii / np.sqrt(op.dim), kind="gaussian",
                                   num_samples=args.gap_samples, trace=tr, progress_bar=bar),
        S.random_perturbation_gaps(op, key=k_fil, scales=radii / unit_filter, kind="filter",
                                   num_samples=args.gap_samples, progress_bar=bar),
        S.adversarial_perturbation_gaps(op, radii=radii, num_steps=args.ascent_steps,
                                        progress_bar=bar),
    ]
    report["perturbation_gaps"] = {
        "relative_radii": list(args.rel_radii),
        "note": ("sphere: ||eps|| = r; gaussian: N(0, sigma^2 I) with sigma = r / sqrt(d), "
                 "predicted = (sigma^2/2) Tr(H) (NSO); filter: RWP filter-wise noise with sigma "
                 "set so that E||eps|| ~ r; adversarial: best of multi-step ascent in ||eps|| <= r"),
        **{c.kind: c.to_dict() for c in curves},
    }

    coords = np.linspace(-1.0, 1.0, args.grid)
    l1 = S.loss_landscape_1d(op, key=k_l1, alphas=coords, progress_bar=bar)
    l2 = S.loss_landscape_2d(op, key=k_l2, alphas=coords, betas=coords, progress_bar=bar)
    report["landscape_1d"] = {"alphas": [-1.0, 1.0, args.grid], **l1.summary()}
    report["landscape_2d"] = {"grid": [args.grid, args.grid], "range": [-1.0, 1.0],
                              "directions": "filter-normalised Gaussian, 1-D leaves zero",
                              **l2.summary()}

    out = args.out
    report["plots"] = {
        "landscape_1d": plots.plot_landscape_1d(l1, os.path.join(out, "landscape_1d.png")),
        "landscape_2d": plots.plot_landscape_2d(
            l2, os.path.join(out, "landscape_2d.png"),
            title=f"digits MLP ({op.dim} params): 2-D loss landscape"),
        "landscape_surface": plots.plot_landscape_2d(l2, os.path.join(out, "landscape_surface.png"),
                                                     kind="surface"),
        "spectrum": plots.plot_spectral_density(dens, os.path.join(out, "spectrum.png"),
                                                eigenvalues=eig.eigenvalues),
        "gaps": plots.plot_gap_curves(curves, os.path.join(out, "gaps.png")),
    }
    report["seed"] = args.seed
    report["versions"] = _versions()
    report["elapsed_s"] = time.perf_counter() - t_start
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    print(f"wrote {os.path.join(out, 'report.json')}: trace {tr.trace:.4g} ± {tr.stderr:.2g}, "
          f"top eigenvalues {np.round(eig.eigenvalues, 4).tolist()}, "
          f"normalized trace {nt.value:.4g}, {report['elapsed_s']:.1f} s", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
