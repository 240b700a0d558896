"""Whole-run speed of xright_pl's selectors: Sequential, ALRIGHT, MAXRIGHT(k=10) and Mix runs of the same length.

The model, batch, lengths and precision are those of ``step_speed.py`` (the same ``--quick`` / ``--gpu`` set-up,
``bench_setup.py``): synthetic token ids, ``pairs`` preference pairs of ``seq_len`` tokens per DPO step and the
same ``2 * pairs`` sequences per SFT step.

Rows (``system`` / ``step``):

- ``xright_pl`` / ``run_sequential``, ``run_alright``, ``run_maxright_k10``, ``run_mix``: whole runs of
  ``--run-steps`` optimizer steps through ``Trainer.fit`` (``Sequential(first="sft")`` switching at half the steps,
  ``Alright``, ``Maxright(eval_every=10)``, ``Mix``); ``step_ms`` is the training loop's wall time / steps.
- ``xright_pl`` / ``dpo``, ``sft``: single DPO and SFT steps, as in ``step_speed.py`` (``--steps`` after
  ``--warmup``): with them the ALRIGHT and MAXRIGHT runs are also compared with Sequential's time rescaled to the
  same numbers of SFT and DPO steps (ALRIGHT and MAXRIGHT draw their own mix, and a DPO step costs more).

Repeats (``--repeats``) are interleaved across the rows; a row's time is the median over them. Output:
``run_speed.csv`` (the columns of ``step_speed.csv``, :data:`~bench_setup.CSV_FIELDS`) and ``run_ratios.json``
(the setup and :func:`run_ratios`, with the branch counts of each run), the table on stdout.

Usage::

    python benchmarks/run_speed.py --quick --out out/run_speed     # tiny GPTNeoX on CPU, runs of 40 steps
    python benchmarks/run_speed.py --gpu --out out/run_speed       # Pythia-1B shape, bf16, 8 x 512, runs of 30 steps
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers, beside this file

from bench_setup import (  # noqa: E402
    Job,
    Setup,
    add_synthetic_args,
    by_row,
    data_module,
    log,
    measure_jobs,
    only_rows,
    peak_mb,
    prepare,
    put_ratio,
    report,
    reset_memory,
    speed_table,
    synthetic_setup,
)
from bench_systems import lightning_trainer, step_timer, xright_module, xright_step  # noqa: E402

RUN_ROWS = ("run_sequential", "run_alright", "run_maxright_k10", "run_mix")
#: The single steps measured beside the runs (for Sequential's time at another run's branch mix).
STEP_ROWS = ("dpo", "sft")


def xright_run(setup: Setup, method: str) -> tuple[float, float | None]:
    """Wall seconds of the training loop of a whole run of ``run_steps`` optimizer steps."""
    from xright_pl import Alright, Maxright, Mix, Sequential

    selector = {
        "run_sequential": lambda: Sequential(first="sft", switch_step=setup.run_steps // 2),
        "run_alright": lambda: Alright(seed=setup.seed),
        # f_sft* = ln(V) - ln 2: at a random init both weighted gaps are about ln 2, so both branches get trained.
        "run_maxright_k10": lambda: Maxright(
            f_sft_star=math.log(setup.model_config["vocab_size"]) - math.log(2), f_dpo_star=0.0, eval_every=10
        ),
        "run_mix": lambda: Mix(),
    }[method]()
    run_setup = replace(setup, warmup=0, steps=setup.run_steps)
    timer = step_timer(setup.device)
    trainer = lightning_trainer(run_setup, setup.run_steps, [timer])
    module = xright_module(run_setup, selector)
    reset_memory(setup.device)
    trainer.fit(module, datamodule=data_module(replace(run_setup, warmup=2)))
    peak = peak_mb(setup.device)
    RUN_BRANCHES.setdefault(method, []).append(dict(module.steps))
    del trainer, module
    return timer.stop - timer.start, peak


#: Branch counts ({"sft": n, "dpo": m}) of every whole run measured, by run row.
RUN_BRANCHES: dict[str, list[dict[str, int]]] = {}


def measure(setup: Setup, log: Callable[[str], None] = print, only: tuple[str, ...] = RUN_ROWS) -> list[dict]:
    """Measure the step rows and the runs ``only``, repeats interleaved; returns the table rows."""

    def run(method: str) -> tuple[list[float], float | None]:
        wall, peak = xright_run(setup, method)
        return [wall / setup.run_steps], peak

    jobs: list[Job] = [("xright_pl", step, lambda s=step: xright_step(setup, s)[:2]) for step in STEP_ROWS]
    jobs += [("xright_pl", method, lambda m=method: run(m)) for method in only]
    results = measure_jobs(jobs, setup.repeats, log)
    # Mix trains both objectives every step; the other runs one (SFT and DPO steps hold the same tokens).
    return speed_table(setup, results, lambda step: setup.tokens_per_step * (2 if step == "run_mix" else 1))


def run_ratios(table: list[dict]) -> dict[str, float]:
    """Each run's wall time over Sequential's, raw and at the run's branch mix (missing rows are left out)."""
    ms = by_row(table, "step_ms")
    out: dict[str, float] = {}
    put = functools.partial(put_ratio, out)
    put("alright/sequential wall", ("xright_pl", "run_alright"), ("xright_pl", "run_sequential"), ms)
    put("maxright_k10/sequential wall", ("xright_pl", "run_maxright_k10"), ("xright_pl", "run_sequential"), ms)
    # ALRIGHT/MAXRIGHT draw their own SFT/DPO mix, and a DPO step costs more than an SFT step: also compare
    # each run with Sequential's time rescaled to the same branch counts (using the measured step times).
    t = {k: ms.get(("xright_pl", k)) for k in ("sft", "dpo")}
    seq = RUN_BRANCHES.get("run_sequential")
    if t["sft"] and t["dpo"] and seq and ("xright_pl", "run_sequential") in ms:
        cost = lambda b: b["sft"] * t["sft"] + b["dpo"] * t["dpo"]  # noqa: E731
        for run, name in (("run_alright", "alright"), ("run_maxright_k10", "maxright_k10")):
            if RUN_BRANCHES.get(run) and ("xright_pl", run) in ms:
                scale = cost(RUN_BRANCHES[run][0]) / cost(seq[0])
                out[f"{name}/sequential wall, same branch mix"] = round(
                    ms[("xright_pl", run)] / (ms[("xright_pl", "run_sequential")] * scale), 4
                )
        out["branches"] = {k: v[0] for k, v in RUN_BRANCHES.items()}
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_synthetic_args(parser, "out/run_speed", "run_speed.csv and run_ratios.json")
    parser.add_argument("--run-steps", type=int, help="optimizer steps of each whole run (default 40; --gpu: 30)")
    parser.add_argument("--only", help=f"comma-separated runs to measure (of {','.join(RUN_ROWS)})")
    args = parser.parse_args(argv)
    setup = synthetic_setup(args, parser)
    only = only_rows(args.only, RUN_ROWS, parser, "runs")
    out = prepare(args)
    torch.manual_seed(setup.seed)
    table = measure(setup, log=log, only=only)
    report(out, "run_speed.csv", "run_ratios.json", setup, table, run_ratios(table))
    return table


if __name__ == "__main__":
    main()
