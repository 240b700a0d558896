"""The paper's Pareto experiment on a real model: SmolLM2-135M-Instruct, real Alpaca-GPT4 rows and HH-RLHF pairs.

A thin driver over ``benchmarks/pareto.py`` (same runs, same table and picture): it points every run of
``configs/real/smollm2/alright.yaml`` at the local model export and the sample data, runs up to ``--jobs`` runs at
once (one thread each), and asks for a little more from some runs than the generic benchmark does:

* the Sequential runs validate at the stage switch as well as at the end, and record the start point
  (``summary.json`` -> ``trajectory``), which is the evidence that the second stage undoes the first;
* Sequential (SFT->DPO) and ALRIGHT keep their final checkpoint (``checkpoints/last.ckpt``) for
  ``python -m xright_pl generate`` (see ``--generate``).

Then ``benchmarks/pareto.py`` gathers every finished run of ``--seeds`` x ``--lams`` (it starts none) into
``pareto.csv``, ``pareto.md``, ``pareto.png``; this script adds ``commands.txt`` (the command line of every finished
run) and copies each run's ``summary.json`` under ``OUT/runs/``. Finished runs are never made again, so an
interrupted grid goes on where it stopped; ``--points`` makes only some seed:lam points of a grid, ``--gather``
makes none.

    python benchmarks/real_model/get_smollm2.py ../smollm2
    python benchmarks/real_model/pareto.py --steps 100 --seeds 0 --lams 0.5          # 7 runs, ~2 h on 2 cores
    python benchmarks/real_model/pareto.py --steps 100 --seeds 0 --lams 0.5 --generate  # + answers (needs the runs)
    python benchmarks/real_model/pareto.py --steps 100 --seeds 0 1 --lams 0.25 0.5 0.75 --points 1:0.5 0:0.25

Runtime columns: with ``--jobs 2`` two runs share the machine, so ``step_time_s`` is comparable between runs only
roughly (the neighbour changes); ``benchmarks/step_speed.py --real-model`` measures step costs on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import pareto  # noqa: E402  (benchmarks/pareto.py)

from xright_pl.optimum import optimum_from_summaries, write_optimum  # noqa: E402

CONFIG = REPO / "configs" / "real" / "smollm2" / "alright.yaml"
OUT = REPO / "benchmarks" / "results" / "real_smollm2"
#: Methods whose final checkpoint is kept for ``generate``.
KEEP_CHECKPOINT = ("sequential_sft_dpo", "alright")


def local_settings(model_dir: Path, data_dir: Path) -> list[str]:
    """Overrides that make the hub config run offline on the local export and the sample data (paths relative to
    the working directory, as the runs are started from it)."""
    model_dir, data_dir = Path(os.path.relpath(model_dir)), Path(os.path.relpath(data_dir))
    return [
        f"model.model={model_dir}",
        f"data.tokenizer={model_dir}",
        f"data.sft.path={data_dir / 'alpaca_gpt4_sft_train.jsonl'}",
        f"data.sft.eval_path={data_dir / 'alpaca_gpt4_sft_eval.jsonl'}",
        f"data.preference.path={data_dir / 'hh_rlhf_pref_train.jsonl'}",
        f"data.preference.eval_path={data_dir / 'hh_rlhf_pref_eval.jsonl'}",
        "data.preference.eval_split=null",
    ]


def extra_settings(method: str, steps: int) -> list[str]:
    """What a run records beyond the generic benchmark (see the module docstring)."""
    extra: list[str] = []
    if method in pareto.SEQUENTIAL:
        extra += [f"trainer.val_check_interval={steps // 2}", "trajectory.enabled=true", "trajectory.log_figure=false"]
        if method == "sequential_dpo_sft":  # the start point is the same model as SFT->DPO's: evaluate it once
            extra.append("trajectory.evaluate_start=false")
    if method in KEEP_CHECKPOINT:
        ckpt = {"class_path": "xright_pl.checkpoint.XRightCheckpoint", "init_args": {"every_n_train_steps": steps}}
        extra += ["trainer.enable_checkpointing=true", f"trainer.callbacks=[{json.dumps(ckpt)}]"]
    return extra


def command_line(config: Path, run_dir: Path, method: str, seed: int, lam: float, steps: int, settings: list[str],
                 optimum_file: Path | None) -> str:  # fmt: skip
    """One run's command line as ``benchmarks/pareto.py`` starts it (paths relative to the repository)."""
    sel = pareto.selector_for(method, seed, optimum_file)
    args = pareto.fit_args(config, run_dir, sel, lam, seed, steps, settings, optimum_file)
    args = ["python", *args[1:]]
    text = " ".join(shlex.quote(a) for a in args)
    return text.replace(str(REPO) + "/", "").replace(str(REPO.parent) + "/", "../")


