"""Starts the ``kerastl`` command (the console script's entry point).

It lives outside the ``kerastl`` package on purpose: importing any module of
a package runs the package's ``__init__`` first, and ``import kerastl``
imports Keras and TensorFlow (seconds, and TensorFlow's start-up log lines).
Here the package is imported lazily, so ``kerastl --help``, ``--version``
and ``zoo list`` answer at once; the commands that build models import the
full API (:func:`kerastl.cli.main` does). TensorFlow's C++ logging is
silenced before anything can import it (``TF_CPP_MIN_LOG_LEVEL``, unless
you set it yourself).

This is the console script's entry point only: in a Python process that
goes on to use kerastl, call :func:`kerastl.cli.main` instead (after
``kerastl_cli.main`` the package stays lazy, so its classes are registered
with Keras only once one of its names is used).
"""

import os

# Read by kerastl/__init__.py while main() imports the package.
LAZY_PACKAGE = False


def main(argv=None):
    global LAZY_PACKAGE
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    LAZY_PACKAGE = True
    try:
        from kerastl import cli
    finally:
        LAZY_PACKAGE = False
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
