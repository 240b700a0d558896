"""The paper's Pareto experiment: where each method ends in the (f_sft, f_dpo) plane, and what it costs.

For every seed: an SFT-only and a DPO-only run give the optima f_sft*, f_dpo* (``python -m xright_pl optimum``
semantics, same start, same budget); then Sequential in both orders, Mix, ALRIGHT and MAXRIGHT (given those
optima) at every lam, all with the same number of optimizer steps. Each run is its own process (so that peak
memory is that run's), started with ``python -m xright_pl fit --config CONFIG`` and overrides: the selector,
``lam``, the seed (``seed_everything``, ``model.seed``, ``data.seed``; ALRIGHT's draws), ``max_steps``, one
validation at the last step, no logger, no checkpoints, none of the config's callbacks, no trajectory plot.

Runtime is ``step_time_s`` from ``summary.json``: the seconds spent in the training steps themselves (from
``on_train_batch_start`` to ``on_train_batch_end``, selector evaluations included, validation and set-up
excluded). ``runtime_increase_pct`` and ``peak_memory_increase_pct`` compare a run with the mean of the two
Sequential runs of the same seed and lam (which make the same numbers of SFT and DPO steps).

    python benchmarks/pareto.py                          # embedded task, 3 seeds, config's max_steps
    python benchmarks/pareto.py --quick --out /tmp/pareto  # 1 seed, 150 steps
    python benchmarks/pareto.py --config my.yaml --steps 2000 --seeds 0 1 2 --set data.sft.limit=5000

Writes ``pareto.csv`` (one row per run), ``pareto.md`` (mean +- std over seeds), ``pareto.png`` (the loss plane
with the ideal point, and bars of DPO gap, SFT gap, ideal distance, runtime and memory increase per lam),
``optima.csv`` (f* per seed) and the runs under ``--runs`` (default ``OUT/runs/``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from xright_pl.core.optimum import optimum_from_summaries, write_optimum
from xright_pl.training.metrics import tradeoff_gaps

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"
LAMS = (0.25, 0.5, 0.75)
#: method -> (label, selector for a seed; ``{optimum}`` is the seed's optimum file).
METHODS: dict[str, str] = {
    "sequential_sft_dpo": "Sequential (SFT→DPO)",
    "sequential_dpo_sft": "Sequential (DPO→SFT)",
    "mix": "Mix",
    "alright": "ALRIGHT",
    "maxright": "MAXRIGHT",
}
SEQUENTIAL = ("sequential_sft_dpo", "sequential_dpo_sft")
#: The single-objective runs that give a seed's f* (one per seed, whatever lam).
SINGLES = ("sft_only", "dpo_only")
COLUMNS = [
    "method",
    "lam",
    "seed",
    "steps",
    "steps_sft",
    "steps_dpo",
    "sft_loss",
    "dpo_loss",
    "f_sft_star",
    "f_dpo_star",
    "sft_gap",
    "dpo_gap",
    "ideal_distance",
    "step_time_s",
    "wall_time_s",
    "peak_memory_mb",
    "runtime_increase_pct",
    "peak_memory_increase_pct",
]
#: Columns summarised in pareto.md, with their heading.
TABLE = [
    ("sft_loss", "f_sft"),
    ("dpo_loss", "f_dpo"),
    ("sft_gap", "SFT gap"),
    ("dpo_gap", "DPO gap"),
    ("ideal_distance", "ideal distance"),
    ("step_time_s", "step time (s)"),
    ("runtime_increase_pct", "runtime vs Seq. (%)"),
    ("peak_memory_mb", "peak mem (MiB)"),
    ("peak_memory_increase_pct", "memory vs Seq. (%)"),
]


def selector_for(method: str, seed: int, optimum_file: Path | None) -> dict[str, Any]:
    if method == "sequential_sft_dpo":
        return {"class_path": "xright_pl.Sequential", "init_args": {"first": "sft"}}
    if method == "sequential_dpo_sft":
        return {"class_path": "xright_pl.Sequential", "init_args": {"first": "dpo"}}
    if method == "mix":
        return {"class_path": "xright_pl.Mix"}
    if method == "alright":
        return {"class_path": "xright_pl.Alright", "init_args": {"seed": seed}}
    if method == "maxright":
        return {"class_path": "xright_pl.Maxright", "init_args": {"optimum_file": str(optimum_file)}}
    if method in ("sft_only", "dpo_only"):
        return {"class_path": "xright_pl.Single", "init_args": {"objective": method[:3]}}
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def fit_args(
    config: Path,
    run_dir: Path,
    selector: dict[str, Any],
    lam: float,
    seed: int,
    steps: int,
    settings: list[str],
    optimum_file: Path | None = None,
) -> list[str]:
    """The command line of one run (``sys.executable -m xright_pl fit ...``)."""
    args = [
        sys.executable,
        "-m",
        "xright_pl",
        "fit",
        "--config",
        str(config),
        f"--model.selector={json.dumps(selector)}",
        f"--model.lam={lam}",
        f"--seed_everything={seed}",
        f"--model.seed={seed}",
        f"--data.seed={seed}",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trajectory.enabled=false",
        "--summary.print_table=false",
        f"--trainer.default_root_dir={run_dir}",
    ]
    if optimum_file is not None:
        args.append(f"--tradeoff.optimum_file={optimum_file}")
    args += [s if s.startswith("--") else f"--{s}" for s in settings]
    return args


def fit(
    config: Path,
    run_dir: Path,
    selector: dict[str, Any],
    lam: float,
    seed: int,
    steps: int,
    settings: list[str],
    optimum_file: Path | None = None,
    reuse: bool = False,
    threads: int | None = 1,
) -> dict[str, Any]:
    """One training run in its own process; its summary.json."""
    summary_path = run_dir / "summary.json"
    if reuse and finished(run_dir, steps):
        return json.loads(summary_path.read_text())
    args = fit_args(config, run_dir, selector, lam, seed, steps, settings, optimum_file)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.txt", "w") as logf:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        proc = subprocess.run(args, stdout=logf, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not summary_path.is_file():
        tail = (run_dir / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"run failed ({proc.returncode}): {' '.join(args)}\n--- log tail ---\n{tail}")
    return json.loads(summary_path.read_text())


def finished(run_dir: Path, steps: int) -> bool:
    """Whether ``run_dir`` holds a finished run of ``steps`` optimizer steps (what ``fit(reuse=True)`` reuses)."""
    path = run_dir / "summary.json"
    return path.is_file() and json.loads(path.read_text()).get("optimizer_steps") == steps


def fmt_lam(lam: float) -> str:
    return f"{lam:g}"


def run_dir_of(runs: Path, seed: int, method: str, lam: float) -> Path:
    """Where a run lives: ``seed{seed}/{method}`` for the optima, ``seed{seed}/lam{lam}/{method}`` for the rest."""
    seed_dir = runs / f"seed{seed}"
    return seed_dir / method if method in SINGLES else seed_dir / f"lam{fmt_lam(lam)}" / method


#: ``evals`` of :func:`run_benchmark` for runs that validate on a held-in sample of training rows too
#: (``data.held_in``): evaluation name -> metric prefix in ``summary.json``.
HELD_IN_AND_OUT = {"held_in": "held_in", "held_out": "val"}


def run_benchmark(
    config: Path,
    out: Path,
    seeds: list[int],
    lams: list[float],
    steps: int,
    methods: list[str],
    settings: list[str],
    reuse: bool = False,
    runs: Path | None = None,
    threads: int | None = 1,
    only_finished: bool = False,
    steps_of: Callable[[str, float], int] | None = None,
    evals: dict[str, str] | None = None,
    budget: str | None = None,
) -> list[dict[str, Any]]:
    """Run (or reuse) every seed x lam x method and write the table and the picture. ``only_finished``: start no
    run, gather the finished ones (a seed without both single-objective runs, or a missing run, is left out).

    ``steps_of(method, lam)``: the optimizer steps of one run when they differ between runs (e.g. a budget in
    epochs; the single-objective runs are asked with lam 0.5); None: ``steps`` for every run. ``evals``: one row
    per run and evaluation (column ``eval``), e.g. :data:`HELD_IN_AND_OUT`, each with the optima measured on that
    evaluation; ``pareto.md`` gets a table per evaluation and ``pareto.png`` is drawn for the first one
    (``pareto_{eval}.png`` for the others). None: the held-out losses only, as before. ``budget``: the budget's
    words in ``pareto.md`` (default: ``steps`` optimizer steps per run)."""
    rows: list[dict[str, Any]] = []
    optima: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    runs_dir = runs or out / "runs"
    steps_of = steps_of or (lambda method, lam: steps)
    prefixes = evals or {None: "val"}
    for seed in seeds:
        seed_dir = runs_dir / f"seed{seed}"
        single_dirs = {o: run_dir_of(runs_dir, seed, o, 0.5) for o in SINGLES}
        if only_finished and not all(finished(single_dirs[o], steps_of(o, 0.5)) for o in SINGLES):
            continue
        singles = {}
        for objective in SINGLES:
            sel = selector_for(objective, seed, None)
            singles[objective] = fit(
                config,
                single_dirs[objective],
                sel,
                0.5,
                seed,
                steps_of(objective, 0.5),
                settings,
                reuse=reuse,
                threads=threads,
            )
            print(f"[{time.perf_counter() - t_start:7.1f}s] seed {seed} {objective} done", flush=True)
        sft_summary, dpo_summary = single_dirs["sft_only"] / "summary.json", single_dirs["dpo_only"] / "summary.json"
        opt = optimum_from_summaries(sft_summary, dpo_summary)
        optimum_file = write_optimum(opt, seed_dir / "optimum.json").resolve()
        opts = {}
        for name, prefix in prefixes.items():
            opts[name] = opt if prefix == "val" else optimum_from_summaries(sft_summary, dpo_summary, prefix=prefix)
            optima.append(
                {
                    "seed": seed,
                    **({"eval": name} if evals else {}),
                    "f_sft_star": opts[name].f_sft,
                    "f_dpo_star": opts[name].f_dpo,
                    "sft_only_dpo_loss": singles["sft_only"][f"{prefix}/dpo_loss"],
                    "dpo_only_sft_loss": singles["dpo_only"][f"{prefix}/sft_loss"],
                }
            )
        for lam in lams:
            for method in methods:
                sel = selector_for(method, seed, optimum_file)
                run_dir = run_dir_of(runs_dir, seed, method, lam)
                n_steps = steps_of(method, lam)
                if only_finished and not finished(run_dir, n_steps):
                    continue
                s = fit(config, run_dir, sel, lam, seed, n_steps, settings, optimum_file, reuse, threads)
                for name, prefix in prefixes.items():
                    o = opts[name]
                    f_sft, f_dpo = s[f"{prefix}/sft_loss"], s[f"{prefix}/dpo_loss"]
                    gaps = tradeoff_gaps(f_sft, f_dpo, o.f_sft, o.f_dpo)
                    rows.append(
                        {
                            "method": method,
                            "lam": lam,
                            "seed": seed,
                            **({"eval": name} if evals else {}),
                            "steps": s["optimizer_steps"],
                            "steps_sft": s["steps/sft"],
                            "steps_dpo": s["steps/dpo"],
                            "sft_loss": f_sft,
                            "dpo_loss": f_dpo,
                            "f_sft_star": o.f_sft,
                            "f_dpo_star": o.f_dpo,
                            **gaps,
                            "step_time_s": s["step_time_s"],
                            "wall_time_s": s["wall_time_s"],
                            "peak_memory_mb": s["peak_memory_mb"],
                        }
                    )
                    print(
                        f"[{time.perf_counter() - t_start:7.1f}s] seed {seed} lam {lam:g} {method}"
                        + (f" ({name})" if evals else "")
                        + f": f_sft {f_sft:.4f} f_dpo {f_dpo:.4f} ideal distance {gaps['ideal_distance']:.4f}"
                        f" step time {s['step_time_s']:.2f}s",
                        flush=True,
                    )
    add_increases(rows)
    columns = COLUMNS[:3] + ["eval"] + COLUMNS[3:] if evals else COLUMNS
    write_csv(out / "pareto.csv", rows, columns)
    write_csv(out / "optima.csv", optima, list(optima[0]) if optima else ["seed"])
    meta = {
        "config": repo_relative(config),
        "steps": steps,
        "seeds": seeds,
        "lams": lams,
        "settings": settings,
        "threads": threads,
        "benchmark_time_s": round(time.perf_counter() - t_start, 1),
        "machine": machine(),
        **({"budget": budget} if budget else {}),
    }
    if not evals:
        (out / "pareto.md").write_text(markdown(rows, optima, meta, methods, lams))
    else:
        parts = []
        for i, name in enumerate(evals):
            part = markdown([r for r in rows if r["eval"] == name], [o for o in optima if o["eval"] == name], meta,
                            methods, lams)  # fmt: skip
            heading = f"## Evaluation: {name} ({EVAL_WORDS.get(name, name)})\n"
            parts.append(part.replace("# Pareto benchmark\n", "# Pareto benchmark\n\n" + heading, 1) if i == 0 else
                         heading + part.split("\nOptima", 1)[1].join(["\nOptima", ""]))  # fmt: skip
        (out / "pareto.md").write_text("\n".join(parts))
    pictures = []
    try:
        for i, name in enumerate(prefixes):
            path = out / ("pareto.png" if i == 0 else f"pareto_{name}.png")
            plot([r for r in rows if r.get("eval") == name], [o for o in optima if o.get("eval") == name], methods,
                 lams, path, f"{name}: " if evals else "")  # fmt: skip
            pictures.append(path)
    except ImportError:
        print("matplotlib is not installed (pip install xright_pl[benchmarks]): no pareto.png", flush=True)
    print(f"wrote {out / 'pareto.csv'}, {out / 'pareto.md'}, {', '.join(map(str, pictures))}", flush=True)
    return rows


#: What each evaluation of :data:`HELD_IN_AND_OUT` measures (headings of ``pareto.md``).
EVAL_WORDS = {
    "held_in": "a fixed sample of the training rows, as the paper measures",
    "held_out": "a fixed sample of the held-out files",
}


def add_increases(rows: list[dict[str, Any]]) -> None:
    """``runtime_increase_pct`` / ``peak_memory_increase_pct`` against the mean of the Sequential runs of the
    same seed and lam (empty when no Sequential run was made)."""
    for row in rows:
        base = [
            r
            for r in rows
            if r["method"] in SEQUENTIAL
            and (r["seed"], r["lam"], r.get("eval")) == (row["seed"], row["lam"], row.get("eval"))
        ]
        for col, key in (("runtime_increase_pct", "step_time_s"), ("peak_memory_increase_pct", "peak_memory_mb")):
            ref = statistics.fmean(r[key] for r in base) if base else None
            row[col] = 100.0 * (row[key] / ref - 1.0) if ref else None


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(rows: list[dict[str, Any]], method: str, lam: float, key: str) -> tuple[float, float]:
    return mean_std([r[key] for r in rows if r["method"] == method and r["lam"] == lam])


def machine() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{dev}, torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}"


def markdown(
    rows: list[dict[str, Any]],
    optima: list[dict[str, Any]],
    meta: dict[str, Any],
    methods: list[str],
    lams: list[float],
) -> str:
    n_seeds = len(meta["seeds"])
    lines = [
        "# Pareto benchmark",
        "",
        f"- config: `{meta['config']}`; "
        + (meta["budget"] if meta.get("budget") else f"optimizer steps per run: {meta['steps']} (every method)")
        + ";"
        f" seeds: {meta['seeds']}; lam: {meta['lams']}"
        + (f"; settings: `{meta['settings']}`" if meta["settings"] else ""),
        f"- machine: {meta['machine']}; CPU threads per run: {meta.get('threads') or 'default'};"
        f" benchmark time {meta['benchmark_time_s']} s",
        f"- values: mean ± std over the seeds ({n_seeds} at most; column `seeds`). Gaps are signed (`f - f*`);"
        " ideal distance = sqrt(SFT gap² + DPO gap²). Runtime is the time in training steps; increases are"
        " against the mean of both Sequential orders at the same seed and lam.",
        "",
        "Optima (SFT-only and DPO-only runs, same steps):",
        "",
        "| seed | f_sft* | f_dpo* | f_dpo of the SFT-only run | f_sft of the DPO-only run |",
        "|---|---|---|---|---|",
    ]
    for o in optima:
        lines.append(
            f"| {o['seed']} | {o['f_sft_star']:.4f} | {o['f_dpo_star']:.4f} | {o['sft_only_dpo_loss']:.4f}"
            f" | {o['dpo_only_sft_loss']:.4f} |"
        )
    lines += ["", "| lam | method | seeds | " + " | ".join(h for _, h in TABLE) + " |",
              "|---|---|---|" + "---|" * len(TABLE)]  # fmt: skip
    for lam in lams:
        for method in methods:
            n = sum(1 for r in rows if r["method"] == method and r["lam"] == lam)
            if not n:
                continue
            cells = [str(n)]
            for key, _ in TABLE:
                m, s = aggregate(rows, method, lam, key)
                digits = 1 if key.endswith(("_pct", "_mb")) else (2 if key.endswith("_s") else 3)
                cells.append("—" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}")
            lines.append(f"| {lam:g} | {METHODS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


COLORS = {
    "sequential_sft_dpo": "tab:gray",
    "sequential_dpo_sft": "tab:brown",
    "mix": "tab:green",
    "alright": "tab:blue",
    "maxright": "tab:red",
}
MARKERS = {0.25: "o", 0.5: "s", 0.75: "^"}


def plot(
    rows: list[dict[str, Any]],
    optima: list[dict[str, Any]],
    methods: list[str],
    lams: list[float],
    path: Path,
    title: str = "",
):
    """The paper's layout: the loss plane with the ideal point, then bars per lam of the five measures (``title``:
    put before the first panel's title, e.g. the evaluation)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(16, 9), dpi=100)
    axes = fig.subplots(2, 3)
    ax = axes[0][0]
    for method in methods:
        xs, ys = [], []
        for lam in lams:
            (mx, sx), (my, sy) = aggregate(rows, method, lam, "sft_loss"), aggregate(rows, method, lam, "dpo_loss")
            if math.isnan(mx):
                continue
            xs.append(mx)
            ys.append(my)
            ax.errorbar(mx, my, xerr=sx, yerr=sy, fmt=MARKERS.get(lam, "o"), color=COLORS[method], ms=7, capsize=2)
        ax.plot(xs, ys, "-", color=COLORS[method], lw=1, alpha=0.6)
    xs_all = [float(r["sft_loss"]) for r in rows]
    ys_all = [float(r["dpo_loss"]) for r in rows]
    if optima:
        fs = statistics.fmean(o["f_sft_star"] for o in optima)
        fd = statistics.fmean(o["f_dpo_star"] for o in optima)
        ax.plot(fs, fd, "*", color="gold", mec="black", ms=18, zorder=5)
        xs_all.append(fs)
        ys_all.append(fd)
    for values, set_scale in ((xs_all, ax.set_xscale), (ys_all, ax.set_yscale)):
        if values and min(values) > 0 and max(values) / min(values) > 10:  # within a decade: linear (labelled) ticks
            set_scale("log")
    ax.set_xlabel("f_sft (final val/sft_loss)")
    ax.set_ylabel("f_dpo (final val/dpo_loss)")
    ax.set_title(f"{title}final losses (mean ± std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=COLORS[m], lw=2, label=METHODS[m]) for m in methods]
    handles += [Line2D([], [], color="k", ls="", marker=MARKERS.get(lam, "o"), label=f"lam {lam:g}") for lam in lams]
    handles.append(Line2D([], [], color="gold", mec="black", ls="", marker="*", ms=12, label="ideal (f_sft*, f_dpo*)"))
    ax.legend(handles=handles, fontsize=7, loc="best")
    panels = [
        ("dpo_gap", "DPO gap f_dpo - f_dpo*"),
        ("sft_gap", "SFT gap f_sft - f_sft*"),
        ("ideal_distance", "ideal distance"),
        ("runtime_increase_pct", "runtime increase vs Sequential (%)"),
        ("peak_memory_increase_pct", "peak memory increase vs Sequential (%)"),
    ]
    width = 0.8 / max(1, len(methods))
    for (key, title), ax in zip(panels, [axes[0][1], axes[0][2], axes[1][0], axes[1][1], axes[1][2]]):
        for i, method in enumerate(methods):
            stats = [aggregate(rows, method, lam, key) for lam in lams]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(lams))]
            ax.bar(
                xs,
                [0.0 if math.isnan(m) else m for m, _ in stats],
                width,
                yerr=[0.0 if math.isnan(s) else s for _, s in stats],
                color=COLORS[method],
                capsize=2,
                label=METHODS[method],
            )
        spread = [abs(aggregate(rows, m, lam, key)[0]) for m in methods for lam in lams]
        spread = [v for v in spread if v > 0 and not math.isnan(v)]
        if key in ("dpo_gap", "sft_gap", "ideal_distance") and spread and max(spread) / min(spread) > 10:
            # Sequential's gaps can be 100x the others': a linear scale up to 0.1, logarithmic beyond.
            ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xticks(range(len(lams)))
        ax.set_xticklabels([f"lam = {lam:g}" for lam in lams])
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a pareto.csv / optima.csv with numbers as numbers (to re-plot without re-running)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: (v if k in ("method", "eval") else (None if v == "" else float(v))) for k, v in r.items()})
    return rows


