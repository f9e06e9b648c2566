"""Every tutorial notebook runs end to end in offline mode (KERASTL_OFFLINE=1).

On Colab the same cells use ImageNet weights and Hub handles; here they use
the bundled data and kerastl's offline pretrained CNN, so no notebook can
rot. Each notebook asserts the result it teaches (an accuracy above chance
by a stated margin, a cache hit that really hits), so a notebook that stops
teaching fails here, not only one that crashes.
"""

from pathlib import Path

import pytest

# One worker runs this module (pytest-xdist), and its costly fixtures are
# session-scoped: computed once, however the worker interleaves modules.
pytestmark = pytest.mark.xdist_group("tutorials")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))


def test_five_tutorials_each_with_a_colab_badge():
    import nbformat

    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]
    for path in NOTEBOOKS:
        first = nbformat.read(path, as_version=4).cells[0].source
        assert "colab.research.google.com/assets/colab-badge.svg" in first
        assert f"tutorials/{path.name})" in first


@pytest.fixture(scope="session")
def cache(pretrained_cache):
    """One KERASTL_CACHE_DIR for every notebook (and the end-to-end test,
    in the same xdist group): the offline pretrained CNN is trained once."""
    return pretrained_cache


def run_notebook(book, monkeypatch, tmp_path, cache):
    """Executes ``book`` offline; returns its error outputs."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("KERASTL_OFFLINE", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("KERASTL_CACHE_DIR", str(cache))
    # The tutorials write into tempfile.mkdtemp() folders (on Colab the
    # machine is thrown away); here they go under tmp_path, not /tmp.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    try:
        NotebookClient(book, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}
                       ).execute()
    except CellExecutionError:
        pass  # the error output is in the cell
    return [o for c in book.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_offline(path, monkeypatch, tmp_path, cache):
    import nbformat

    book = nbformat.read(path, as_version=4)
    errors = run_notebook(book, monkeypatch, tmp_path, cache)
    assert not errors, errors[0].get("evalue")


@pytest.mark.slow
def test_a_notebook_that_stops_teaching_fails(monkeypatch, tmp_path, cache):
    """Tutorial 1 with its features replaced by noise: it still runs, but
    its asserted probe accuracy is not met, and the check says so."""
    import nbformat

    book = nbformat.read(TUTORIALS / "01_feature_extraction.ipynb",
                         as_version=4)
    probe = [i for i, c in enumerate(book.cells)
             if "kerastl.LinearProbe(" in c.source][0]
    book.cells.insert(probe, nbformat.v4.new_code_cell(
        "rng = np.random.default_rng(0)\n"
        "f_train = rng.normal(size=f_train.shape)\n"
        "f_val = rng.normal(size=f_val.shape)"))
    errors = run_notebook(book, monkeypatch, tmp_path, cache)
    assert errors and errors[0]["ename"] == "AssertionError"
    assert "pretrained features should separate" in errors[0]["evalue"]
