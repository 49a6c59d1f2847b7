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
    assert [r["name"] for r in rows] == ["sgd", "sam", "marwp"]
    assert {r["steps"] for r in rows} == {4}  # m-ARWP: two batches per update, twice the epochs
    for r in rows:
        assert np.isfinite(r["train_loss"]) and 0.0 <= r["test_acc"] <= 1.0 and r["seeds"] == [0]
        assert np.isfinite(r["trace"]) and r["trace_se"] >= 0 and np.isfinite(r["lambda_max"])
        assert r["test_acc_se"] is None  # one seed: no spread to report
        assert r["test_acc_binomial_se"] == pytest.approx(np.sqrt(r["test_acc"] * (1 - r["test_acc"]) / 20))
    table = (tmp_path / "table.md").read_text()
    assert table == (out / "results.md").read_text()
    assert "Command: `python -m experiments.reproduce_cpu --data-dir DIR" in table and "| marwp | sigma=0.015" in table
    assert str(tmp_path) not in table
    stored = json.loads((out / "results.json").read_text())
    assert len(stored["methods"]) == 3 and len(stored["runs"]) == 3


def test_seeds_equal_data_small_images_and_a_kept_reading(tmp_path):
    """``--seeds``: the seeded methods run once per seed and report mean ± standard error (checked against
    the runs); ``marwp_equal_data`` makes SGD's updates from SGD's data; ``--image-size 16``; a re-run keeps
    the hand-written reading of the results file."""
    data = _folder(tmp_path / "cifar", {"train": 4, "test": 2})
    results = tmp_path / "table.md"
    results.write_text("old table\n## Reading\n\nhand-written\n")
    argv = ["--data-dir", str(data), "--methods", "sgd", "marwp", "marwp_equal_data", "--seeds", "2", "--seeded",
            "sgd", "--train-per-class", "4", "--epochs", "1", "--batch-size", "10", "--image-size", "16",
            "--augment", "none", "--sharpness-images", "8", "--trace-probes", "2", "--eig-iters", "2",
            "--out", str(tmp_path / "run"), "--results", str(results), "--no-progress"]
    rows = {r["name"]: r for r in reproduce_cpu.main(argv)}
    assert rows["sgd"]["seeds"] == [0, 1] and rows["marwp"]["seeds"] == rows["marwp_equal_data"]["seeds"] == [0]
    runs = [r for r in json.loads((tmp_path / "run" / "results.json").read_text())["runs"] if r["name"] == "sgd"]
    accs = [r["test_acc"] for r in runs]
    assert rows["sgd"]["test_acc"] == pytest.approx(np.mean(accs))
    assert rows["sgd"]["test_acc_se"] == pytest.approx(np.std(accs, ddof=1) / np.sqrt(2))
    assert runs[0]["train_loss"] != runs[1]["train_loss"]  # the seeds differ
    # equal data: 40 images, batch 10 split in two halves of 5 -> 4 updates, like SGD's; m-ARWP: two batches
    # of 10 per update over twice the epochs -> 4 updates too, from twice the data
    assert rows["marwp_equal_data"]["steps"] == rows["sgd"]["steps"] == rows["marwp"]["steps"] == 4
    cfg = reproduce_cpu.protocol_config("marwp_equal_data", epochs=3, batch_size=64, lr=0.05, weight_decay=0.0)
    assert (cfg.batch_size, cfg.epochs, cfg.two_batches, cfg.method) == (32, 3, True, "marwp")
    text = results.read_text()
    assert "old table" not in text and text.endswith("## Reading\n\nhand-written\n")
    assert "16x16 pixels" in text and "| sgd | - | 2 |" in text and " ± " in text
    with pytest.raises(ValueError, match="splits the two batches"):
        reproduce_cpu.protocol_config("sam_equal_data", epochs=1, batch_size=8, lr=0.1, weight_decay=0.0)


def test_downsampling_averages_pixel_blocks():
    from flatjax.data import ArrayDataset

    img = np.arange(2 * 32 * 32 * 3, dtype=np.float64).reshape(2, 32, 32, 3) % 256
    ds = ArrayDataset(img.astype(np.uint8), np.array([0, 1], np.int32), ("a", "b"))
    small = reproduce_cpu.downsample(ds, 16)
    expected = img.astype(np.uint8).astype(np.float64).reshape(2, 16, 2, 16, 2, 3).mean(axis=(2, 4))
    assert small.image.shape == (2, 16, 16, 3) and small.image.dtype == np.uint8
    np.testing.assert_array_equal(small.image, np.round(expected).astype(np.uint8))
    with pytest.raises(ValueError, match="image_size must be one of"):
        reproduce_cpu.load_protocol_data(None, 1, image_size=12)


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
    with pytest.raises(SystemExit, match="no config cifar10_resnet18_sgdd"):  # a typo in --seeded, before any work
        reproduce_cpu.main(["--seeded", "sgdd", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--epochs must be >= 1"):
        reproduce_cpu.main(["--epochs", "0", "--out", str(tmp_path)])
