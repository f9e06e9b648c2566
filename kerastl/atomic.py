"""Folders that appear whole or not at all.

Exports, ``kerastl finetune`` / ``demo`` outputs and feature-cache entries
are written into a temporary folder beside their destination and renamed into
place at the end: a crash leaves the previous content, never half of a new
one.
"""

import contextlib
import os
import shutil
import tempfile

from kerastl.errors import KerastlError


@contextlib.contextmanager
def atomic_folder(path):
    """Yields a temporary folder to fill; it becomes ``path`` on success.

    When the block ends without an error the folder is renamed to ``path``
    (an existing folder there is replaced only then, see
    :func:`replace_folder`); on any error it is removed and the error
    propagates.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-",
                           dir=parent)
    try:
        yield tmp
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(tmp, path):
    """Renames ``tmp`` to ``path``; an old ``path`` goes only after that."""
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-",
                           dir=os.path.dirname(path))
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)  # put the previous content back
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_new_folder(path, hint, overwrite=False):
    """Refuses an output ``path`` that is a file, or a non-empty folder
    unless ``overwrite``; ``hint`` says what to do instead."""
    full = os.path.abspath(os.fspath(path))
    if os.path.exists(full) and (not os.path.isdir(full) or (
            os.listdir(full) and not overwrite)):
        raise KerastlError(
            f"Output folder {os.fspath(path)!r} exists and is not empty; "
            f"{hint}.")
