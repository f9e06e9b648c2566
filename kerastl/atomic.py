"""Folders that appear whole or not at all, and never over a user's files.

Exports, ``kerastl finetune`` / ``demo`` outputs and feature-cache entries
are written into a temporary folder beside their destination and renamed into
place at the end: a crash leaves the previous content, never half of a new
one.

Replacing is guarded (:func:`check_destination`): kerastl writes a
``.kerastl`` marker file into every folder it produces and replaces only a
folder that carries it (a regular file, not a link, whose content kerastl
wrote and checks), and only when asked (``overwrite=True``). The working
directory, its parents, the home folder, a filesystem root and a symbolic
link are never replaced.

A writer killed midway leaves a temporary folder (``.<name>.tmp-<pid>-<8
characters>``), or the old copy of a replacement interrupted between its two
renames (``.<name>.old-<pid>-<8 characters>``). Each holds a
``.kerastl-partial`` file from the moment kerastl creates it; the next write
to the same destination removes such temporary folders and puts such an old
copy back. A folder with another name, without that file, or behind a link
is never touched.
"""

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile

from kerastl.errors import KerastlError

#: The file that marks a folder as written by kerastl.
MARKER = ".kerastl"
#: The file in every temporary and old folder kerastl makes while writing.
PARTIAL = ".kerastl-partial"
# A kerastl marker is a small JSON object; anything else is not one.
_MARKER_BYTES = 4096
# What tempfile.mkdtemp appends: 8 of these characters.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-"
                       r"[a-z0-9_]{8}$")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_marker(path):
    """The content of a kerastl marker file at ``path`` (a dict), or None
    when there is none there: no file, a link, a folder, something too
    large, not JSON, or JSON that kerastl did not write."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_size > _MARKER_BYTES:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict) or content.get("written_by") != \
            "kerastl":
        return None
    return content


def write_marker(path, **content):
    """Writes a kerastl marker file (what :func:`read_marker` accepts)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dict(written_by="kerastl", **content), f)


def written_by_kerastl(path):
    """Whether ``path`` is a folder (not a link) that kerastl wrote: its
    ``.kerastl`` marker is a regular file with kerastl's content."""
    path = os.fspath(path)
    return os.path.isdir(path) and not os.path.islink(path) and \
        read_marker(os.path.join(path, MARKER)) is not None


def _protected(path):
    """Why kerastl may never replace ``path`` (a string), or None."""
    real = os.path.realpath(path)
    cwd = os.path.realpath(os.getcwd())
    home = os.path.realpath(os.path.expanduser("~"))
    if os.path.dirname(real) == real:
        return "a filesystem root"
    if real == cwd:
        return "the working directory"
    if cwd.startswith(real.rstrip(os.sep) + os.sep):
        return "a parent of the working directory"
    if real == home:
        return "the home folder"
    return None


def check_destination(path, what="output", overwrite=False,
                      overwrite_hint="pass overwrite=True"):
    """Refuses a destination kerastl must not write or replace.

    Allowed: a path that does not exist, an empty folder, and, with
    ``overwrite``, a folder kerastl wrote earlier. Refused, whatever
    ``overwrite`` says: a file, the working directory or a parent of it,
    the home folder, a filesystem root, and a non-empty folder kerastl did
    not write.

    Args:
        what: how the message names the destination ("export folder").
        overwrite_hint: how the user asks to overwrite, in their terms
            (``"pass --overwrite"`` for the CLI).
    """
    shown = os.fspath(path)
    full = os.path.abspath(shown)
    reason = _protected(full)
    if reason:
        raise KerastlError(
            f"The {what} {shown!r} is {reason}; kerastl never writes over "
            f"it. Name a new folder inside it instead, e.g. "
            f"{os.path.join(shown, 'kerastl_output')!r}.")
    if os.path.islink(full):
        raise KerastlError(
            f"The {what} {shown!r} is a symbolic link (to "
            f"{os.readlink(full)!r}); kerastl writes only real folders. "
            "Name the folder itself, or a new one.")
    if not os.path.exists(full):
        return
    if not os.path.isdir(full):
        raise KerastlError(f"The {what} {shown!r} exists and is a file, not "
                           "a folder; choose another path.")
    if not os.listdir(full):
        return
    if not written_by_kerastl(full):
        raise KerastlError(
            f"The {what} {shown!r} exists, is not empty and was not written "
            f"by kerastl (it has no valid {MARKER} marker): kerastl does not "
            "replace folders it did not write. Choose a new folder, or move "
            "its files away first.")
    found = read_marker(os.path.join(full, MARKER)).get("what")
    if found is not None and found != what:
        # (overwrite replaces an earlier output of the same kind only: an
        # export never replaces a training run's folder, nor the reverse)
        raise KerastlError(
            f"The {what} {shown!r} holds a kerastl {found}, not an earlier "
            f"{what}; kerastl replaces only an earlier {what} there. Choose "
            f"a new folder, e.g. {os.path.join(shown, 'export')!r}.")
    if not overwrite:
        raise KerastlError(
            f"The {what} {shown!r} holds an earlier kerastl output; "
            f"{overwrite_hint} to replace it, or choose a new folder.")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _leftovers(path):
    """``[(kind, folder)]`` left beside ``path`` by kerastl writers that
    died: only folders named as kerastl names them, not links, holding
    kerastl's ``.kerastl-partial`` file of that kind."""
    parent, name = os.path.split(path)
    out = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return out
    for entry in entries:
        found = _LEFTOVER.match(entry)
        if not found or found.group("name") != name:
            continue
        folder = os.path.join(parent, entry)
        if os.path.islink(folder) or not os.path.isdir(folder):
            continue
        marker = read_marker(os.path.join(folder, PARTIAL))
        if marker is None or marker.get("kind") != found.group("kind"):
            continue  # not kerastl's: never touched
        pid = int(found.group("pid"))
        if pid != os.getpid() and _pid_alive(pid):
            continue  # another process is writing right now
        out.append((found.group("kind"), folder))
    return out