def finished_commands(a: argparse.Namespace, runs: Path, seeds: list[int], lams: list[float], settings: list[str]):
    """The command line of every finished run of ``seeds`` x ``lams`` x ``a.methods`` and of their optima."""
    lines = []
    for seed in seeds:
        optimum_file = (runs / f"seed{seed}" / "optimum.json").resolve()
        points = [(m, 0.5, None) for m in pareto.SINGLES] + [(m, lam, optimum_file) for lam in lams for m in a.methods]
        for method, lam, opt in points:
            run_dir = pareto.run_dir_of(runs, seed, method, lam)
            if pareto.finished(run_dir, a.steps):
                extra = settings + extra_settings(method, a.steps)
                lines.append(command_line(a.config, run_dir, method, seed, lam, a.steps, extra, opt))
    return "\n".join(sorted(lines)) + "\n"


def conflict_report(runs: Path, seeds: list[int], lams: list[float]) -> str:
    """Markdown: do the objectives conflict? The start point, each single-objective run's effect on the other
    objective, and each Sequential run's losses at the start, at the stage switch and at the end."""
    lines = ["# Do the objectives conflict?", "", "Validation losses (held-out rows); ln 2 = 0.6931 is the DPO loss of",
             "the reference itself.", ""]  # fmt: skip
    for seed in seeds:
        lines += [f"## seed {seed}", "", "| run | step | f_sft | f_dpo | rewards accuracy |", "|---|---|---|---|---|"]
        start = None
        for lam in lams:
            for method in pareto.SEQUENTIAL:
                path = pareto.run_dir_of(runs, seed, method, lam) / "summary.json"
                if path.is_file():
                    points = json.loads(path.read_text()).get("trajectory") or []
                    start = start or next((p for p in points if p[0] == 0), None)
        if start:
            lines.append(f"| start (the pretrained model) | 0 | {start[1]:.4f} | {start[2]:.4f} | |")
        for method in pareto.SINGLES:
            path = pareto.run_dir_of(runs, seed, method, 0.5) / "summary.json"
            if path.is_file():
                s = json.loads(path.read_text())
                lines.append(
                    f"| {method} | {s['optimizer_steps']} | {s['val/sft_loss']:.4f} | {s['val/dpo_loss']:.4f} |"
                    f" {s.get('val/rewards_accuracies', math.nan):.3f} |"
                )
        for lam in lams:
            for method in pareto.SEQUENTIAL:
                path = pareto.run_dir_of(runs, seed, method, lam) / "summary.json"
                if not path.is_file():
                    continue
                s = json.loads(path.read_text())
                for step, f_sft, f_dpo in s.get("trajectory") or []:
                    if step == 0:
                        continue
                    acc = f" {s.get('val/rewards_accuracies', math.nan):.3f}" if step == s["optimizer_steps"] else ""
                    name = f"{pareto.METHODS[method]}, lam {lam:g}"
                    lines.append(f"| {name} | {step} | {f_sft:.4f} | {f_dpo:.4f} |{acc} |")
        lines.append("")
    return "\n".join(lines)


def parse_points(p: argparse.ArgumentParser, texts: list[str]) -> list[tuple[int, float]]:
    """``SEED:LAM`` texts as (seed, lam) pairs."""
    points = []
    for text in texts:
        seed, _, lam = text.partition(":")
        try:
            points.append((int(seed), float(lam)))
        except ValueError:  # also without the colon: float("") fails
            p.error(f"--points {text!r}: expected SEED:LAM, e.g. 1:0.5")
    return points


