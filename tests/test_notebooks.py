"""The notebooks run end to end with their small settings (PNAPO_NOTEBOOK_SMALL=1), as a reader's kernel runs them:
from notebooks/, on one CPU device."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str, workdir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run notebooks/`name` in a fresh kernel; every cell's text output, joined."""
    monkeypatch.setenv("PNAPO_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("PNAPO_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the kernel inherits the env: no fake devices, as for a reader
    monkeypatch.delenv("PNAPO_ABLATION_RESULTS", raising=False)
    monkeypatch.delenv("PNAPO_STRAIGHTNESS_RESULTS", raising=False)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no picture shown"
    return "".join(o.get("text", "") for o in outputs)


def test_quickstart(tmp_path, monkeypatch):
    text = execute("quickstart.ipynb", tmp_path, monkeypatch)
    assert "SMALL=True" in text
    assert "held-out reward" in text and "win rate vs base" in text and "fidelity" in text
    for name in ("world.png", "samples.png", "curves.png", "metrics.jsonl", "transformer/config.json"):
        assert (tmp_path / name).exists(), name


def test_ablation(tmp_path, monkeypatch):
    text = execute("ablation.ipynb", tmp_path, monkeypatch)
    assert "SMALL=True" in text and "picked beta" in text
    assert (tmp_path / "results.json").exists() and (tmp_path / "frontier.png").exists()
