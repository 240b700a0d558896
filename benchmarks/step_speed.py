"""Step speed and memory of xright_pl against a plain PyTorch loop (the floor) and TRL, on one model shape.

Every row uses the same model, batch, lengths and precision, built in this run: synthetic token ids (no
download, no ``datasets`` needed for the xright_pl and plain rows), ``pairs`` preference pairs of ``seq_len``
tokens per DPO step and the same ``2 * pairs`` sequences per SFT step.

Rows (``system`` / ``step``):

- ``plain`` / ``dpo``, ``dpo_cached``, ``sft``, ``mix``, ``maxright_eval``, ``dpo_fp32_log_softmax``: a
  hand-written loop (collate, to device, forward, loss, backward, clip, AdamW step) doing the same math as
  xright_pl; ``dpo_fp32_log_softmax`` is the textbook version that upcasts the whole logits tensor.
- ``xright_pl`` / the same steps through ``Trainer.fit`` with :class:`~xright_pl.XRightModule` (selectors
  ``Single``, ``Mix``, ``Maxright(eval_every=1)``; ``dpo_cached``: ``precompute_reference_logps=True``).
- ``trl`` / ``dpo``, ``dpo_cached`` (``precompute_ref_log_probs``), ``sft``: TRL's trainers, if installed, with
  activation checkpointing and bf16 autocast off (TRL 1.16 turns both on by default), as the other rows.

A step's time is the median interval between consecutive step ends (the device synchronised there), after
``--warmup`` steps, pooled over ``--repeats`` interleaved repeats: it includes loading the next batch and
every framework hook. ``peak_memory_mb`` is ``torch.cuda.max_memory_allocated`` (empty on CPU, where
``benchmarks/memory.py`` measures the peak RSS, one measurement per fresh process). Output: ``step_speed.csv``
(columns :data:`~bench_setup.CSV_FIELDS`) and ``ratios.json`` (the setup and :func:`ratios`), the table on stdout.

The systems are ``bench_systems.py``, the set-up and the rows ``bench_setup.py``, shared with the other benchmarks:
whole runs (``run_speed.py``), a pretrained model on real rows (``real_step_speed.py``), length-grouped batches
(``length_grouping.py``) and peak memory (``memory.py``).

Usage::

    python benchmarks/step_speed.py --quick --out out/step_speed   # tiny GPTNeoX on CPU, ~3 minutes
    python benchmarks/step_speed.py --gpu --out out/step_speed     # Pythia-1B shape, bf16, 8 x 512

TRL is a benchmark-only extra (``pip install trl``); without it the TRL rows are skipped.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers, beside this file

from bench_setup import (  # noqa: E402
    Job,
    Setup,
    add_synthetic_args,
    by_row,
    log,
    measure_jobs,
    only_rows,
    prepare,
    put_ratio,
    report,
    speed_table,
    synthetic_setup,
)
from bench_systems import plain_loop, trl_step, use_trl, xright_step  # noqa: E402

STEP_ROWS = ("dpo", "dpo_cached", "sft", "mix", "maxright_eval")


def measure(
    setup: Setup,
    with_trl: bool,
    log: Callable[[str], None] = print,
    only: tuple[str, ...] = STEP_ROWS,
) -> list[dict]:
    """Measure every row, repeats interleaved across systems; returns the table rows."""
    jobs: list[Job] = []
    for step in only:
        jobs.append(("plain", step, lambda s=step: plain_loop(setup, s)[:2]))
        jobs.append(("xright_pl", step, lambda s=step: xright_step(setup, s)[:2]))
    if "dpo" in only:
        jobs.append(("plain", "dpo_fp32_log_softmax", lambda: plain_loop(setup, "dpo_fp32_log_softmax")[:2]))
    if with_trl:
        for step in ("dpo", "dpo_cached", "sft"):
            jobs.append(("trl", step, lambda s=step: trl_step(setup, s)[:2]))
    results = measure_jobs(jobs, setup.repeats, log)
    return speed_table(setup, results, lambda step: setup.tokens_per_step * (2 if step == "mix" else 1))


def ratios(table: list[dict]) -> dict[str, float]:
    """The target ratios computed from one table (missing rows are left out)."""
    ms, mem = by_row(table, "step_ms"), by_row(table, "peak_memory_mb")
    out: dict[str, float] = {}
    put = functools.partial(put_ratio, out)
    for step in STEP_ROWS:
        put(f"xright/plain {step} time", ("xright_pl", step), ("plain", step), ms)
    put("plain dpo recomputed/cached time", ("plain", "dpo"), ("plain", "dpo_cached"), ms)
    put("xright dpo recomputed/cached time", ("xright_pl", "dpo"), ("xright_pl", "dpo_cached"), ms)
    put("trl/xright dpo time (xright speed-up)", ("trl", "dpo"), ("xright_pl", "dpo"), ms)
    put("trl/xright dpo_cached time", ("trl", "dpo_cached"), ("xright_pl", "dpo_cached"), ms)
    put("trl/xright sft time", ("trl", "sft"), ("xright_pl", "sft"), ms)
    put("xright/trl dpo peak memory", ("xright_pl", "dpo"), ("trl", "dpo"), mem)
    put("xright/trl dpo_cached peak memory", ("xright_pl", "dpo_cached"), ("trl", "dpo_cached"), mem)
    if all(("xright_pl", s) in ms for s in ("mix", "sft", "dpo")):
        out["mix/(sft+dpo) time"] = round(
            ms[("xright_pl", "mix")] / (ms[("xright_pl", "sft")] + ms[("xright_pl", "dpo")]), 4
        )
    put("mix/dpo peak memory", ("xright_pl", "mix"), ("xright_pl", "dpo"), mem)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_synthetic_args(parser, "out/step_speed", "step_speed.csv and ratios.json")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL rows")
    parser.add_argument("--only", help=f"comma-separated step rows to measure (of {','.join(STEP_ROWS)})")
    args = parser.parse_args(argv)
    setup = synthetic_setup(args, parser)
    only = only_rows(args.only, STEP_ROWS, parser)
    out = prepare(args)
    with_trl = use_trl(not args.no_trl)
    torch.manual_seed(setup.seed)
    table = measure(setup, with_trl, log=log, only=only)
    report(out, "step_speed.csv", "ratios.json", setup, table, ratios(table))
    return table


if __name__ == "__main__":
    main()