def repo_relative(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (results committed from any machine show the
    same text), else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def config_steps(config: Path) -> int | None:
    cfg = yaml.safe_load(config.read_text()) or {}
    steps = (cfg.get("trainer") or {}).get("max_steps")
    return int(steps) if isinstance(steps, int) and steps > 0 else None


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training config (default: the embedded demo)")
    p.add_argument("--out", type=Path, default=Path("pareto_out"), help="output folder")
    p.add_argument("--quick", action="store_true", help="one seed and 150 steps (3 minutes on 2 CPU cores)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; --quick: 0)")
    p.add_argument("--lams", type=float, nargs="+", default=list(LAMS), help="lam values (weight of DPO)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the config's max_steps)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="extra option for every run, e.g. --set data.sft.limit=64 (repeatable)")  # fmt: skip
    p.add_argument("--runs", type=Path, default=None, help="folder of the individual runs (default: OUT/runs)")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs found in the runs folder")
    p.add_argument("--replot", action="store_true", help="only redraw OUT/pareto.png from OUT/pareto.csv")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per run (OMP_NUM_THREADS; 0: torch's default). One thread keeps\n"
                        "timings comparable on a shared machine: idle OpenMP threads spin when cores\n"
                        "are oversubscribed")  # fmt: skip
    a = p.parse_args(argv)
    if a.replot:
        rows, optima = read_csv(a.out / "pareto.csv"), read_csv(a.out / "optima.csv")
        methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
        plot(rows, optima, methods, sorted({r["lam"] for r in rows}), a.out / "pareto.png")
        return rows
    config = a.config.resolve()
    if not config.is_file():
        p.error(f"config {a.config} not found")
    seeds = a.seeds if a.seeds is not None else ([0] if a.quick else [0, 1, 2])
    steps = a.steps or (150 if a.quick else config_steps(config))
    if not steps:
        p.error(f"{a.config} has no trainer.max_steps: give --steps")
    return run_benchmark(config, a.out, seeds, a.lams, steps, a.methods, a.settings, a.reuse, a.runs, a.threads)


if __name__ == "__main__":
    main()
