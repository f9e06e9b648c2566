"""Every tutorial notebook runs end to end in offline mode (KERASTL_OFFLINE=1).

On Colab the same cells use ImageNet weights and Hub handles; here they use
the bundled data and small models, so no notebook can rot.
"""

from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))


def test_five_tutorials_each_with_a_colab_badge():
    import nbformat

    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]
    for path in NOTEBOOKS:
        first = nbformat.read(path, as_version=4).cells[0].source
        assert "colab.research.google.com/assets/colab-badge.svg" in first
        assert f"tutorials/{path.name})" in first


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_offline(path, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("KERASTL_OFFLINE", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("KERASTL_CACHE_DIR", str(tmp_path / "cache"))
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in book.cells if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
