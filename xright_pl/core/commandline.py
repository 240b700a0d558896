"""The command that resumes this run, for the messages that tell a user how to go on."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

_current: list[str] | None = None  # the arguments of the command being run by xright_pl.commands.cli.run


@contextmanager
def running(args: Sequence[str]) -> Iterator[None]:
    """Record ``args`` (``["fit", ...]``) as the command being run, for :func:`resume_command`."""
    global _current
    previous, _current = _current, list(args)
    try:
        yield
    finally:
        _current = previous


def _args_from_sys_argv() -> list[str] | None:
    prog = os.path.basename(sys.argv[0]) if sys.argv else ""
    return sys.argv[1:] if prog in ("__main__.py", "xright-pl", "xright_pl") else None


def resume_command(args: Sequence[str] | None = None) -> str:
    """``python -m xright_pl fit ... --ckpt_path last`` for a ``fit`` command's arguments (default: the command
    being run, else this process's command line), any ``--ckpt_path`` given replaced; for a fit that is not a
    command, the equivalent Python call."""
    if args is None:
        args = _current if _current is not None else _args_from_sys_argv()
    if not args or args[0] != "fit":
        return "trainer.fit(model, datamodule=data, ckpt_path='last') with the same Trainer settings"
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--ckpt_path":
            skip = True
            continue
        if a.startswith("--ckpt_path="):
            continue
        kept.append(a)
    return shlex.join(["python", "-m", "xright_pl", *kept, "--ckpt_path", "last"])
