"""Every notebook in examples/ runs top to bottom (nbclient, in a fresh kernel of this Python) against the local
swarm it starts itself; a cell that raises fails the test. The notebooks check their own results (the swarm's
tokens and image against the local model's)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def test_the_notebooks_the_readme_names_are_there():
    assert {path.name for path in NOTEBOOKS} >= {"quickstart.ipynb", "chat_session.ipynb", "t5.ipynb", "stable_diffusion.ipynb", "swarm_map.ipynb"}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    if path.stem in ("stable_diffusion", "swarm_map"):
        assert any("image/png" in output.get("data", {}) for output in outputs), "the notebook shows no image"
