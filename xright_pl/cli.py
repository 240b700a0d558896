"""``python -m xright_pl <command>``.

Training commands (``fit``, ``validate``) are LightningCLI over :class:`~xright_pl.module.XRightModule` and
:class:`~xright_pl.data.module.JointDataModule`: every constructor argument is a ``--model.*`` / ``--data.*``
option, and ``--config file.yaml`` reads them from YAML. The other commands (``export``, ``generate``,
``judge``, ``optimum``) are plain functions whose typed signature and docstring are their ``--help``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from lightning.pytorch.cli import LightningCLI

from xright_pl.callbacks import RunSummary
from xright_pl.data.module import JointDataModule
from xright_pl.errors import XRightError
from xright_pl.metrics import TradeoffMetrics
from xright_pl.module import XRightModule
from xright_pl.trajectory import TrajectoryPlot

#: Commands that are not Trainer methods: name -> "module:function".
EXTRA_COMMANDS: dict[str, str] = {
    "export": "xright_pl.export:export",
    "generate": "xright_pl.generate:generate",
    "judge": "xright_pl.judge:judge",
    "optimum": "xright_pl.optimum:optimum",
}


class XRightCLI(LightningCLI):
    """LightningCLI with the library's default callbacks: a run summary at the end of ``fit`` (``--summary.*``),
    the gaps to the optima (``--tradeoff.*``) and the trajectory picture (``--trajectory.*``)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.add_lightning_class_args(TradeoffMetrics, "tradeoff")
        parser.add_lightning_class_args(TrajectoryPlot, "trajectory")

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}


def _extra_command(name: str) -> Callable:
    module, func = EXTRA_COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), func)


def run(args: list[str] | None = None) -> object:
    """Run a command; errors a user can fix propagate as :class:`~xright_pl.errors.XRightError`."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        from jsonargparse import CLI

        return CLI(_extra_command(argv[0]), args=argv[1:], as_positional=False)
    return XRightCLI(
        XRightModule,
        JointDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "description": "Joint SFT + DPO post-training (ALRIGHT, MAXRIGHT, Sequential, Mix). Commands: fit,"
            " validate, " + ", ".join(EXTRA_COMMANDS) + "."
        },
    )


def main(args: list[str] | None = None) -> object:
    """Entry point: like :func:`run`, but a user error is printed as one paragraph and exits with status 2."""
    try:
        return run(args)
    except Exception as e:
        user_error = _user_error(e)
        if user_error is None:
            raise
        print(f"xright_pl: error: {user_error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _user_error(e: BaseException | None) -> BaseException | None:
    """The :class:`XRightError` (or Lightning ``MisconfigurationException``: max_steps < -1, ...) behind ``e``.

    jsonargparse re-raises an error from a selector's or callback's constructor as a ``ValueError`` caused by it.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, (XRightError, MisconfigurationException)):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


if __name__ == "__main__":  # pragma: no cover
    main()
