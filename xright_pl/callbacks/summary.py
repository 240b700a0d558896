"""Callbacks that come with the library (the selectors live in :mod:`xright_pl.selectors`)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from xright_pl.core.commandline import resume_command
from xright_pl.selectors import selector_of
from xright_pl.training.distributed import agree_run_dir, run_dir


def weights_sha256(module: torch.nn.Module) -> str:
    """A fingerprint of a module's parameters and buffers (names, dtypes, shapes and exact values).

    FSDP2 shards (DTensors) are gathered first: under ModelParallelStrategy every rank must call this."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA) or peak resident set size of this process (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class RunSummary(Callback):
    """At the end of ``fit``: print a short table and write ``summary.json`` in the run's log directory.

    Args:
        filename: name of the JSON file written next to the logs.
        print_table: print the table on rank 0.
    """

    def __init__(self, filename: str = "summary.json", print_table: bool = True) -> None:
        self.filename = filename
        self.print_table = print_table
        self.summary: dict[str, Any] = {}
        self._t0 = 0.0
        self._tokens0 = 0
        self._step_t0 = 0.0
        self._step_time = 0.0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        agree_run_dir(trainer)  # every process: on_fit_end writes on rank 0 only, which must not broadcast

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._t0 = time.perf_counter()
        self._tokens0 = sum(getattr(pl_module, "tokens", {}).values())
        self._step_time = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._step_t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._step_time += time.perf_counter() - self._step_t0

    def run_dir(self, trainer: pl.Trainer) -> str:
        """The run folder, without a collective (see :func:`xright_pl.training.distributed.run_dir`)."""
        return run_dir(trainer)

    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        wall = time.perf_counter() - self._t0
        kept = ("val/", "held_in/", "eval/")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(kept)}
        tokens = sum(getattr(pl_module, "tokens", {}).values()) - self._tokens0
        selector = selector_of(pl_module)
        target = pl_module.target() if hasattr(pl_module, "target") else None  # {name: lambda_k} with K data sets
        dm = getattr(trainer, "datamodule", None)
        out: dict[str, Any] = {
            "method": selector.name if selector else None,
            "selector": selector.describe() if selector else None,
            "lam": getattr(pl_module, "lam", None) if not isinstance(target, dict) else None,
            **({"weights": target} if isinstance(target, dict) else {}),
            **metrics,
            **{f"steps/{k}": v for k, v in getattr(pl_module, "steps", {}).items()},
            "optimizer_steps": trainer.global_step,
            "wall_time_s": round(wall, 3),
            "step_time_s": round(self._step_time, 3),
            "tokens": tokens,
            "tokens_per_s": round(tokens * trainer.world_size / wall, 1) if wall > 0 else None,
            "peak_memory_mb": round(peak_memory_mb(pl_module.device), 1),
            "weights_sha256": weights_sha256(pl_module.policy),
            "nonfinite_skips": getattr(pl_module, "nonfinite_skips", 0),
            "reevaluated_forwards": getattr(pl_module, "reevaluated_forwards", 0),
        }
        if dm is not None and hasattr(dm, "consumed_examples"):
            consumed = dm.consumed_examples()
            out.update({f"examples/{k}": consumed.get(k, 0) for k in getattr(pl_module, "steps", consumed)})
            out["skipped"] = getattr(dm, "skipped", {})
        last = getattr(trainer.checkpoint_callback, "last_model_path", "")
        if last:
            out["last_checkpoint"] = last
        for cb in trainer.callbacks:  # e.g. TradeoffMetrics (optima used), TrajectoryPlot (PNG path)
            if cb is not self and hasattr(cb, "summary_fields"):
                out.update(cb.summary_fields(trainer))
        return out

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.summary = self.collect(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        run_dir = self.run_dir(trainer)
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, self.filename)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.summary, f, indent=2)
        os.replace(tmp, path)
        self.summary["path"] = path
        if self.print_table:
            print(format_summary(self.summary), flush=True)


def format_summary(summary: dict[str, Any]) -> str:
    rows = []
    for k, v in summary.items():
        if k in ("skipped", "path", "last_checkpoint", "trajectory"):
            continue
        if isinstance(v, float):
            v = f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
        rows.append((k, str(v)))
    skipped = summary.get("skipped") or {}
    for obj, counts in skipped.items():
        for reason, n in counts.items():
            rows.append((f"skipped/{obj}/{reason}", str(n)))
    width = max(len(k) for k, _ in rows)
    lines = ["", "xright_pl run summary", "-" * (width + 3 + max(len(v) for _, v in rows))]
    lines += [f"{k.ljust(width)} : {v}" for k, v in rows]
    if "path" in summary:
        lines.append(f"written to {summary['path']}")
    if summary.get("last_checkpoint"):
        lines.append(f"last checkpoint: {summary['last_checkpoint']}")
        lines.append(f"to resume (or train on with a larger --trainer.max_steps): {resume_command()}")
    return "\n".join(lines)
