"""MkDocs hooks of kerastl's site (mkdocs.yml, ``hooks:``).

* The site's home page is the README itself, so that the landing page and
  the repository's front page cannot drift apart.
* Links are written for the repository, so that every page also reads on
  GitHub: the README links ``docs/zoo.md``, a page in docs/ links
  ``../SECURITY.md`` or ``../tutorials/...``. On the site, a link to a
  repository file that the site carries is rewritten to its page:
  ``docs/X`` is ``X``, the README is the home page, SECURITY.md is
  security.md, tutorials/ is tutorials/ (docs/tutorials links to it). A link
  to any other file outside docs/ is left alone, and the strict build fails
  on it.
"""

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]

# Repository files outside docs/ and their pages on the site.
SITE_PAGES = {"README.md": "index.md", "SECURITY.md": "security.md"}
SITE_FOLDERS = ("tutorials/",)

LINK = re.compile(r"\]\(([^)\s]+)\)")


def site_link(target, repo_page, site_page):
    """``target`` of a link on ``repo_page`` (its path in the repository) as
    a link on ``site_page`` (its path in docs/), or None: leave it."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(
            ("#", "/")):
        return None  # a URL, an anchor on the page, an absolute path
    path, _, anchor = target.partition("#")
    resolved = posixpath.normpath(posixpath.join(
        posixpath.dirname(repo_page), path))
    if resolved.startswith("docs/"):
        on_site = resolved[len("docs/"):]
    elif resolved in SITE_PAGES:
        on_site = SITE_PAGES[resolved]
    elif resolved.startswith(SITE_FOLDERS):
        on_site = resolved
    else:
        return None
    link = posixpath.relpath(on_site, posixpath.dirname(site_page) or ".")
    return link + (f"#{anchor}" if anchor else "")


def on_files(files, config):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "index.md", content=text))
    return files


def on_page_markdown(markdown, page, config, files):
    site_page = page.file.src_uri
    repo_page = "README.md" if site_page == "index.md" else \
        "docs/" + site_page

    def relink(match):
        new = site_link(match.group(1), repo_page, site_page)
        return match.group(0) if new is None else f"]({new})"

    return LINK.sub(relink, markdown)
