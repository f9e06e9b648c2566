"""The documentation site builds in strict mode, and documents the public API.

* ``mkdocs build --strict`` (run in this process, offline): any warning
  fails it: a broken link or anchor, an API entry that names nothing, a
  docstring parameter the signature lacks, a public name without a
  docstring (docs/_scripts/griffe_kerastl.py warns about those).
* Every public name (``kerastl.__all__`` and what each namespace exports)
  has a ``::: kerastl...`` entry in docs/api/*.md and a docstring.

Needs the docs packages (``pip install -e ".[docs]"``; the test extra
includes them).
"""

import inspect
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

import kerastl

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")
pytest.importorskip("mkdocs_jupyter")
griffe = pytest.importorskip("griffe")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_scripts"))
import griffe_kerastl  # noqa: E402  (docs/_scripts: the site's extension)

ENTRY = re.compile(r"^::: ([\w.]+)\s*$", re.M)


def build_site(site_dir, docs_dir=None):
    """Runs ``mkdocs build --strict``; returns the warnings it logged
    (an empty list: it built)."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort

    # Material's end-of-life notice is a print at import, not a warning;
    # it is off outside the mkdocs command anyway.
    os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")
    options = {"site_dir": str(site_dir), "strict": True}
    if docs_dir is not None:
        options["docs_dir"] = str(docs_dir)
    warnings = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("mkdocs")
    logger.addHandler(handler)
    try:
        build(load_config(str(ROOT / "mkdocs.yml"), **options))
    except Abort as abort:
        assert warnings, abort  # strict aborts only on counted warnings
    finally:
        logger.removeHandler(handler)
    return warnings


def test_the_site_builds_in_strict_mode(tmp_path):
    warnings = build_site(tmp_path / "site")
    assert not warnings, "\n".join(warnings)
    site = tmp_path / "site"
    for page in ["index.html", "zoo/index.html", "api/models/index.html",
                 "tutorials/index.html",
                 "tutorials/01_feature_extraction/index.html"]:
        assert (site / page).is_file(), page
    home = (site / "index.html").read_text()
    assert 'pip install -e ".[test]" &amp;&amp; python -m pytest -q' in \
        re.sub(r"<[^>]+>", "", home)  # the README's Quickstart, as written
    api = (site / "api" / "models" / "index.html").read_text()
    assert 'id="kerastl.load_backbone"' in api


def test_strict_mode_fails_on_a_broken_link_and_anchor(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs, symlinks=False)
    page = docs / "loading.md"
    page.write_text(page.read_text() + "\n[gone](no-such-page.md), "
                    "[there](zoo.md#no-such-section)\n")
    warnings = "\n".join(build_site(tmp_path / "site", docs_dir=docs))
    assert "no-such-page.md" in warnings, warnings
    assert "no-such-section" in warnings, warnings


# -- the public API and its reference entries -----------------------------------

def public_objects():
    """``{path: object}`` of every public name, as users import it."""
    paths = {f"kerastl.{name}": getattr(kerastl, name)
             for name in kerastl.__all__}
    namespaces = [name for name in kerastl.__all__
                  if inspect.ismodule(getattr(kerastl, name))]
    for namespace in namespaces:
        module = getattr(kerastl, namespace)
        names = getattr(module, "__all__", None) or [
            name for name, obj in vars(module).items()
            if not name.startswith("_")
            and getattr(obj, "__module__", None) == module.__name__]
        paths.update({f"kerastl.{namespace}.{name}": getattr(module, name)
                      for name in names})
    return paths


def reference_entries():
    """``{identifier: page}`` of every ``::: identifier`` in docs/api/."""
    return {name: page.name for page in sorted((DOCS / "api").glob("*.md"))
            for name in ENTRY.findall(page.read_text())}


def load_package():
    """kerastl as the API reference sees it (griffe, static, with the
    site's extension)."""
    extensions = griffe.load_extensions(
        str(DOCS / "_scripts" / "griffe_kerastl.py"))
    return griffe.load("kerastl", search_paths=[str(ROOT)],
                       extensions=extensions, resolve_aliases=False)


def test_every_public_name_has_a_reference_entry():
    public, entries = public_objects(), reference_entries()
    missing = [path for path, obj in public.items()
               if path not in entries
               # the same object under another public path (kerastl.DANN
               # is kerastl.adaptation.DANN) is documented once
               and not any(other in entries and public[other] is obj
                           for other in public)]
    assert not missing, ("public names without a `::: name` entry in "
                         "docs/api/*.md: " + ", ".join(missing))
    assert len(public) > 60, len(public)


def test_the_reference_and_the_package_agree_on_the_public_names():
    # The extension reads the public API without importing kerastl; it
    # must find what the package really exports.
    assert sorted(griffe_kerastl.public_paths(load_package())) == \
        sorted(public_objects())


def test_every_public_name_and_entry_has_a_docstring():
    package = load_package()
    missing = griffe_kerastl.missing_docstrings(package)
    missing += [name for name in reference_entries()
                if not griffe_kerastl.has_docstring(
                    package[name[len("kerastl."):]])]
    assert not missing, "no docstring: " + ", ".join(sorted(set(missing)))


def test_the_docstring_check_finds_a_planted_missing_docstring():
    package = load_package()
    package["freeze"].final_target.docstring = None
    package["datasets"]["DOMAINS"].docstring = None
    assert {"kerastl.freeze", "kerastl.datasets.DOMAINS"} <= \
        set(griffe_kerastl.missing_docstrings(package))
