"""``python -m xright_pl <command>``.

Training commands (``fit``, ``validate``) are LightningCLI over :class:`~xright_pl.XRightModule` and
:class:`~xright_pl.JointDataModule`: every constructor argument is a ``--model.*`` / ``--data.*``
option, and ``--config file.yaml`` reads them from YAML. The other commands (``export``, ``generate``,
``judge``, ``optimum``) are plain functions whose typed signature and docstring are their ``--help``.
"""

from __future__ import annotations

import importlib
import re
import sys
from argparse import ArgumentError
from collections.abc import Callable

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from xright_pl.callbacks.progress import StepProgress
from xright_pl.callbacks.signals import StopOnSignal, stop_on_signals
from xright_pl.callbacks.summary import RunSummary
from xright_pl.callbacks.trajectory import TrajectoryPlot
from xright_pl.commands import startup
from xright_pl.core.commandline import running
from xright_pl.core.errors import ConfigError, XRightError
from xright_pl.core.lightning_private import spawns_processes
from xright_pl.data.module import JointDataModule
from xright_pl.training.metrics import TradeoffMetrics
from xright_pl.training.module import XRightModule

#: Commands that are not Trainer methods: name -> "module:function".
EXTRA_COMMANDS: dict[str, str] = {
    "export": "xright_pl.inference.export:export",
    "generate": "xright_pl.inference.generate:generate",
    "judge": "xright_pl.inference.judge:judge",
    "optimum": "xright_pl.commands.optimum:optimum",
}


class XRightCLI(LightningCLI):
    """LightningCLI with the library's default callbacks: a run summary at the end of ``fit`` (``--summary.*``),
    the gaps to the optima (``--tradeoff.*``) and the trajectory picture (``--trajectory.*``)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.add_lightning_class_args(TradeoffMetrics, "tradeoff")
        parser.add_lightning_class_args(TrajectoryPlot, "trajectory")
        parser.add_lightning_class_args(StepProgress, "progress")

    def instantiate_trainer(self, **kwargs):
        """Lightning's trainer, with :class:`StepProgress` as its progress bar unless the progress bar is off
        (``--trainer.enable_progress_bar false``) or the config gives its own."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        own_bar = any(isinstance(c, ProgressBar) for c in trainer_config.get("callbacks") or [])
        if own_bar or trainer_config.get("enable_progress_bar") is False:
            parser = self._parser(self.subcommand)
            parser.callback_keys = [k for k in parser.callback_keys if k != "progress"]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        check_trainer_settings(self.trainer)
        self._claim = startup.claim(self.trainer)  # lock, version folder, write probe: before anything is written
        if not any(isinstance(c, StopOnSignal) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(StopOnSignal())  # last.ckpt at the step boundary on SIGTERM / Ctrl-C

    def _run_subcommand(self, subcommand: str) -> None:
        """The command, then what ``fit`` claimed given back (removed too when it failed before training)."""
        self._claim = None
        failed = True
        try:
            super()._run_subcommand(subcommand)
            failed = False
        finally:
            startup.release(self._claim, failed=failed)
            self._claim = None

    def _parse_ckpt_path(self) -> None:
        """Keep the command line's model settings when resuming. (LightningCLI would replace them with the
        checkpoint's, but only for a ``--ckpt_path`` that is a file, not for ``last``; the module instead warns
        about every setting that differs from the checkpoint's, whichever form the path takes.)"""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}


def check_trainer_settings(trainer) -> None:
    """Point Trainer-level accumulation and clipping to the module's own options (the module optimizes by hand,
    so Lightning refuses them, with advice to switch to automatic optimization that does not apply here)."""
    if spawns_processes(trainer):
        raise ConfigError(
            "--trainer.strategy ddp_spawn is not supported (the spawned processes cannot unpickle the run's"
            " callbacks and generators): use --trainer.strategy ddp, which starts the same processes from the"
            " command line."
        )
    if trainer.max_steps == 0:
        raise ConfigError(
            "--trainer.max_steps 0 trains nothing: give the number of optimizer steps (e.g. --trainer.max_steps"
            " 600), or -1 to train for --trainer.max_epochs epochs of the larger data set."
        )
    wrong = []
    if trainer.accumulate_grad_batches != 1:
        wrong.append(
            f"--trainer.accumulate_grad_batches {trainer.accumulate_grad_batches}: use --model.accumulate_grad_batches"
            f" {trainer.accumulate_grad_batches}"
        )
    if trainer.gradient_clip_val is not None:
        wrong.append(
            f"--trainer.gradient_clip_val {trainer.gradient_clip_val}: use --model.gradient_clip_val"
            f" {trainer.gradient_clip_val}"
        )
    if wrong:
        raise ConfigError(
            "gradient accumulation and clipping are options of the model, which steps its optimizer itself (one"
            " objective's micro-batches per step): " + "; ".join(wrong) + ", and remove the trainer setting."
        )


def _extra_command(name: str) -> Callable:
    module, func = EXTRA_COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), func)


def run(args: list[str] | None = None) -> object:
    """Run a command; errors a user can fix propagate as :class:`~xright_pl.core.errors.XRightError`."""
    argv = list(sys.argv[1:] if args is None else args)
    # `--help` shows the attribute docstrings of the data classes (--data.sft.*, --model.lora.*, ...).
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    if not argv:
        print(usage(), file=sys.stderr)
        raise SystemExit(2)  # as argparse does for a missing command
    if argv[0] in ("-h", "--help"):
        print(usage())
        return None
    if argv and argv[0] in EXTRA_COMMANDS:
        from jsonargparse import CLI

        return CLI(_extra_command(argv[0]), args=argv[1:], as_positional=False)
    with stop_on_signals(argv if argv and argv[0] == "fit" else None), running(argv):
        return _lightning_cli(args)


