"""Reproduce a paper table: train its rows' configs and write the measured accuracy beside the paper's.

    python -m experiments.paper_tables --list
    python -m experiments.paper_tables --table rwp_cifar10 --dataset cifar10 --data-dir TFDS_DIR --seeds 3
    python -m experiments.paper_tables --table rwp_cifar10 --dataset cifar10-folder --data-dir DIR \\
        --rows resnet18_sgd resnet18_marwp --epochs 10 --subset 10000       # a shrunk run

On an accelerator the first form is the papers' protocol (the configs' schedules, every row, three seeds; each row's
config is ``<dataset>_<model>_<method>`` of ``python -m experiments.train --list-configs``, with the paper's
hyper-parameters). ``--epochs``, ``--subset`` (training examples, the first N of a fixed shuffle) and
``--batch-size`` shrink it; a shrunk run is NOT comparable with the paper's numbers, and the output says so.
Runs go through the training CLI's :func:`experiments.train_loop.train_one` on every visible device; each
row's runs are under ``<out>/runs/``; ``<out>/<table>.md`` and ``.json`` hold the table: per row the paper's
mean ± std (copied from the paper, with its source) and the measured mean ± std over ``--seeds`` seeds.

Tables: the RWP paper's Table 2 (SGD, SAM and the RWP family on VGG16-BN, ResNet-18, WRN-28-10) and CR-SAM's
Table 1 (its CR-SAM rows, basic augmentation). Not here: NSO (its paper fine-tunes a pretrained ResNet-34, no
from-scratch CIFAR rows) and the LETS CIFAR tables (not transcribed yet).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from experiments.bench_step import machine_description
from experiments.configs import get_config
from experiments.run_files import write_atomic
from experiments.train_data import load_data
from experiments.train_loop import train_one
from flatjax import data as fdata

RWP_SOURCE = ("Li et al., Revisiting Random Weight Perturbation for Efficiently Improving Generalization, "
              "TMLR 2024, Table 2")
CRSAM_SOURCE = ("Wu et al., CR-SAM: Curvature Regularized Sharpness-Aware Minimization, AAAI 2024, Table 1, "
                "Basic augmentation")
#: why the CR-SAM tables hold CR-SAM's rows only
CRSAM_NOTE = ("; its SGD/SAM rows used CR-SAM's own base setup (lr 0.05, batch 128, weight decay 5e-3), which "
              "flatjax's sgd/sam configs (the RWP paper's) do not: those rows are in rwp_*")


@dataclass(frozen=True)
class PaperTable:
    """One column of a paper's table: test accuracy (%) mean ± std per ``<model>_<method>`` row."""

    source: str
    dataset: str  # the configs' dataset: cifar10 / cifar100
    rows: dict[str, tuple[float, float]]


def _rwp_rows(column: int) -> dict[str, tuple[float, float]]:
    # model, method: (CIFAR-10 mean, std, CIFAR-100 mean, std), mean ± std over three trials
    table = {
        "vgg16bn": {"sgd": (94.96, .15, 75.43, .29), "sam": (95.43, .11, 76.74, .22), "rwp": (94.97, .07, 76.56, .10),
                    "arwp": (95.07, .23, 77.07, .21), "mrwp": (95.49, .16, 77.68, .14),
                    "marwp": (95.61, .23, 77.98, .19)},
        "resnet18": {"sgd": (96.10, .08, 78.10, .39), "sam": (96.56, .11, 80.48, .25), "rwp": (96.01, .31, 80.21, .14),
                     "arwp": (96.30, .03, 80.71, .24), "mrwp": (96.58, .09, 81.18, .09),
                     "marwp": (96.68, .13, 81.38, .12)},
        "wrn28_10": {"sgd": (96.85, .05, 82.51, .24), "sam": (97.35, .04, 84.68, .21), "rwp": (96.73, .12, 83.67, .14),
                     "arwp": (96.89, .11, 83.96, .09), "mrwp": (97.21, .04, 84.37, .11),
                     "marwp": (97.27, .09, 84.62, .15)},
    }
    return {f"{model}_{method}": v[2 * column: 2 * column + 2]
            for model, methods in table.items() for method, v in methods.items()}


def _crsam_rows(column: int) -> dict[str, tuple[float, float]]:
    # model: (CIFAR-10 mean, std, CIFAR-100 mean, std) of CR-SAM, basic augmentation, three seeds
    table = {"resnet18": (96.95, .13, 80.76, .21), "wrn28_10": (97.36, .15, 84.45, .09)}
    return {f"{model}_crsam": v[2 * column: 2 * column + 2] for model, v in table.items()}


TABLES = {
    "rwp_cifar10": PaperTable(RWP_SOURCE + ", CIFAR-10 column (ViT-S rows: no config here)", "cifar10",
                              _rwp_rows(0)),
    "rwp_cifar100": PaperTable(RWP_SOURCE + ", CIFAR-100 column (ViT-S rows: no config here)", "cifar100",
                               _rwp_rows(1)),
    "crsam_cifar10": PaperTable(CRSAM_SOURCE + ", CIFAR-10 column" + CRSAM_NOTE, "cifar10", _crsam_rows(0)),
    "crsam_cifar100": PaperTable(CRSAM_SOURCE + ", CIFAR-100 column" + CRSAM_NOTE, "cifar100", _crsam_rows(1)),
}


