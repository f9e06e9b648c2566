"""Griffe extension for kerastl's API reference (mkdocs.yml, mkdocstrings).

* ``kerastl.<name>``: ``kerastl/__init__.py`` fills the package namespace
  at import time from its ``_API`` table, which static analysis cannot
  follow. This extension reads that table (without importing kerastl) and
  adds each name as an alias of the object it names, so that
  ``::: kerastl.load_backbone`` documents the public name users call.
* ``X.__doc__ = "..."`` after ``X = collections.namedtuple(...)`` is X's
  docstring (at runtime it is; static analysis does not see it).
* Public names without a docstring: a warning, so that
  ``mkdocs build --strict`` fails on them (tests/test_docs.py checks the
  same and that each public name has an entry in docs/api/).
* Sphinx roles in docstrings (``:func:`x```, ``:class:`~a.B```) are shown as
  code (``x``, ``B``): the docstrings are rendered as Markdown.
* reST's literal-block colons: a line ``Example::`` is shown as *Example:*
  and ``text::`` as ``text:`` (the indented block after it stays code).
* ``a, b: text`` in an ``Args:`` section (several parameters, one
  description) becomes one entry per parameter, each with that text, so
  that the Google-style parser checks every name against the signature.
"""

import ast
import inspect
import re
from pathlib import Path

import griffe

ROLE = re.compile(
    r":(?:py:)?(?:func|class|meth|attr|data|mod|exc|obj):`(~?)([^`]+)`")


def declared_api(init_path):
    """``(_API, _NAMESPACES)`` of ``kerastl/__init__.py``, read as data."""
    values = {}
    for node in ast.parse(Path(init_path).read_text(encoding="utf-8")).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in ("_API", "_NAMESPACES")):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    return values["_API"], values["_NAMESPACES"]


def namespace_names(module):
    """A namespace's public names: its ``__all__``, else the public names
    it defines (not those it imports)."""
    if module.exports is not None:
        return [str(name) for name in module.exports]
    return [name for name, member in module.members.items()
            if not name.startswith("_") and not member.is_alias
            and not member.is_module]


def public_paths(package):
    """Every public path of the griffe package ``kerastl``: ``kerastl.<name>``
    for each name of ``kerastl.__all__`` (the namespaces included) and
    ``kerastl.<namespace>.<name>`` for what each namespace exports."""
    api, namespaces = declared_api(package.filepath)
    paths = [f"kerastl.{name}" for name in list(api) + list(namespaces)]
    for namespace in namespaces:
        paths += [f"kerastl.{namespace}.{name}"
                  for name in namespace_names(package[namespace])]
    return paths


LITERAL_TITLE = re.compile(r"^(\s*)([A-Z][\w ]*)::\s*$", re.M)
LITERAL_END = re.compile(r"(\S)::\s*$", re.M)
ARGS = re.compile(r"^(\s*)(Args|Arguments|Parameters):\s*$")
GROUP = re.compile(r"^(\s+)(\w+(?:, \w+)+):(.*)$")


def _indent(line):
    return len(line) - len(line.lstrip())


def split_grouped_args(text):
    """``a, b: text`` items of Args sections as one item per name."""
    lines, out, i = text.split("\n"), [], 0
    section = None  # the indentation of the current Args header

    def continues(j, indent):  # line j is a continuation of the item
        if lines[j].strip():
            return _indent(lines[j]) > indent
        return j + 1 < len(lines) and bool(lines[j + 1].strip()) \
            and _indent(lines[j + 1]) > indent

    while i < len(lines):
        line = lines[i]
        header = ARGS.match(line)
        if header:
            section = len(header.group(1))
        elif line.strip() and section is not None and \
                _indent(line) <= section:
            section = None
        group = GROUP.match(line) if section is not None else None
        if group:
            body = [group.group(3)]
            while i + 1 < len(lines) and continues(i + 1, len(group.group(1))):
                i += 1
                body.append(lines[i])
            for name in group.group(2).split(", "):
                out.append(f"{group.group(1)}{name}:{body[0]}")
                out.extend(body[1:])
        else:
            out.append(line)
        i += 1
    return "\n".join(out)


def has_docstring(obj):
    return obj.docstring is not None and bool(obj.docstring.value.strip())


def missing_docstrings(package):
    """The public paths of ``package`` whose object has no docstring."""
    return [path for path in public_paths(package)
            if not has_docstring(package[path[len("kerastl."):]])]


def _show_role(match):
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _objects(obj):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


def _assigned_docstrings(module, loader):
    """Sets the docstrings a module assigns as ``X.__doc__ = "..."``."""
    for node in ast.parse(Path(module.filepath).read_text("utf-8")).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target = node.targets[0]
        if (isinstance(target, ast.Attribute) and target.attr == "__doc__"
                and isinstance(target.value, ast.Name)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
                and target.value.id in module.members
                and not module.members[target.value.id].is_alias):
            obj = module.members[target.value.id]
            obj.docstring = griffe.Docstring(
                inspect.cleandoc(node.value.value), lineno=node.lineno,
                parent=obj, parser=loader.docstring_parser,
                parser_options=loader.docstring_options)


class KerastlAPI(griffe.Extension):
    def on_package(self, *, pkg, loader, **kwargs):
        if pkg.name != "kerastl":
            return
        for obj in _objects(pkg):
            if obj.is_module and obj.filepath:
                _assigned_docstrings(obj, loader)
        api, namespaces = declared_api(pkg.filepath)
        for name, module in api.items():
            pkg.set_member(name, griffe.Alias(name, f"{module}.{name}",
                                              parent=pkg))
        pkg.exports = list(api) + list(namespaces)
        for obj in _objects(pkg):
            if obj.docstring is not None:
                text = ROLE.sub(_show_role, obj.docstring.value)
                text = LITERAL_TITLE.sub(r"\1*\2:*", text)
                text = LITERAL_END.sub(r"\1:", text)
                obj.docstring.value = split_grouped_args(text)
        for path in missing_docstrings(pkg):
            griffe.logger.warning(f"{path} is public but has no docstring "
                                  "(the API reference would show it empty)")