#: What the Trainer commands do, for :func:`usage` (the other commands' first docstring line is used).
TRAINER_COMMANDS = {
    "fit": "train a policy (LightningCLI: --config FILE, --model.*, --data.*, --trainer.*, --ckpt_path last)",
    "validate": "evaluate a checkpoint on the validation sets (--config FILE --ckpt_path PATH)",
}


def usage() -> str:
    """``python -m xright_pl --help``: every command with one line on what it does."""
    import inspect

    lines = [
        "usage: python -m xright_pl <command> [options]",
        "",
        "Joint SFT + DPO post-training (ALRIGHT, MAXRIGHT, Sequential, Mix).",
        "",
        "commands:",
    ]
    described = dict(TRAINER_COMMANDS)
    for name in EXTRA_COMMANDS:
        doc = inspect.getdoc(_extra_command(name)) or ""
        described[name] = doc.strip().splitlines()[0].rstrip(".") if doc.strip() else ""
    width = max(len(k) for k in described)
    lines += [f"  {k.ljust(width)}  {v}" for k, v in described.items()]
    lines += ["", "Run `python -m xright_pl <command> --help` for the options of a command."]
    return "\n".join(lines)


def _lightning_cli(args: list[str] | None) -> XRightCLI:
    return XRightCLI(
        XRightModule,
        JointDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "description": "Joint SFT + DPO post-training (ALRIGHT, MAXRIGHT, Sequential, Mix). Commands: fit,"
            " validate, " + ", ".join(EXTRA_COMMANDS) + ".",
            # A bad option raises (main() prints it as one paragraph) instead of printing the whole usage.
            "exit_on_error": False,
            "prog": "python -m xright_pl",
            # No abbreviations: `--trainer.max_step 10` is a typo, reported with "Did you mean", never a prefix.
            "allow_abbrev": False,
            **{cmd: {"exit_on_error": False, "allow_abbrev": False} for cmd in XRightCLI.subcommands()},
        },
    )


def main(args: list[str] | None = None) -> object:
    """Entry point: like :func:`run`, but a user error is printed as one paragraph and exits with status 2."""
    try:
        return run(args)
    except ArgumentError as e:
        print(f"xright_pl: error: {_argument_error(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except Exception as e:
        user_error = _user_error(e)
        if user_error is None:
            raise
        print(f"xright_pl: error: {user_error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


SELECTORS = ("xright_pl.Alright", "xright_pl.Maxright", "xright_pl.Sequential", "xright_pl.Mix", "xright_pl.Single")


def _argument_error(e: BaseException) -> str:
    """A command-line or config error from jsonargparse as one paragraph."""
    text = str(e)
    key = re.search(r'Parser key "([^"]+)"', text)
    bad_class = re.search(r"Problem with given class_path '([^']+)':\s*(.+)", text)
    if key and bad_class:
        path, reason = bad_class.group(1), bad_class.group(2).strip()
        hint = "the import path of a class"
        if key.group(1).endswith("selector"):
            hint = "one of " + ", ".join(SELECTORS) + ", or the import path of your own Selector subclass"
        return f"--{key.group(1)}: {path!r} cannot be used ({reason}). Give {hint}."
    unknown = _unknown_option(text)
    if unknown:
        return unknown
    bad_value = _bad_value(text)
    if bad_value:
        return bad_value
    message = " ".join(ln.strip(" -") for ln in text.splitlines() if ln.strip()).rstrip(".")
    return message + ". Run `python -m xright_pl <command> --help` for the options."


_HELP = "Run `python -m xright_pl <command> --help` for the options."


def _known_options(group: str) -> list[str]:
    """The option names of ``--model.*``, ``--data.*`` and ``--trainer.*`` (their constructors' arguments)."""
    import inspect

    import lightning.pytorch as pl

    target = {"model": XRightModule, "data": JointDataModule, "trainer": pl.Trainer}.get(group)
    if target is None:
        return []
    return [p for p in inspect.signature(target.__init__).parameters if p != "self"]


def _unknown_option(text: str) -> str | None:
    """An unknown option (a typo such as ``model.lamda``) as one sentence with the closest valid names."""
    import difflib

    found = re.search(r"does not accept option '([^']+)'", text) or re.search(r"unrecognized arguments: --(\S+)", text)
    if not found:
        return None
    key = found.group(1)
    group, _, name = key.partition(".")
    close = difflib.get_close_matches(name, _known_options(group), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(f'{group}.{c}' for c in close)}?" if close else ""
    said = " ".join(ln.strip(" -") for ln in text.splitlines() if ln.strip()).rstrip(".")
    return f"{said} (unknown option {key!r}).{hint} {_HELP}"


def _bad_value(text: str) -> str | None:
    """A value of the wrong type (``lr: abc``), named by its full option path, with the types expected."""
    keys = re.findall(r'Parser key "([^"]+)"', text)
    given = re.search(r"Given value: (.*?)(?:\. Got value|$)", text, re.S) or re.search(r"Got value: (.*?)\.?$", text)
    expected = re.findall(r"Expected a <class '([\w.]+)'>", text)
    if not keys or not given or not expected:
        return None
    path = keys[0] + "".join(f".init_args.{k}" for k in keys[1:])
    types = " or ".join(dict.fromkeys(t.rsplit(".", 1)[-1] for t in expected))
    return f"--{path}: {given.group(1).strip()!r} is not a valid value (expected {types}). {_HELP}"


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
