"""Why MAXRIGHT(k=10) ends far from Mix on the embedded task: a longer budget, exact MAXRIGHT, and ALRIGHT with
MAXRIGHT's share of DPO steps, with the lengths of each method's same-objective step runs.

    python benchmarks/maxright_study.py --out benchmarks/results/maxright_study   # about 6 minutes on 2 CPU cores

Every run: ``pareto.fit`` on the embedded demo config with the method's selector, ``--trainer.max_steps STEPS``
(default 1800), seed 0, lam 0.5 unless stated, TensorBoard logging every step (to read back which objective each
step trained). The optima f* are the final validation losses of an SFT-only and a DPO-only run of the same length.
Writes ``runs.csv`` (one row per run: losses, gaps, ideal distance, steps per objective, mean and longest run of
consecutive DPO / SFT steps) and ``runs.md``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pareto import DEFAULT_CONFIG, fit, selector_for, write_csv  # noqa: E402

from xright_pl.core.optimum import optimum_from_summaries, write_optimum  # noqa: E402

#: name -> (pareto method, lam, extra options)
RUNS = {
    "sft_only": ("sft_only", 0.5, []),
    "dpo_only": ("dpo_only", 0.5, []),
    "mix": ("mix", 0.5, []),
    "alright": ("alright", 0.5, []),
    "alright_lam0.15": ("alright", 0.15, []),
    "maxright_k10": ("maxright", 0.5, []),
    "maxright_k1": ("maxright", 0.5, ["model.selector.init_args.eval_every=1"]),
}
SEED = 0


def run(name: str, out: Path, steps: int, optimum: Path | None) -> dict:
    """One run through ``pareto.fit``, with TensorBoard logging every step in its own folder."""
    method, lam, extra = RUNS[name]
    run_dir = out / "runs" / name
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(run_dir), "name": "", "version": ""},
    }
    settings = [f"trainer.logger={json.dumps(logger)}", "trainer.log_every_n_steps=1", *extra]
    t0 = time.perf_counter()
    summary = fit(DEFAULT_CONFIG, run_dir, selector_for(method, SEED, optimum), lam, SEED, steps, settings, optimum)
    losses = f"f_sft {summary['val/sft_loss']:.4f} f_dpo {summary['val/dpo_loss']:.4f}"
    print(f"[{time.perf_counter() - t0:6.1f}s] {name}: {losses}", flush=True)
    return {"summary": summary, "branches": branches(run_dir)}


def branches(root: Path) -> str:
    """One letter per optimizer step: ``d`` when steps/dpo grew at that step, else ``s``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(glob.glob(str(root / "**" / "events.out.tfevents*"), recursive=True)[0], {"scalars": 0})
    ev.Reload()
    seq, prev = [], 0.0
    for e in sorted(ev.Scalars("steps/dpo"), key=lambda e: e.step):
        seq.append("d" if e.value > prev else "s")
        prev = e.value
    return "".join(seq)


def run_lengths(seq: str, letter: str) -> list[int]:
    out, n = [], 0
    for c in seq + " ":
        if c == letter:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/maxright_study")
    p.add_argument("--steps", type=int, default=1800)
    a = p.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {n: run(n, out, a.steps, None) for n in ("sft_only", "dpo_only")}
    optimum = out / "optimum.json"
    opt = optimum_from_summaries(out / "runs" / "sft_only" / "summary.json", out / "runs" / "dpo_only" / "summary.json")
    write_optimum(opt, optimum)
    f_sft, f_dpo = opt.f_sft, opt.f_dpo
    for name in ("mix", "alright", "alright_lam0.15", "maxright_k10", "maxright_k1"):
        results[name] = run(name, out, a.steps, optimum)
    rows = []
    for name, r in results.items():
        s, seq = r["summary"], r["branches"]
        gap_sft, gap_dpo = s["val/sft_loss"] - f_sft, s["val/dpo_loss"] - f_dpo
        # Mix trains both objectives at every step: it has no runs of one objective.
        d_runs, s_runs = ([], []) if name == "mix" else (run_lengths(seq, "d"), run_lengths(seq, "s"))
        rows.append(
            {
                "run": name, "lam": s["lam"], "steps_sft": s["steps/sft"], "steps_dpo": s["steps/dpo"],
                "sft_loss": round(s["val/sft_loss"], 4), "dpo_loss": round(s["val/dpo_loss"], 4),
                "sft_gap": round(gap_sft, 4), "dpo_gap": round(gap_dpo, 4),
                "ideal_distance": round(math.hypot(gap_sft, gap_dpo), 4),
                "mean_dpo_run": round(sum(d_runs) / len(d_runs), 2) if d_runs else "",
                "max_dpo_run": max(d_runs, default=""),
                "mean_sft_run": round(sum(s_runs) / len(s_runs), 2) if s_runs else "",
                "max_sft_run": max(s_runs, default=""),
                "step_time_s": s["step_time_s"],
            }
        )  # fmt: skip
    write_csv(out / "runs.csv", rows, list(rows[0]))
    lines = [
        f"f_sft* = {f_sft:.4f}, f_dpo* = {f_dpo:.4f} (final validation losses of {a.steps}-step single-objective runs)",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
        *("| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows),
    ]
    (out / "runs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'runs.csv'} and {out / 'runs.md'}")


if __name__ == "__main__":
    main()