def seed_runs(out: Path, runs: Path) -> list[Path]:
    """Copy the committed ``OUT/runs/**/summary.json`` into the runs folder where a run has none, so a fresh checkout
    reuses the runs already made (and only makes the missing ones). Returns the summaries copied."""
    copied = []
    for committed in sorted((out / "runs").rglob("summary.json")):
        target = runs / committed.relative_to(out / "runs")
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(committed.read_text())
            copied.append(target)
    return copied


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=REPO.parent / "smollm2", help="get_smollm2.py's folder")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data", help="the sample data")
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--runs", type=Path, default=None, help="folder of the runs (default: ../real_smollm2_runs)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--lams", type=float, nargs="+", default=[0.5])
    p.add_argument("--methods", nargs="+", default=list(pareto.METHODS), choices=list(pareto.METHODS))
    p.add_argument("--points", nargs="+", default=None, metavar="SEED:LAM",
                   help="make only these seed:lam points (e.g. 1:0.5 0:0.25), not every seed x lam; the table\n"
                        "gathers every finished run of --seeds x --lams")  # fmt: skip
    p.add_argument("--gather", action="store_true",
                   help="start no run: write the table, picture and report of the finished runs")  # fmt: skip
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="extra option for every run, as in benchmarks/pareto.py (repeatable)")  # fmt: skip
    p.add_argument("--generate", action="store_true", help="only write the answers of the kept checkpoints")
    p.add_argument("--prompts", type=int, default=8, help="held-out HH prompts for --generate")
    a = p.parse_args(argv)
    model_dir, data_dir = a.model_dir.resolve(), a.data_dir.resolve()
    if not (model_dir / "config.json").is_file():
        p.error(f"{model_dir} holds no model: run python benchmarks/real_model/get_smollm2.py {a.model_dir}")
    runs = (a.runs or REPO.parent / "real_smollm2_runs").resolve()
    settings = local_settings(model_dir, data_dir) + a.settings
    if a.generate:
        return generate(a, runs, model_dir, data_dir)
    a.out.mkdir(parents=True, exist_ok=True)
    for path in seed_runs(a.out, runs):
        print(f"reusing the committed {path.relative_to(runs)}", flush=True)

    def one(job: tuple[str, int, float, Path | None]) -> None:
        method, seed, lam, optimum_file = job
        run_dir = pareto.run_dir_of(runs, seed, method, lam)
        extra = settings + extra_settings(method, a.steps)
        sel = pareto.selector_for(method, seed, optimum_file)
        s = pareto.fit(a.config.resolve(), run_dir, sel, lam, seed, a.steps, extra, optimum_file, reuse=True)
        print(f"seed {seed} lam {lam:g} {method}: f_sft {s['val/sft_loss']:.4f} f_dpo {s['val/dpo_loss']:.4f}"
              f" step time {s['step_time_s']:.1f}s", flush=True)  # fmt: skip

    points = parse_points(p, a.points) if a.points else [(seed, lam) for seed in a.seeds for lam in a.lams]
    point_seeds = sorted({seed for seed, _ in points})
    seeds, lams = sorted({*a.seeds, *point_seeds}), sorted({*a.lams, *(lam for _, lam in points)})
    if a.gather:
        points = point_seeds = []  # start nothing
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(one, [(m, seed, 0.5, None) for seed in point_seeds for m in pareto.SINGLES]))
        optimum_files = {}
        for seed in point_seeds:
            seed_dir = runs / f"seed{seed}"
            opt = optimum_from_summaries(seed_dir / "sft_only" / "summary.json", seed_dir / "dpo_only" / "summary.json")
            optimum_files[seed] = write_optimum(opt, seed_dir / "optimum.json").resolve()
        # Mix costs two graphs per step: start it first so the pool stays balanced.
        order = sorted(a.methods, key=lambda m: m != "mix")
        list(pool.map(one, [(m, seed, lam, optimum_files[seed]) for seed, lam in points for m in order]))
    # Gather: start no run, only write the table and the picture of the finished ones.
    pareto.run_benchmark(a.config.resolve(), a.out, seeds, lams, a.steps, a.methods, settings, True, runs, 1, True)
    (a.out / "commands.txt").write_text(finished_commands(a, runs, seeds, lams, settings))
    (a.out / "conflict.md").write_text(conflict_report(runs, seeds, lams))
    for summary in runs.rglob("summary.json"):
        dest = a.out / "runs" / summary.relative_to(runs)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(summary.read_text().replace(str(REPO.parent) + "/", "../"))  # paths beside the checkout
    print(f"wrote {a.out}", flush=True)


def generate(a: argparse.Namespace, runs: Path, model_dir: Path, data_dir: Path) -> None:
    """Answers of the reference, Sequential (SFT->DPO) and ALRIGHT for held-out HH prompts."""
    out = a.out / "answers"
    out.mkdir(parents=True, exist_ok=True)
    models = {"reference": str(model_dir)}
    commands: list[str] = []
    for method in KEEP_CHECKPOINT:
        models[method] = str(pareto.run_dir_of(runs, a.seeds[0], method, a.lams[0]) / "checkpoints" / "last.ckpt")
    for name, model in models.items():
        args = [sys.executable, "-m", "xright_pl", "generate", "--model", model,
                "--prompts", str(data_dir / "hh_rlhf_pref_eval.jsonl"), "--format", "prompt_chosen_rejected",
                "--limit", str(a.prompts), "--max_new_tokens", "96", "--output", str(out / f"{name}.json"),
                "--generator", name, "--overwrite", "true", "--progress", "false"]  # fmt: skip
        if name == "reference":
            args += ["--use_chat_template", "true", "--max_prompt_length", "64"]
        print(" ".join(args), flush=True)
        subprocess.run(args, check=True)
        commands.append(" ".join(shlex.quote(x) for x in ["python", *args[1:]]))
    text = "\n".join(commands).replace(str(REPO) + "/", "").replace(str(REPO.parent) + "/", "../")
    (out / "commands.txt").write_text(text + "\n")
    (out / "answers.md").write_text(answers_markdown(out, list(models)))


def answers_markdown(out: Path, names: list[str]) -> str:
    """The answers of every model side by side, prompt by prompt (greedy, as generated)."""
    answers = {n: json.loads((out / f"{n}.json").read_text()) for n in names}
    lines = ["# Answers to held-out HH-RLHF prompts", "",
             f"Greedy decoding, at most 96 new tokens, prompts through the chat template (the last turns that fit in"
             f" 64 tokens). Models: {', '.join(names)}. Commands: `commands.txt`.", ""]  # fmt: skip
    for i, row in enumerate(answers[names[0]]):
        prompt = row["instruction"].strip().replace("\n\n", " ").replace("\n", " ")
        lines += [f"## Prompt {i + 1}", "", f"> …{prompt[-400:]}" if len(prompt) > 400 else f"> {prompt}", ""]
        for n in names:
            text = answers[n][i]["output"].strip().replace("\n", " ")
            lines += [f"**{n}**: {text}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
