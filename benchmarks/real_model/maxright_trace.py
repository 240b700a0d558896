"""Trace what MAXRIGHT decided at every step, and from which numbers (issue 22's MAXRIGHT question).

MAXRIGHT (k = ``eval_every``) compares the weighted gaps of two *tracked* losses: both are measured on the current
training batches every k steps, and in between only the objective just trained is refreshed, from its own
pre-update batch loss. :class:`SelectorTrace` is a callback that records, for every optimizer step, the tracked
values the decision used, the gaps, the decision, and whether both losses were re-evaluated at that step. Add it to
any MAXRIGHT fit::

    PYTHONPATH=benchmarks/real_model python -m xright_pl fit ... \\
        '--trainer.callbacks=[{"class_path": "maxright_trace.SelectorTrace", "init_args": {"path": "trace.csv"}}]'

``python benchmarks/real_model/maxright_trace.py TRACE.csv SUMMARY.json`` then compares the trace with the run's
held-in validations (``summary.json`` -> ``trajectory_held_in``) and prints, per epoch, the steps given to each
objective, the tracked SFT value at the DPO decisions, and the held-in f_sft the model had at the epoch's end:
the question is whether MAXRIGHT chose DPO because the model was near f_sft* or because the tracked value (one
4-row batch) was.
The tracing does not change the run: it reads the selector's inputs and outputs, nothing else.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

FIELDS = ("step", "evaluated", "decision", "f_sft", "f_dpo", "gap_sft", "gap_dpo", "refreshed")


class SelectorTrace(Callback):
    """Record MAXRIGHT's inputs and decision at every optimizer step into a CSV file.

    Args:
        path: the CSV file to write (one row per optimizer step: ``step``, ``evaluated`` (1 when both losses were
            measured at that step), ``decision``, the tracked ``f_sft`` / ``f_dpo`` and weighted ``gap_sft`` /
            ``gap_dpo`` the decision compared, and ``refreshed``, the trained objective's pre-update batch loss
            that replaces its tracked value afterwards).
    """

    def __init__(self, path: str):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        selector = pl_module.selector
        decide, observe = selector.decide, selector.observe

        def traced_decide(step: int, losses: Any) -> Any:
            decision = decide(step, losses)
            gaps = selector.gaps() if selector.values.keys() >= {"sft", "dpo"} else {}
            self.rows.append(
                {
                    "step": step,
                    "evaluated": int(bool(losses)),
                    "decision": decision.branch,
                    "f_sft": selector.values.get("sft", math.nan),
                    "f_dpo": selector.values.get("dpo", math.nan),
                    "gap_sft": gaps.get("sft", math.nan),
                    "gap_dpo": gaps.get("dpo", math.nan),
                    "refreshed": math.nan,
                }
            )
            return decision

        def traced_observe(step: int, decision: Any, losses: Any) -> None:
            observe(step, decision, losses)
            if self.rows and self.rows[-1]["step"] == step and decision.branch in losses:
                self.rows[-1]["refreshed"] = float(losses[decision.branch])

        selector.decide, selector.observe = traced_decide, traced_observe

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                w.writeheader()
                w.writerows(self.rows)


def read_trace(path: Path) -> list[dict[str, Any]]:
    """The rows of a trace CSV, numbers as floats (``step`` and ``evaluated`` as ints)."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        row: dict[str, Any] = {k: float(r[k]) for k in ("f_sft", "f_dpo", "gap_sft", "gap_dpo", "refreshed")}
        row.update(step=int(r["step"]), evaluated=int(r["evaluated"]), decision=r["decision"])
        out.append(row)
    return out


def held_in_by_step(summary: dict[str, Any]) -> dict[int, float]:
    """``{optimizer step: held-in f_sft}`` of the run's validations (``summary.json`` -> ``trajectory_held_in``,
    rows ``[step, f_sft, f_dpo]``)."""
    return {int(step): float(f_sft) for step, f_sft, _ in summary.get("trajectory_held_in") or []}


def epoch_table(rows: list[dict[str, Any]], held_in: dict[int, float], steps_per_epoch: int) -> list[dict[str, Any]]:
    """One row per epoch of ``steps_per_epoch`` steps: DPO and SFT steps, the DPO decisions taken with a tracked SFT
    gap <= 0 (the tracked f_sft at or below f_sft*), the mean tracked f_sft at the DPO decisions, the spread (std)
    of the SFT pre-update batch losses, and the held-in f_sft at the epoch's end."""
    table = []
    for start in range(0, len(rows), steps_per_epoch):
        part = rows[start : start + steps_per_epoch]
        dpo = [r for r in part if r["decision"] == "dpo"]
        sft_batches = [r["refreshed"] for r in part if r["decision"] == "sft" and math.isfinite(r["refreshed"])]
        tracked = [r["f_sft"] for r in dpo if math.isfinite(r["f_sft"])]
        end = start + len(part)
        table.append(
            {
                "epoch": start // steps_per_epoch + 1,
                "steps": f"{start}-{end - 1}",
                "dpo_steps": len(dpo),
                "sft_steps": len(part) - len(dpo),
                "dpo_with_sft_gap_le_0": sum(1 for r in dpo if r["gap_sft"] <= 0),
                "tracked_f_sft_at_dpo": statistics.fmean(tracked) if tracked else math.nan,
                "sft_batch_loss_std": statistics.stdev(sft_batches) if len(sft_batches) > 1 else math.nan,
                "held_in_f_sft_at_end": held_in.get(end, math.nan),
            }
        )
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    """The epoch table as Markdown."""
    cols = list(table[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table:
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path, help="the CSV SelectorTrace wrote")
    p.add_argument("summary", type=Path, help="the run's summary.json (for its held-in validations)")
    p.add_argument("--steps-per-epoch", type=int, default=32)
    p.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    a = p.parse_args(argv)
    rows = read_trace(a.trace)
    summary = json.loads(a.summary.read_text())
    text = markdown(epoch_table(rows, held_in_by_step(summary), a.steps_per_epoch))
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
