"""`repair` command line: thin shims over ``repair.api`` and friends.

Layout: ``app`` (the Typer app, the ``@command`` error mapping, ``log``, ``emit_json``),
``options`` (every shared option, defined once, in bundles that build the library's options
objects), ``commands`` (eval, probe, fix, methods, demo), ``export_cmds`` (export, verify) and
``zoo_cmd`` (zoo).
This module registers the commands on ``app`` and is the console script's entry point.

Results go to stdout (``--json``: one JSON document), progress and warnings to
stderr. Exit codes: 0 ok, 1 gate or verification failed, 2 bad input/usage,
3 internal error.
"""
from __future__ import annotations

from . import commands, export_cmds, zoo_cmd  # noqa: F401  (register the commands, in --help's order)
from .app import app

__all__ = ["app", "main"]


#: set for the command line's own process before anything imports transformers / huggingface_hub: no
#: network at run time (every from_pretrained is local_files_only too; the library leaves os.environ alone)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def main() -> None:
    import os

    from .app import guard_streams, install_signal_handlers, settle_signals

    guard_streams()
    os.environ.update(OFFLINE_ENV)
    install_signal_handlers()
    try:
        app()
    finally:
        settle_signals()


if __name__ == "__main__":
    main()
