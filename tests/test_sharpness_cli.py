"""End-to-end test of ``python -m experiments.sharpness_report`` (small settings)."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from experiments import sharpness_report as cli  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_cli_trains_measures_and_writes_report(tmp_path):
    out = tmp_path / "report"
    saved = tmp_path / "mlp.msgpack"
    report = cli.main([
        "--out", str(out), "--hidden", "8", "--train-steps", "60", "--batch-size", "2000",
        "--trace-samples", "20", "--lanczos-iters", "12", "--top-k", "2", "--slq-runs", "1",
        "--rho", "0.05", "--ascent-steps", "3", "--rel-radii", "0,0.02", "--gap-samples", "2",
        "--grid", "5", "--no-progress", "--save-params", str(saved),
    ])
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["hessian_trace"]["estimate"] == pytest.approx(report["hessian_trace"]["estimate"])
    assert on_disk["model"]["num_params"] == 64 * 8 + 8 + 8 * 10 + 10
    assert on_disk["data"]["num_batches"] == 1
    assert on_disk["train_accuracy"] > 0.5  # it did train
    top = on_disk["top_eigenvalues"]["values"]
    assert len(top) == 2 and top[0] >= top[1] > 0
    assert math.isfinite(on_disk["normalized_trace"]["value"])
    assert on_disk["normalized_trace"]["value"] == pytest.approx(
        on_disk["hessian_trace"]["estimate"] / on_disk["normalized_trace"]["grad_norm"])
    gaps = on_disk["perturbation_gaps"]
    assert set(gaps) >= {"sphere", "gaussian", "filter", "adversarial"}
    assert gaps["adversarial"]["mean_gap"][1] > gaps["sphere"]["max_gap"][1] > 0
    assert 0 < on_disk["sam_approximation_ratio"][0]["ratio"] <= 1
    assert on_disk["landscape_2d"]["num_points"] == 25
    for name in ("landscape_1d", "landscape_2d", "landscape_surface", "spectrum", "gaps"):
        with open(on_disk["plots"][name], "rb") as f:
            assert f.read(8) == PNG_MAGIC, name

    # the saved params file round-trips through --params loading
    loaded = cli.load_params(str(saved))
    model = cli.make_mlp([8])
    batch = {"x": np.zeros((2, 64), np.float32), "y": np.zeros(2, np.int32)}
    ref = cli.make_loss(model)(loaded, batch)
    assert np.isfinite(float(ref))
    assert jax.tree.structure(loaded) == jax.tree.structure(
        model.init(jax.random.key(0), batch["x"])["params"])


def test_cli_rejects_wrong_params_file(tmp_path):
    from flax import serialization

    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(serialization.msgpack_serialize({"conv": {"kernel": np.zeros((3, 3))}}))
    with pytest.raises(ValueError, match="--params"):
        cli.load_params(str(bad))
