"""experiments.paper_tables: the smoke setting of a paper-table run (two rows, two seeds, a few updates on a
generated CIFAR-10-style folder) puts the paper's numbers and the measured ones side by side."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from experiments import paper_tables
from experiments.configs import get_config
from flatjax.data.image_folder import CIFAR10_CLASSES


def make_cifar_folder(root):
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("test", 1)):
        for c in CIFAR10_CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    return root


def test_smoke_table_has_paper_and_measured_columns(tmp_path):
    data = make_cifar_folder(tmp_path / "cifar")
    argv = ["--table", "rwp_cifar10", "--dataset", "cifar10-folder", "--data-dir", str(data), "--rows",
            "resnet18_sgd", "resnet18_marwp", "--seeds", "2", "--epochs", "1", "--batch-size", "4",
            "--steps", "2", "--out", str(tmp_path / "out"), "--no-progress"]
    result = paper_tables.main(argv)
    assert [r["row"] for r in result["rows"]] == ["resnet18_sgd", "resnet18_marwp"]
    assert all(len(r["measured"]) == 2 and all(0 <= a <= 100 for a in r["measured"]) for r in result["rows"])
    text = (tmp_path / "out" / "rwp_cifar10.md").read_text()
    assert "| resnet18_sgd | 96.10 ± 0.08 |" in text and "| resnet18_marwp | 96.68 ± 0.13 |" in text
    assert "Table 2" in text and "not comparable" in text and str(tmp_path) not in text
    stored = json.loads((tmp_path / "out" / "rwp_cifar10.json").read_text())
    assert stored["rows"][1]["paper_mean"] == 96.68 and stored["seeds"] == 2
    # each row ran its own config: m-ARWP's runs are m-ARWP's (two batches per update)
    cfg = json.loads((tmp_path / "out" / "runs" / "resnet18_marwp_seed1" / "metrics.json").read_text())["config"]
    assert cfg["method"] == "marwp" and cfg["seed"] == 1 and cfg["model"] == "resnet18"


@pytest.mark.parametrize("argv, expected", [
    (["--table", "rwp_cifar10", "--rows", "resnet18_gsam"], "--rows must be rows of rwp_cifar10"),
    (["--table", "rwp_cifar100", "--dataset", "cifar10-folder"], "holds CIFAR-10"),
    (["--table", "rwp_cifar10", "--seeds", "0"], "--seeds must be an integer >= 1"),
    (["--table", "nope"], "invalid choice"),
])
def test_bad_arguments_name_the_accepted_values(argv, expected, capsys):
    with pytest.raises(SystemExit) as err:
        paper_tables.main(argv)
    assert expected in str(err.value) + capsys.readouterr().err


def test_list_names_every_table_and_its_rows(capsys):
    paper_tables.main(["--list"])
    out = capsys.readouterr().out
    assert "rwp_cifar10" in out and "rwp_cifar100" in out and "wrn28_10_marwp" in out
    assert "crsam_cifar100" in out and "CR-SAM" in out and "resnet18_crsam" in out
    assert paper_tables.TABLES["crsam_cifar100"].rows == {"resnet18_crsam": (80.76, .21), "wrn28_10_crsam": (84.45, .09)}
    for table in paper_tables.TABLES.values():  # every row is a training config with the paper's settings
        for row in table.rows:
            cfg = get_config(f"{table.dataset}_{row}")
            assert f"{cfg.model.replace('_bn', 'bn')}_{cfg.method}" == row
