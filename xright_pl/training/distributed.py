"""Cross-process checks and sharding helpers for multi-process training (DDP, FSDP2).

Every process must train the same objective(s) at every optimizer step: otherwise the gradient all-reduce
averages SFT gradients of some ranks with DPO gradients of others, silently. The selectors make the decision
identical by construction (seeded generators, losses averaged across processes); :func:`check_agreement`
verifies it at every step, before any backward pass, for the price of one all-gather of five numbers.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable

import torch
from torch import nn

from xright_pl.core.errors import XRightError
from xright_pl.selectors import OBJECTIVES, Decision


class DesyncError(XRightError):
    """Processes took different branches at the same optimizer step."""


def decision_code(step: int, decision: Decision, names: tuple[str, ...] = OBJECTIVES) -> torch.Tensor:
    """The decision as a float64 vector ``[step, w_1, ..., w_K, reset_optimizer, reset_reference]`` (the weights of
    the objectives ``names``, e.g. ``w_sft, w_dpo``)."""
    w = decision.weights
    unknown = [k for k in w if k not in names]
    if unknown:
        raise XRightError(f"the selector chose {', '.join(unknown)}, which is not an objective of the run ({names})")
    return torch.tensor(
        [float(step), *(float(w.get(k, 0.0)) for k in names)]
        + [float(decision.reset_optimizer), float(decision.reset_reference)],
        dtype=torch.float64,
    )


def describe_codes(codes: torch.Tensor, names: tuple[str, ...] = OBJECTIVES) -> str:
    parts = []
    for rank, row in enumerate(codes.tolist()):
        weights = {k: row[1 + i] for i, k in enumerate(names) if row[1 + i] != 0.0}
        parts.append(f"rank {rank}: step {int(row[0])} weights {weights} resets {row[1 + len(names) :]}")
    return "; ".join(parts)


def check_agreement(
    strategy, step: int, decision: Decision, selector_name: str = "selector", names: tuple[str, ...] = OBJECTIVES
) -> None:
    """Raise :class:`DesyncError` on every process if the processes' decisions for ``step`` differ.

    ``strategy`` is the Trainer's strategy (its ``all_gather`` works on every backend); a single process
    returns at once. Call it before any backward pass of the step, so that no mixed gradient is averaged.
    """
    if getattr(strategy, "world_size", 1) <= 1:
        return
    # gloo and NCCL both gather float64 on the root device of the strategy.
    code = decision_code(step, decision, names).to(strategy.root_device)
    gathered = strategy.all_gather(code).reshape(-1, code.numel()).cpu()
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise DesyncError(
            f"the processes disagree on what optimizer step {step} trains ({describe_codes(gathered, names)}). Training"
            f" stopped before any backward pass, so no SFT gradient was averaged with a DPO one. The"
            f" {selector_name} must decide identically on every process: draw from a generator seeded the same"
            " on every rank (not the global RNG, and not seeded with the rank) and decide only from values that"
            " the module has averaged across processes."
        )


#: The run folder each Trainer's processes agreed on (see :func:`agree_run_dir`).
_AGREED_RUN_DIRS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def local_run_dir(trainer) -> str:
    """``Trainer.log_dir`` as this process computes it, **without** its broadcast: the first logger's version
    folder (TensorBoard, CSV), another logger's ``save_dir``, or ``default_root_dir`` without a logger."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = trainer.loggers
    if not loggers:
        path = None
    elif isinstance(loggers[0], (TensorBoardLogger, CSVLogger)):
        path = loggers[0].log_dir
    else:
        path = loggers[0].save_dir
    return str(path or trainer.default_root_dir)


def agree_run_dir(trainer) -> str:
    """The run folder, broadcast from rank 0 once and remembered. **A collective**: call it where every process
    runs (a ``setup`` hook), never behind an ``is_global_zero`` test; later calls return the remembered folder
    without communicating."""
    if trainer not in _AGREED_RUN_DIRS:
        path = local_run_dir(trainer)
        if getattr(trainer, "world_size", 1) > 1:
            path = trainer.strategy.broadcast(path)
        _AGREED_RUN_DIRS[trainer] = path
    return _AGREED_RUN_DIRS[trainer]


def run_dir(trainer) -> str:
    """The run folder (where ``config.yaml``, ``summary.json``, ``trajectory.png`` and ``hf/`` go): what the
    processes agreed on in :func:`agree_run_dir`, else this process's own :func:`local_run_dir`. **Never a
    collective**, so it is safe in code that only some processes run (``Trainer.log_dir`` broadcasts, and
    deadlocks there)."""
    agreed = _AGREED_RUN_DIRS.get(trainer)
    return agreed if agreed is not None else local_run_dir(trainer)


def run_folders(trainer) -> dict[str, str] | None:
    """The folders of the run writing a checkpoint: ``log_dir`` (:func:`run_dir`: where LightningCLI saves the
    run's ``config.yaml``) and ``root`` (``default_root_dir``). Recorded in every checkpoint so ``generate`` and
    ``export`` find the run a checkpoint belongs to when several runs share one root (and one ``checkpoints``
    folder). No collective."""
    if trainer is None:
        return None
    return {"log_dir": os.path.abspath(run_dir(trainer)), "root": os.path.abspath(trainer.default_root_dir)}


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a ``transformers`` model (the classes in ``_no_split_modules``), in order."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def fully_shard_model(model: nn.Module, mesh, mp_policy=None, reshard_after_forward: bool = True) -> int:
    """FSDP2: shard each transformer block as its own unit, then the rest as the root unit. Returns the
    number of units. ``mesh`` is the data-parallel (1-D) device mesh."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    kwargs["mp_policy"] = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return len(blocks) + 1


def fsdp_units(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The modules that are FSDP2 units (``fully_shard`` applied)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in modules if isinstance(m, FSDPModule)]
