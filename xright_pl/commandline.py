"""The command that resumes this run, for the messages that tell a user how to go on."""

from __future__ import annotations

import os
import shlex
import sys


def _is_cli(argv: list[str]) -> bool:
    prog = os.path.basename(argv[0]) if argv else ""
    return prog in ("__main__.py", "xright-pl", "xright_pl") and len(argv) > 1 and argv[1] == "fit"


def resume_command(argv: list[str] | None = None) -> str:
    """``python -m xright_pl fit ... --ckpt_path last`` for the command line this process was started with
    (any ``--ckpt_path`` given replaced); outside the command line, the equivalent Python call."""
    argv = list(sys.argv if argv is None else argv)
    if not _is_cli(argv):
        return "trainer.fit(model, datamodule=data, ckpt_path='last') with the same Trainer settings"
    args, skip = [], False
    for a in argv[2:]:
        if skip:
            skip = False
            continue
        if a == "--ckpt_path":
            skip = True
            continue
        if a.startswith("--ckpt_path="):
            continue
        args.append(a)
    return shlex.join(["python", "-m", "xright_pl", "fit", *args, "--ckpt_path", "last"])