def subset(ds: fdata.ArrayDataset, n: int | None, seed: int = 0) -> fdata.ArrayDataset:
    """The first ``n`` examples of a fixed shuffle (all when ``n`` is None)."""
    if n is None or n >= len(ds):
        return ds
    return ds.subset(np.random.default_rng(seed).permutation(len(ds))[:n])


def mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def run_table(args: argparse.Namespace) -> dict:
    table = TABLES[args.table]
    rows = args.rows or list(table.rows)
    unknown = [r for r in rows if r not in table.rows]
    if unknown:
        raise SystemExit(f"error: --rows must be rows of {args.table} ({', '.join(table.rows)}), got "
                         f"{', '.join(unknown)}")
    dataset = args.dataset or table.dataset
    results, data = {}, None
    for row in rows:
        cfg = get_config(f"{table.dataset}_{row}")
        cfg = cfg.replace(dataset=dataset, **{k: v for k, v in (("epochs", args.epochs),
                                                                ("batch_size", args.batch_size)) if v})
        if data is None:  # every row reads the same data
            train, test, train_tf, eval_tf = load_data(cfg, args.data_dir)
            data = (subset(train, args.subset), subset(test, args.test_subset), train_tf, eval_tf)
        accs = []
        for seed in range(args.seeds):
            r = train_one(cfg, Path(args.out) / "runs" / f"{row}_seed{seed}", seed=seed, data=data,
                          progress=not args.no_progress, max_steps=args.steps)
            accs.append(100.0 * r["test_acc"])
        results[row] = accs
    return {"table": args.table, "source": table.source, "dataset": dataset, "epochs": args.epochs or "config's",
            "subset": args.subset, "seeds": args.seeds, "steps": args.steps,
            "shrunk": any(v is not None for v in (args.epochs, args.subset, args.test_subset, args.steps,
                                                   args.batch_size)),
            "rows": [{"row": row, "paper_mean": table.rows[row][0], "paper_std": table.rows[row][1],
                      "measured": accs} for row, accs in results.items()]}


def markdown(result: dict, command: str, seconds: float) -> str:
    lines = [f"# {result['table']}: measured beside the paper", "",
             f"Paper: {result['source']} (test accuracy %, mean ± std over 3 trials, the configs' schedules).",
             f"Command: `{command}`.", f"Machine: {machine_description()}, {jax.device_count()} device(s); "
             f"wall time {seconds:.0f} s.",
             f"Measured: {result['dataset']}, epochs: {result['epochs']}, "
             f"{'all' if result['subset'] is None else result['subset']} training examples, {result['seeds']} "
             "seed(s); mean ± sample std over seeds.", ""]
    if result["shrunk"]:
        lines += ["**A shrunk run: its accuracies are not comparable with the paper's.**", ""]
    lines += ["| row | paper | measured | seeds |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['paper_mean']:.2f} ± {r['paper_std']:.2f} | {mean_std(r['measured'])} "
                     f"| {len(r['measured'])} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.paper_tables", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the tables and their rows")
    p.add_argument("--table", choices=sorted(TABLES))
    p.add_argument("--rows", nargs="+", help="rows to run (default: all), e.g. resnet18_marwp")
    p.add_argument("--dataset", choices=("cifar10", "cifar100", "cifar10-folder"),
                   help="where the data comes from (default: the table's, through TFDS)")
    p.add_argument("--data-dir", help="TFDS data dir or CIFAR-10 image folder")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, help="shrink: epochs instead of the config's")
    p.add_argument("--subset", type=int, help="shrink: training examples")
    p.add_argument("--test-subset", type=int, help="shrink: test examples")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, help="stop each run after this many updates (smoke runs)")
    p.add_argument("--out", default="runs/paper_tables")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for name, t in sorted(TABLES.items()):
            print(f"{name}: {t.source}\n  rows: {', '.join(t.rows)}")
        return None
    if args.table is None:
        parser.error("--table is required (see --list)")
    for name in ("seeds", "epochs", "subset", "test_subset", "batch_size", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(args, name)}")
    if args.dataset == "cifar10-folder" and TABLES[args.table].dataset != "cifar10":
        parser.error(f"--dataset cifar10-folder holds CIFAR-10; {args.table} is a {TABLES[args.table].dataset} table")
    started = time.perf_counter()
    result = run_table(args)
    placeholders = {"--data-dir": "DIR", "--out": "OUT"}  # no machine paths in the results file
    command = "python -m experiments.paper_tables " + " ".join(
        placeholders.get(prev, a) for prev, a in zip([""] + argv, argv))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{args.table}.md", markdown(result, command, time.perf_counter() - started))
    write_atomic(out / f"{args.table}.json", json.dumps(result, indent=1))
    print((out / f"{args.table}.md").read_text())
    return result


if __name__ == "__main__":
    main()
