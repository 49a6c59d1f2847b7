"""Execute the Colab notebooks (``colab/*.ipynb``) with nbclient, as CI does.

    python -m experiments.run_notebooks                    # run all three with their small CPU setting
    python -m experiments.run_notebooks --write            # ... and save the outputs into the notebooks
    python -m experiments.run_notebooks colab/sharpness.ipynb --set STEPS=2000 --set GRID=51

Each notebook's cell tagged ``parameters`` holds its defaults (the small CPU setting); ``--set NAME=VALUE``
adds a cell after it that overrides them (papermill's convention, without needing papermill). A cell
that raises stops the run with ``nbclient``'s ``CellExecutionError`` naming the cell.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = tuple(ROOT / "colab" / f"{name}.ipynb" for name in ("quickstart", "reproduce_cifar", "sharpness"))


def _with_overrides(nb: Any, overrides: Mapping[str, Any]) -> Any:
    import nbformat

    if not overrides:
        return nb
    index = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), None)
    if index is None:
        raise ValueError("the notebook has no cell tagged 'parameters' to override")
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in overrides.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)
    return nb


def execute(path: str | Path, *, overrides: Mapping[str, Any] | None = None, write: bool = False,
            timeout: int = 1200, cwd: str | Path = ROOT) -> Any:
    """Runs every cell of the notebook at ``path`` in a fresh ``python3`` kernel; returns the notebook.

    Args:
      path: the ``.ipynb`` file.
      overrides: parameter values injected after the ``parameters`` cell.
      write: save the executed notebook (with outputs) back to ``path``.
      timeout: seconds allowed per cell.
      cwd: working directory of the kernel (the repository root, so ``experiments`` imports).

    Raises:
      nbclient.exceptions.CellExecutionError: when a cell raises.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = _with_overrides(nbformat.read(str(path), as_version=4), overrides or {})
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    if write:
        nbformat.write(nb, str(path))
    return nb


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise SystemExit(f"error: --set expects NAME=VALUE, got {item!r}")
        try:
            out[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name] = value  # a bare string
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.run_notebooks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="*", type=Path, default=list(NOTEBOOKS))
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a parameter")
    p.add_argument("--write", action="store_true", help="save the outputs into the notebooks")
    args = p.parse_args(argv)
    overrides = _parse_set(args.set)
    for path in args.notebooks:
        execute(path, overrides=overrides, write=args.write)
        print(f"ran {path}{' (outputs saved)' if args.write else ''}", file=sys.stderr)


if __name__ == "__main__":
    main()