def _drop_partial(folder):
    """Removes kerastl's ``.kerastl-partial`` file from ``folder``."""
    try:
        os.remove(os.path.join(folder, PARTIAL))
    except FileNotFoundError:
        pass


def recover(path):
    """Cleans up after killed writers of ``path``.

    An old copy whose replacement was interrupted between the two renames
    goes back to ``path`` if ``path`` is missing; temporary folders of dead
    writers are removed. Only kerastl's own leftovers (see the module's
    docstring) are touched.
    """
    path = os.path.abspath(os.fspath(path))
    leftovers = _leftovers(path)
    olds = sorted((f for k, f in leftovers if k == "old"),
                  key=os.path.getmtime)
    if olds and not os.path.lexists(path):
        restored = olds.pop()
        os.rename(restored, path)
        _drop_partial(path)
    elif os.path.isdir(path) and not os.path.islink(path):
        # Killed right after a rename: the folder is complete, only the
        # marker of its writing is left in it.
        marker = read_marker(os.path.join(path, PARTIAL))
        pid = marker.get("pid") if marker is not None else None
        if isinstance(pid, int) and (pid == os.getpid() or
                                     not _pid_alive(pid)):
            _drop_partial(path)
    for kind, folder in leftovers:
        if kind == "tmp" or folder in olds:
            shutil.rmtree(folder, ignore_errors=True)


def temporary_folder(path, kind):
    """A new folder beside ``path`` named and marked as kerastl's ``kind``
    (``"tmp"`` or ``"old"``) leftover, honouring the umask."""
    parent, name = os.path.split(path)
    folder = tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-",
                              dir=parent)
    os.chmod(folder, 0o777 & ~_umask())  # mkdtemp makes it 0700
    write_marker(os.path.join(folder, PARTIAL), kind=kind, pid=os.getpid())
    return folder


@contextlib.contextmanager
def atomic_folder(path, what="output", overwrite=False,
                  overwrite_hint="pass overwrite=True", checked=True):
    """Yields a temporary folder to fill; it becomes ``path`` on success.

    The destination is checked first (:func:`check_destination`; skipped
    with ``checked=False``, for entries inside a kerastl cache, which need
    no marker). When the block ends without an error the folder gets the
    ``.kerastl`` marker (when checked) and is renamed to ``path`` (an existing folder there is replaced only then,
    see :func:`replace_folder`); on any error it is removed and the error
    propagates. Folders honour the umask.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    made = _missing_parents(parent)
    os.makedirs(parent, exist_ok=True)
    try:
        recover(path)
        if checked:
            check_destination(path, what, overwrite, overwrite_hint)
        tmp = temporary_folder(path, "tmp")
    except BaseException:
        _remove_empty(made)
        raise
    try:
        yield tmp
        if checked:
            write_marker(os.path.join(tmp, MARKER), what=what, format=1)
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)  # (a failed write leaves no new empty folders)
        raise
    _drop_partial(path)


def _missing_parents(folder):
    """The folders ``os.makedirs(folder)`` would create, deepest first."""
    made = []
    while folder and not os.path.lexists(folder):
        made.append(folder)
        up = os.path.dirname(folder)
        if up == folder:
            break
        folder = up
    return made


def _remove_empty(folders):
    """Removes ``folders`` (deepest first) while they are empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


def replace_folder(tmp, path):
    """Renames ``tmp`` to ``path``; an old ``path`` goes only after that.

    The old copy is marked as kerastl's before it is moved aside, so a kill
    between the two renames leaves it beside ``path`` where :func:`recover`
    (run by the next :func:`atomic_folder` on ``path``) puts it back.
    """
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    old = temporary_folder(path, "old")
    shutil.rmtree(old)  # only its name is needed
    write_marker(os.path.join(path, PARTIAL), kind="old", pid=os.getpid())
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)  # put the previous content back
        _drop_partial(path)
        raise
    shutil.rmtree(old, ignore_errors=True)
