"""The module paths of the flat layout (every module at the package root) keep working after the move to folders.

Configs in the wild name classes by their old module (``class_path: xright_pl.checkpoint.XRightCheckpoint``) and
checkpoints pickle class paths (``xright_pl.lora.LoraSettings``): importing an old path gives the moved module
itself (the same object, so classes are identical and pickles load). Old modules whose name is now a folder
(``xright_pl.callbacks``, ``xright_pl.objectives``, ``xright_pl.models``) need no alias: the folder re-exports their
names. :func:`old_names` gives a class's old dotted paths, for ``torch.load(weights_only=True)``'s allowed types.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: Old module -> the module it is now; importing the old path gives the new module.
ALIASES: dict[str, str] = {
    "xright_pl.assets": "xright_pl.core.assets",
    "xright_pl.checkpoint": "xright_pl.callbacks.checkpoint",
    "xright_pl.cli": "xright_pl.commands.cli",
    "xright_pl.commandline": "xright_pl.core.commandline",
    "xright_pl.demo": "xright_pl.core.demo",
    "xright_pl.distributed": "xright_pl.training.distributed",
    "xright_pl.errors": "xright_pl.core.errors",
    "xright_pl.eval_callback": "xright_pl.callbacks.win_rate",
    "xright_pl.export": "xright_pl.inference.export",
    "xright_pl.fused": "xright_pl.objectives.fused",
    "xright_pl.generate": "xright_pl.inference.generate",
    "xright_pl.guards": "xright_pl.training.guards",
    "xright_pl.judge": "xright_pl.inference.judge",
    "xright_pl.lightning_private": "xright_pl.core.lightning_private",
    "xright_pl.lora": "xright_pl.models.lora",
    "xright_pl.losses": "xright_pl.objectives.losses",
    "xright_pl.metrics": "xright_pl.training.metrics",
    "xright_pl.module": "xright_pl.training.module",
    "xright_pl.optimum": "xright_pl.core.optimum",
    "xright_pl.progress": "xright_pl.callbacks.progress",
    "xright_pl.reference": "xright_pl.training.reference",
    "xright_pl.rng": "xright_pl.training.rng",
    "xright_pl.signals": "xright_pl.callbacks.signals",
    "xright_pl.startup": "xright_pl.commands.startup",
    "xright_pl.steps": "xright_pl.training.steps",
    "xright_pl.trajectory": "xright_pl.callbacks.trajectory",
    "xright_pl.types": "xright_pl.core.types",
}

#: Every moved module, old -> new (with the old modules that are now folders): what :func:`old_names` reads.
RENAMED: dict[str, str] = {
    "xright_pl.assets": "xright_pl.core.assets",
    "xright_pl.callbacks": "xright_pl.callbacks.summary",
    "xright_pl.checkpoint": "xright_pl.callbacks.checkpoint",
    "xright_pl.cli": "xright_pl.commands.cli",
    "xright_pl.commandline": "xright_pl.core.commandline",
    "xright_pl.demo": "xright_pl.core.demo",
    "xright_pl.distributed": "xright_pl.training.distributed",
    "xright_pl.errors": "xright_pl.core.errors",
    "xright_pl.eval_callback": "xright_pl.callbacks.win_rate",
    "xright_pl.export": "xright_pl.inference.export",
    "xright_pl.fused": "xright_pl.objectives.fused",
    "xright_pl.generate": "xright_pl.inference.generate",
    "xright_pl.guards": "xright_pl.training.guards",
    "xright_pl.judge": "xright_pl.inference.judge",
    "xright_pl.lightning_private": "xright_pl.core.lightning_private",
    "xright_pl.lora": "xright_pl.models.lora",
    "xright_pl.losses": "xright_pl.objectives.losses",
    "xright_pl.metrics": "xright_pl.training.metrics",
    "xright_pl.models": "xright_pl.models.build",
    "xright_pl.module": "xright_pl.training.module",
    "xright_pl.objectives": "xright_pl.objectives.plugins",
    "xright_pl.optimum": "xright_pl.core.optimum",
    "xright_pl.progress": "xright_pl.callbacks.progress",
    "xright_pl.reference": "xright_pl.training.reference",
    "xright_pl.rng": "xright_pl.training.rng",
    "xright_pl.signals": "xright_pl.callbacks.signals",
    "xright_pl.startup": "xright_pl.commands.startup",
    "xright_pl.steps": "xright_pl.training.steps",
    "xright_pl.trajectory": "xright_pl.callbacks.trajectory",
    "xright_pl.types": "xright_pl.core.types",
}


def old_names(cls: type) -> list[str]:
    """The dotted paths a class had before the move (``["xright_pl.lora.LoraSettings"]`` for ``LoraSettings``)."""
    return [f"{old}.{cls.__qualname__}" for old, new in RENAMED.items() if new == cls.__module__]


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and loads it as the moved module (no second copy)."""

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001 - the finder protocol
        return importlib.util.spec_from_loader(fullname, self) if fullname in ALIASES else None

    def create_module(self, spec):  # noqa: ANN001
        warnings.warn(
            f"{spec.name} moved to {ALIASES[spec.name]}: import it from there (or its public name from xright_pl)",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(ALIASES[spec.name])

    def exec_module(self, module) -> None:  # noqa: ANN001 - already executed as the new module
        pass

    def get_code(self, fullname: str):  # noqa: ANN201 - ``python -m xright_pl.<old>`` runs the new module
        new = ALIASES[fullname]
        return importlib.util.find_spec(new).loader.get_code(new)


# First on the path: an old name must not be found as anything else (``xright_pl/assets/`` is also a data folder).
if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())
