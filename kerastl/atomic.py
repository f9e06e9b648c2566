"""Folders that appear whole or not at all, and never over a user's files.

Exports, ``kerastl finetune`` / ``demo`` outputs and feature-cache entries
are written into a temporary folder beside their destination and renamed into
place at the end: a crash leaves the previous content, never half of a new
one.

Replacing is guarded (:func:`check_destination`): kerastl writes a
``.kerastl`` marker file into every folder it produces and replaces only a
folder that carries it, and only when asked (``overwrite=True``). The
working directory, its parents, the home folder and a filesystem root are
never replaced. Leftovers of a killed write (a temporary folder, or the old
copy of a replacement interrupted between its two renames) are cleaned up,
or put back, by the next write to the same destination.
"""

import contextlib
import json
import os
import shutil
import tempfile

from kerastl.errors import KerastlError

#: The file that marks a folder as written by kerastl.
MARKER = ".kerastl"


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def written_by_kerastl(path):
    """Whether ``path`` is a folder that kerastl wrote (has the marker)."""
    return os.path.isfile(os.path.join(path, MARKER))


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
            f"by kerastl (it has no {MARKER} marker): kerastl does not "
            "replace folders it did not write. Choose a new folder, or move "
            "its files away first.")
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
    """``[(kind, folder)]`` left beside ``path`` by writers that died."""
    parent, name = os.path.split(path)
    out = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return out
    for entry in entries:
        for kind in ("tmp", "old"):
            prefix = f".{name}.{kind}-"
            if not entry.startswith(prefix):
                continue
            pid = entry[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and \
                    _pid_alive(int(pid)):
                continue  # another process is writing right now
            out.append((kind, os.path.join(parent, entry)))
    return out


def recover(path):
    """Cleans up after killed writers of ``path``.

    An old copy whose replacement was interrupted between the two renames
    goes back to ``path`` if ``path`` is missing; temporary folders of dead
    writers are removed.
    """
    path = os.path.abspath(os.fspath(path))
    leftovers = _leftovers(path)
    olds = sorted((f for k, f in leftovers if k == "old"),
                  key=os.path.getmtime)
    if olds and not os.path.exists(path):
        os.rename(olds.pop(), path)
    for kind, folder in leftovers:
        if kind == "tmp" or folder in olds:
            shutil.rmtree(folder, ignore_errors=True)


def _mkdtemp(path, kind):
    parent, name = os.path.split(path)
    folder = tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-",
                              dir=parent)
    os.chmod(folder, 0o777 & ~_umask())  # mkdtemp makes it 0700
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
    os.makedirs(parent, exist_ok=True)
    recover(path)
    if checked:
        check_destination(path, what, overwrite, overwrite_hint)
    tmp = _mkdtemp(path, "tmp")
    try:
        yield tmp
        if checked:
            with open(os.path.join(tmp, MARKER), "w") as f:
                json.dump({"written_by": "kerastl", "what": what}, f)
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(tmp, path):
    """Renames ``tmp`` to ``path``; an old ``path`` goes only after that.

    A kill between the two renames leaves the old copy beside ``path``;
    :func:`recover` (run by the next :func:`atomic_folder` on ``path``)
    puts it back.
    """
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    old = _mkdtemp(path, "old")
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)  # put the previous content back
        raise
    shutil.rmtree(old, ignore_errors=True)
