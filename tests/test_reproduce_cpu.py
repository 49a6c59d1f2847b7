"""The CPU reproduction protocol (experiments/reproduce_cpu.py) on a tiny generated CIFAR-style folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from experiments import configs, reproduce_cpu
from flatjax.data.image_folder import CIFAR10_CLASSES


def _folder(root, per_class):
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c, name in enumerate(CIFAR10_CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(25 * c, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.jpg")
    return root


def test_protocol_runs_and_reports_sharpness(tmp_path):
    data = _folder(tmp_path / "cifar", {"train": 4, "test": 2})
    out = tmp_path / "run"
    rows = reproduce_cpu.main(["--data-dir", str(data), "--methods", "sgd", "sam", "marwp", "--train-per-class",
                               "4", "--epochs", "1", "--batch-size", "10", "--sharpness-images", "16",
                               "--trace-probes", "3", "--eig-iters", "3", "--out", str(out), "--results",
                               str(tmp_path / "table.md"), "--no-progress"])
    assert [r["method"] for r in rows] == ["sgd", "sam", "marwp"]
    assert {r["steps"] for r in rows} == {4}  # m-ARWP: two batches per update, twice the epochs
    for r in rows:
        assert np.isfinite(r["train_loss"]) and 0.0 <= r["test_acc"] <= 1.0
        assert np.isfinite(r["trace"]) and r["trace_stderr"] >= 0 and np.isfinite(r["lambda_max"])
    table = (tmp_path / "table.md").read_text()
    assert table == (out / "results.md").read_text()
    assert "Command: `python -m experiments.reproduce_cpu --data-dir" in table and "| marwp | sigma=0.015" in table
    assert len(json.loads((out / "results.json").read_text())) == 3


def test_protocol_uses_the_paper_hyper_parameters():
    # the runnable methods: those with a paper config (LETS-ASAM included); the default leaves out LETS only
    assert reproduce_cpu.AVAILABLE == tuple(v for v in configs.DEFAULT_SWEEP
                                            if f"cifar10_resnet18_{v}" in configs.CONFIGS)
    assert {"sgd", "sam", "marwp", "lets", "lets_asam"} <= set(reproduce_cpu.AVAILABLE)
    assert reproduce_cpu.DEFAULT_METHODS == tuple(v for v in reproduce_cpu.AVAILABLE if not v.startswith("lets"))
    for method in reproduce_cpu.AVAILABLE:
        cfg = reproduce_cpu.protocol_config(method, epochs=3, batch_size=64, lr=0.05, weight_decay=5e-4)
        paper = configs.CONFIGS[f"cifar10_resnet18_{method}"]
        assert cfg.method == paper.method and cfg.method_kwargs == paper.method_kwargs
        assert cfg.sigma_increase == paper.sigma_increase
        assert cfg.epochs == (6 if paper.method in configs.TWO_BATCH_METHODS else 3)
        assert (cfg.model, cfg.dataset, cfg.lr, cfg.batch_size) == ("small_cnn", "cifar10-folder", 0.05, 64)


def test_a_method_without_a_paper_config_is_a_clear_error(tmp_path):
    missing = [m for m in configs.METHODS if m not in reproduce_cpu.AVAILABLE]
    assert missing  # e.g. gsam, samon: no CIFAR-10 ResNet-18 paper config
    with pytest.raises(ValueError, match=f"no config cifar10_resnet18_{missing[0]} for method '{missing[0]}'"):
        reproduce_cpu.protocol_config(missing[0], epochs=1, batch_size=8, lr=0.1, weight_decay=0.0)
    # refused before the data is looked for
    with pytest.raises(SystemExit, match=f"error: no config cifar10_resnet18_{missing[0]} .*experiments/configs.py"):
        reproduce_cpu.main(["--methods", "sam", missing[0], "--data-dir", str(tmp_path / "nowhere"),
                            "--out", str(tmp_path)])


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("FLATJAX_CIFAR10_DIR", raising=False)
    with pytest.raises(SystemExit, match="FLATJAX_CIFAR10_DIR"):
        reproduce_cpu.main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--epochs must be >= 1"):
        reproduce_cpu.main(["--epochs", "0", "--out", str(tmp_path)])
