"""The Colab notebooks run top to bottom with their small CPU setting (the cells tagged ``parameters``),
and the committed copies carry the outputs of a real run."""

from __future__ import annotations

import json

import pytest

from experiments import run_notebooks


def _outputs(nb):
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


@pytest.mark.parametrize("path", run_notebooks.NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_its_small_setting(path):
    nb = run_notebooks.execute(path)  # raises CellExecutionError if any cell fails
    outputs = _outputs(nb)
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook should draw its plots"


@pytest.mark.parametrize("path", run_notebooks.NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_outputs_and_a_parameter_cell(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in code), "commit the notebook executed (run_notebooks --write)"
    assert sum("parameters" in c["metadata"].get("tags", []) for c in code) == 1
    assert "google.colab" in "".join(code[0]["source"]), "the first cell installs flatjax on Colab"
    assert any("image/png" in o.get("data", {}) for o in _outputs(nb))


def test_overrides_are_injected_after_the_parameter_cell(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("STEPS = 300")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), params, nbformat.v4.new_code_cell("y = STEPS")]
    out = run_notebooks._with_overrides(nb, {"STEPS": 5, "NAME": "a"})
    assert out.cells[2].source == "STEPS = 5\nNAME = 'a'" and out.cells[3].source == "y = STEPS"
    with pytest.raises(ValueError, match="parameters"):
        run_notebooks._with_overrides(nbformat.v4.new_notebook(), {"STEPS": 5})
