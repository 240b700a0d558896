"""The frozen reference's log-probs ``s_ref``: computed by the reference model, cached in the preference data
(``precompute_reference_logps``), and the reference reset to the policy (Sequential's stage-start reference).

The module keeps the reference model itself (``XRightModule.reference``, with LoRA none: the policy with its
adapters disabled) and its flags; these functions do the work.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from xright_pl.core.errors import ConfigError
from xright_pl.core.types import PreferenceBatch
from xright_pl.data.module import LENGTH_COLUMNS, REF_COLUMNS
from xright_pl.data.streams import row_lengths
from xright_pl.models.build import setup_reference_model
from xright_pl.models.lora import fold_adapters, reference_mode
from xright_pl.objectives.fused import model_token_logps
from xright_pl.objectives.losses import sequence_logps_from_token_logps
from xright_pl.selectors import Selector, Sequential

log = logging.getLogger(__name__)

__all__ = ["reference_logps", "cache_reference_logps", "reset_to_policy", "rows_of_process", "gathered_rows"]


@torch.no_grad()
def reference_logps(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    batch: PreferenceBatch,
    released: bool,
    fused: bool = False,
) -> Tensor:
    """``s_ref(y)`` for the ``[2B]`` sequences of ``batch``: the cached values when the batch carries them, else a
    forward pass of ``reference`` (``None``: ``policy`` with its LoRA adapters disabled), by the fused log-prob
    path of :mod:`xright_pl.objectives.fused` when ``fused``."""
    if batch.ref_logps is not None:
        return batch.ref_logps
    if released:
        raise ConfigError(
            "this preference batch has no cached reference log-probs and the reference model was released"
            " (precompute_reference_logps=True): evaluate on the data module the module was fitted with."
        )
    if reference is None:  # LoRA: the reference is the policy with its adapters disabled
        with reference_mode(policy) as base:
            tok = model_token_logps(base, batch.input_ids, batch.attention_mask, batch.labels, fused=fused)
    else:
        tok = model_token_logps(reference, batch.input_ids, batch.attention_mask, batch.labels, fused=fused)
    return sequence_logps_from_token_logps(*tok).logps


def rows_of_process(n: int, world: int, rank: int) -> list[int]:
    """The rows of ``n`` that process ``rank`` of ``world`` computes: every ``world``-th from ``rank``, wrapping
    around so that every process runs as many rows (``ceil(n / world)``)."""
    per_rank = -(-n // world)
    return [(rank + world * i) % n for i in range(per_rank)]


def gathered_rows(n: int, world: int) -> list[int]:
    """The row of each entry of the all-gathered shares of :func:`rows_of_process` (process by process)."""
    return [row for rank in range(world) for row in rows_of_process(n, world, rank)]


def compute_reference_logps(
    dataset: Any, collate: Any, batch_size: int, strategy: Any, world: int, rank: int, device: torch.device, logps: Any
) -> tuple[list[float], list[float]]:
    """``(s_ref(chosen), s_ref(rejected))`` of every row of ``dataset``, in row order: each process runs
    ``logps(batch)`` (no grad, under the strategy's precision) on its share of the rows, longest first, and the
    shares are all-gathered."""
    n = len(dataset)
    mine = rows_of_process(n, world, rank)
    per_rank = len(mine)
    lengths = row_lengths(dataset, LENGTH_COLUMNS["dpo"])
    order = sorted(range(per_rank), key=lambda j: -lengths[mine[j]])  # longest first, little padding
    out = torch.zeros(per_rank, 2, dtype=torch.float32, device=device)
    with torch.no_grad(), strategy.precision_plugin.forward_context():
        for start in range(0, per_rank, batch_size):
            js = order[start : start + batch_size]
            batch = strategy.batch_to_device(collate([dataset[mine[j]] for j in js]))
            batch.ref_logps = None
            ref = logps(batch).float()
            out[torch.tensor(js, device=out.device)] = torch.stack([ref[: len(js)], ref[len(js) :]], dim=1)
    if world > 1:
        gathered = strategy.all_gather(out).reshape(world * per_rank, 2)
        index = torch.tensor(gathered_rows(n, world))
        out = torch.zeros(n, 2, dtype=torch.float32, device=gathered.device)
        out[index.to(out.device)] = gathered
    out = out.cpu()
    return out[:, 0].tolist(), out[:, 1].tolist()


def _columns(dataset: Any) -> list[str]:
    """Column names of a ``datasets.Dataset`` or of the first row of a list of dicts."""
    names = getattr(dataset, "column_names", None)
    return list(names) if names is not None else list(dataset[0]) if len(dataset) else []


def preference_names(dm: Any) -> list[str]:
    """The objectives of a data module that train on a reference: its preference objectives (the pair's ``dpo``, or
    every preference data set of ``datasets``)."""
    return [name for name, kind in dm.objective_kinds.items() if kind == "preference"]


def cache_reference_logps(trainer: Any, selector: Selector, logps: Any, released: bool, device: torch.device) -> bool:
    """Cache ``s_ref`` of every preference pair (train and val) of the trainer's data module in its data sets (the
    pair's ``dpo``, or every preference data set of ``data.datasets``), by ``logps(batch)`` (the module's
    :meth:`reference_logps`, on ``device``). Returns True when the caller may release the reference model: False
    when an earlier fit of the same module (``released``) had cached them already."""
    dm = getattr(trainer, "datamodule", None)
    if dm is None or not hasattr(dm, "set_reference_logps"):
        raise ConfigError(
            "precompute_reference_logps needs the JointDataModule (trainer.fit(module, datamodule=...)),"
            " whose preference sets receive the cached columns."
        )
    names = preference_names(dm)
    if isinstance(selector, Sequential) and selector.reference == "stage_start":
        later = selector.stages[1:] if selector.stages is not None else [selector.second]
        if any(name in names for name in later):
            raise ConfigError(
                "precompute_reference_logps cannot be used with Sequential(reference='stage_start'): its DPO"
                " reference becomes the policy at the switch, so log-probs cached at the start would be wrong."
                " Use reference='initial', or set --model.precompute_reference_logps false."
            )
    dm.load()
    splits = [
        (split, name, sets.get(name))
        for split, sets in (("train", dm.train_sets), ("val", dm.val_sets))
        for name in names
    ]
    splits = [(split, name, ds) for split, name, ds in splits if ds is not None and len(ds) > 0]
    if released:
        if all(set(REF_COLUMNS) <= set(_columns(ds)) for _, _, ds in splits):
            return False  # cached by an earlier fit of this module on this data module
        raise ConfigError("the reference model was already released; build a new XRightModule")
    strategy = trainer.strategy
    for split, name, ds in splits:
        chosen, rejected = compute_reference_logps(
            ds, dm.collate(name), dm.batching.eval_batch_size, strategy, trainer.world_size, trainer.global_rank,
            device, logps,
        )  # fmt: skip
        dm.set_reference_logps(split, chosen, rejected, name=name)
    log.info("cached the reference log-probs of %s and released the reference model", [s[:2] for s in splits])
    return True


def reset_to_policy(policy: torch.nn.Module, reference: torch.nn.Module | None, lora: bool) -> bool:
    """Make the reference the policy as it stands now. Returns True when ``reference``'s weights were replaced
    (the checkpoints must then hold them), False with LoRA.

    With LoRA the adapters' update is folded into the base weights and the adapters restart from zero: the policy
    is unchanged, and "adapters disabled" (the reference) is now the policy as it stands.
    """
    if lora:
        if reference is not None:
            raise ConfigError(
                "a stage-start reference with LoRA needs the adapter-free reference: leave --model.reference"
                " unset, or use Sequential(reference='initial')"
            )
        fold_adapters(policy)
        return False
    reference.load_state_dict(policy.state_dict())
    setup_reference_model(reference)
    return True
