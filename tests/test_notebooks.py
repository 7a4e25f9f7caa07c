"""Executes each notebook top to bottom with LORA_JAX_SMALL=1 (small settings, seconds on a CPU)."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["quickstart", "rank_ablation", "understanding_updates", "variants"]

pytestmark = [pytest.mark.slow, pytest.mark.assets]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, monkeypatch):
    path = NOTEBOOKS / f"{name}.ipynb"
    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:  # committed without outputs
        assert cell.get("outputs", []) == [] and cell.get("execution_count") is None, f"{path} has outputs"
    monkeypatch.setenv("LORA_JAX_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
