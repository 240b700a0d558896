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

``--protocol`` is the paper's protocol in miniature (issue 22): LoRA (r 32, alpha 64, every linear layer) at lr 2e-4,
budgets in epochs of fixed seeded training subsets (128 Alpaca-GPT4 rows at 4 a step and 64 HH pairs at 2 a step:
32 optimizer steps an epoch of either), Sequential E epochs of one objective then E of the other (the optimizer
re-created at the switch; lam 0.25 <-> (T_SFT, T_DPO) = (3, 1) epochs), the joint methods the same total steps,
cached reference log-probs, max_length 64 with 32 prompt tokens (ChatML without SmolLM2's default system prompt,
which alone is 30 tokens), and a validation every epoch on two evaluations: held-in (a fixed sample of the
training subset, ``data.held_in``) and held-out (a fixed sample of the eval files). Each option can be changed
(``--epochs``, ``--sft-rows``, ``--pairs``, ``--held-in``, ``--held-out``, ``--lora``, ``--lr``, ``--max-length``,
``--max-prompt-length``); ``--plateau`` adds the single-objective runs of 2E epochs. It writes ``pareto.csv`` with an
``eval`` column, ``forgetting.csv`` and ``forgetting.md`` (what the second stage of each Sequential run undid of the
first stage's gain), each run's ``summary.json`` and ``trajectory.png``, and ``subsets.json`` (the source rows of
every seed's subsets):

    python benchmarks/real_model/pareto.py --protocol --jobs 1 --seeds 0 --lams 0.5 \\
        --methods sequential_sft_dpo sequential_dpo_sft        # the pilot: 4 runs

Runtime columns: with ``--jobs 2`` two runs share the machine, so ``step_time_s`` is comparable between runs only
roughly (the neighbour changes); ``benchmarks/real_step_speed.py`` measures step costs on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import pareto  # noqa: E402  (benchmarks/pareto.py)

from xright_pl.core.optimum import optimum_from_summaries, write_optimum  # noqa: E402

CONFIG = REPO / "configs" / "real" / "smollm2" / "alright.yaml"
OUT = REPO / "benchmarks" / "results" / "real_smollm2"
#: Methods whose final checkpoint is kept for ``generate``.
KEEP_CHECKPOINT = ("sequential_sft_dpo", "alright")
#: The same with ``--protocol``: the paper's answers compare Sequential DPO->SFT with ALRIGHT.
PROTOCOL_KEEP_CHECKPOINT = ("sequential_dpo_sft", "alright")
PROTOCOL_OUT = REPO / "benchmarks" / "results" / "real_smollm2_protocol"
#: ChatML without SmolLM2's default system prompt (30 tokens: with it, 32 prompt tokens leave ~1 for the user).
CHATML_NO_SYSTEM = REPO / "configs" / "real" / "smollm2" / "chatml_no_system.jinja"
#: ``--protocol``'s values of the options it sets (each can still be given).
PROTOCOL = {
    "epochs": 3.0,
    "sft_rows": 128,
    "pairs": 64,
    "held_in": 32,
    "held_out": 32,
    "lora": [32, 64.0],
    "lr": 2e-4,
    "max_length": 64,
    "max_prompt_length": 32,
}
#: Seed of the held-out sample (the same rows for every run seed, so the held-out losses of all seeds compare).
HELD_OUT_SEED = 0
#: The single-objective runs of twice the epochs (``--plateau``): how far E epochs are from a plateau.
PLATEAU = {"sft_only": "sft_only_2x", "dpo_only": "dpo_only_2x"}


class Protocol:
    """Budgets in epochs of fixed training subsets (``--protocol`` / ``--epochs``): the steps and the Sequential
    stages of each run, and the files of each seed's subsets.

    Args:
        epochs: E, the epochs of each objective at lam 0.5 (and of the single-objective runs).
        steps_per_epoch: optimizer steps of one epoch of either objective (the subsets are sized to match).
    """

    def __init__(self, epochs: float, steps_per_epoch: int) -> None:
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch

    def stage_epochs(self, lam: float) -> tuple[float, float]:
        """``(T_SFT, T_DPO)`` in epochs, as the paper splits them: the heavier objective gets E epochs, the other
        ``E * min(lam, 1 - lam) / max(lam, 1 - lam)``, so that ``lam = T_DPO / (T_SFT + T_DPO)`` (0.25: (3, 1))."""
        if not 0 < lam < 1:
            raise ValueError(f"lam must be in (0, 1), got {lam}")
        light = self.epochs * min(lam, 1 - lam) / max(lam, 1 - lam)
        return (self.epochs, light) if lam <= 0.5 else (light, self.epochs)

    def steps(self, method: str, lam: float) -> int:
        """Optimizer steps of one run: E epochs for a single-objective run (2E for the plateau runs), T_SFT + T_DPO
        epochs for every other method."""
        if method in pareto.SINGLES:
            return round(self.epochs * self.steps_per_epoch)
        if method in PLATEAU.values():
            return round(2 * self.epochs * self.steps_per_epoch)
        return round(sum(self.stage_epochs(lam)) * self.steps_per_epoch)

    def sequential_init_args(self, method: str, lam: float) -> dict[str, float]:
        """``switch_epochs`` and ``second_epochs`` of a Sequential run (its first objective's epochs first)."""
        t_sft, t_dpo = self.stage_epochs(lam)
        first, second = (t_sft, t_dpo) if method == "sequential_sft_dpo" else (t_dpo, t_sft)
        return {"switch_epochs": first, "second_epochs": second}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def usable_sft(row: dict) -> bool:
    return bool(str(row.get("instruction", "")).strip()) and bool(str(row.get("output", "")).strip())


def usable_pair(row: dict) -> bool:
    chosen, rejected = str(row.get("chosen", "")).strip(), str(row.get("rejected", "")).strip()
    return bool(str(row.get("prompt", "")).strip()) and bool(chosen) and bool(rejected) and chosen != rejected


def draw(rows: list[dict], n: int, seed: int, usable, at_most: bool = False) -> list[int]:
    """Indices of ``n`` usable rows of ``rows``, a draw seeded by ``seed`` (in the draw's order); ``at_most``: all
    the usable rows when there are fewer."""
    candidates = [i for i, r in enumerate(rows) if usable(r)]
    n = min(n, len(candidates)) if at_most else n
    if n > len(candidates):
        raise SystemExit(f"asked for {n} rows, the file has {len(candidates)} usable ones")
    return random.Random(seed).sample(candidates, n)


def write_subsets(data_dir: Path, runs: Path, seeds: list[int], sft_rows: int, pairs: int, held_out: int) -> dict:
    """Each seed's training subsets (``runs/seed{s}/data/``) and the held-out samples (``runs/data/``), drawn from
    the files in ``data_dir``; returns ``{file: source rows}`` (what ``subsets.json`` records). Files already there
    are rewritten with the same rows (the draws are seeded)."""
    files = {
        "sft": ("alpaca_gpt4_sft_train.jsonl", "alpaca_gpt4_sft_eval.jsonl", usable_sft),
        "dpo": ("hh_rlhf_pref_train.jsonl", "hh_rlhf_pref_eval.jsonl", usable_pair),
    }
    record: dict[str, list[int]] = {}
    for kind, (train_file, eval_file, usable) in files.items():
        n = sft_rows if kind == "sft" else pairs
        train = read_jsonl(data_dir / train_file)
        for seed in seeds:
            idx = draw(train, n, seed, usable)
            write_jsonl(runs / f"seed{seed}" / "data" / f"{kind}_train.jsonl", [train[i] for i in idx])
            record[f"seed{seed}/{kind}_train ({train_file})"] = idx
        held = read_jsonl(data_dir / eval_file)
        idx = sorted(draw(held, held_out, HELD_OUT_SEED, usable, at_most=True))
        write_jsonl(runs / "data" / f"{kind}_eval.jsonl", [held[i] for i in idx])
        record[f"{kind}_eval ({eval_file})"] = idx
    return record


def protocol_settings(a: argparse.Namespace, runs: Path, seed: int) -> list[str]:
    """The overrides of every run of ``seed`` under the protocol (subsets, LoRA, lr, lengths, cached reference,
    held-in validation, ChatML without the default system prompt)."""
    rel = lambda p: Path(os.path.relpath(p))  # noqa: E731  (paths relative to the working directory)
    r, alpha = a.lora
    lora = {"r": int(r), "alpha": float(alpha), "target_modules": ["all-linear"]}
    out = [
        f"data.sft.path={rel(runs / f'seed{seed}' / 'data' / 'sft_train.jsonl')}",
        f"data.preference.path={rel(runs / f'seed{seed}' / 'data' / 'dpo_train.jsonl')}",
        f"data.sft.eval_path={rel(runs / 'data' / 'sft_eval.jsonl')}",
        f"data.preference.eval_path={rel(runs / 'data' / 'dpo_eval.jsonl')}",
        f"data.chat_template={rel(CHATML_NO_SYSTEM)}",
        f"data.held_in={a.held_in}",
        f"model.lora={json.dumps(lora)}",
        f"model.optimizer.init_args.lr={a.lr}",
        "model.precompute_reference_logps=true",
    ]
    for part in ("sft", "preference"):
        out += [f"data.{part}.max_length={a.max_length}", f"data.{part}.max_prompt_length={a.max_prompt_length}"]
    return out


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


def extra_settings(method: str, steps: int, protocol: Protocol | None = None) -> list[str]:
    """What a run records beyond the generic benchmark (see the module docstring). With ``protocol``: every run
    validates every epoch and records its trajectory (start point included)."""
    extra: list[str] = []
    if protocol is not None:
        extra += [f"trainer.val_check_interval={protocol.steps_per_epoch}", "trajectory.enabled=true",
                  "trajectory.log_figure=false"]  # fmt: skip
    elif method in pareto.SEQUENTIAL:
        extra += [f"trainer.val_check_interval={steps // 2}", "trajectory.enabled=true", "trajectory.log_figure=false"]
        if method == "sequential_dpo_sft":  # the start point is the same model as SFT->DPO's: evaluate it once
            extra.append("trajectory.evaluate_start=false")
    if method in (KEEP_CHECKPOINT if protocol is None else PROTOCOL_KEEP_CHECKPOINT):
        ckpt = {"class_path": "xright_pl.XRightCheckpoint", "init_args": {"every_n_train_steps": steps}}
        extra += ["trainer.enable_checkpointing=true", f"trainer.callbacks=[{json.dumps(ckpt)}]"]
    return extra


def run_spec(a: argparse.Namespace, runs: Path, method: str, seed: int, lam: float, settings: list[str]):
    """``(run_dir, selector, steps, settings, optimum_file)`` of one run: the generic benchmark's, or with
    ``--protocol`` its budget in epochs, its Sequential stages, its subsets and (MAXRIGHT) the held-in optima."""
    seed_dir = runs / f"seed{seed}"
    single = method in pareto.SINGLES or method in PLATEAU.values()
    optimum_file = None if single else (seed_dir / "optimum.json").resolve()
    objective = next((o for o, m in PLATEAU.items() if m == method), method)
    sel = pareto.selector_for(objective, seed, optimum_file)
    p = a.plan
    if p is None:
        return pareto.run_dir_of(runs, seed, method, lam), sel, a.steps, settings + extra_settings(method, a.steps), \
            optimum_file  # fmt: skip
    run_dir = seed_dir / method if method in PLATEAU.values() else pareto.run_dir_of(runs, seed, method, lam)
    steps = p.steps(method, lam)
    if method in pareto.SEQUENTIAL:
        sel["init_args"].update(p.sequential_init_args(method, lam))
    if method == "maxright":  # f* of the training rows, as MAXRIGHT compares training-batch losses with them
        sel["init_args"] = {"optimum_file": str((seed_dir / "optimum_held_in.json").resolve()), "eval_every": 10}
    extra = settings + protocol_settings(a, runs, seed) + extra_settings(method, steps, p)
    return run_dir, sel, steps, extra, optimum_file


def command_line(config: Path, run_dir: Path, sel: dict, lam: float, seed: int, steps: int, settings: list[str],
                 optimum_file: Path | None) -> str:  # fmt: skip
    """One run's command line as ``benchmarks/pareto.py`` starts it (paths relative to the repository)."""
    args = pareto.fit_args(config, run_dir, sel, lam, seed, steps, settings, optimum_file)
    args = ["python", *args[1:]]
    text = " ".join(shlex.quote(a) for a in args)
    return text.replace(str(REPO) + "/", "").replace(str(REPO.parent) + "/", "../")


def all_points(a: argparse.Namespace, lams: list[float]) -> list[tuple[str, float]]:
    """``(method, lam)`` of every run of a seed: the optima, the plateau runs (``--plateau``), then the methods."""
    singles = [(m, 0.5) for m in pareto.SINGLES]
    if a.plan is not None and a.plateau:
        singles += [(m, 0.5) for m in PLATEAU.values()]
    return singles + [(m, lam) for lam in lams for m in a.methods]


def finished_commands(a: argparse.Namespace, runs: Path, seeds: list[int], lams: list[float], settings: list[str]):
    """The command line of every finished run of ``seeds`` x ``lams`` x ``a.methods`` and of their optima."""
    lines = []
    for seed in seeds:
        for method, lam in all_points(a, lams):
            run_dir, sel, steps, extra, opt = run_spec(a, runs, method, seed, lam, settings)
            if pareto.finished(run_dir, steps):
                lines.append(command_line(a.config, run_dir, sel, lam, seed, steps, extra, opt))
    return "\n".join(sorted(lines)) + "\n"


#: Columns of ``forgetting.csv``.
FORGETTING_COLUMNS = ["seed", "lam", "order", "eval", "objective", "f_start", "f_switch", "f_end", "forgetting"]


def forgetting_rows(runs: Path, seeds: list[int], lams: list[float], plan: Protocol) -> list[dict]:
    """One row per finished Sequential run and evaluation: the first stage's objective at the start, at the switch
    and at the end, and ``forgetting = (f_end - f_switch) / (f_start - f_switch)``, the share of the first stage's
    gain that the second stage undid (0: kept, 1: all undone, > 1: worse than the start)."""
    rows = []
    for seed in seeds:
        for lam in lams:
            for method in pareto.SEQUENTIAL:
                path = pareto.run_dir_of(runs, seed, method, lam) / "summary.json"
                if not path.is_file():
                    continue
                s = json.loads(path.read_text())
                if s.get("optimizer_steps") != plan.steps(method, lam):
                    continue
                first = "sft" if method == "sequential_sft_dpo" else "dpo"
                switch = round(plan.sequential_init_args(method, lam)["switch_epochs"] * plan.steps_per_epoch)
                for name, key in (("held_in", "trajectory_held_in"), ("held_out", "trajectory")):
                    points = {int(p[0]): p for p in s.get(key) or []}
                    if 0 not in points or switch not in points:
                        continue
                    col = 1 if first == "sft" else 2
                    f_start, f_switch = points[0][col], points[switch][col]
                    f_end = points[max(points)][col]
                    gain = f_start - f_switch
                    rows.append({
                        "seed": seed, "lam": lam, "order": method.removeprefix("sequential_").replace("_", "->"),
                        "eval": name, "objective": first, "f_start": f_start, "f_switch": f_switch, "f_end": f_end,
                        "forgetting": (f_end - f_switch) / gain if gain else math.nan,
                    })  # fmt: skip
    return rows


def single_runs(runs: Path, seed: int):
    """``(method, optimizer steps, eval, f_sft, f_dpo)`` of each finished single-objective run of ``seed`` (E and 2E
    epochs) and each evaluation it has."""
    for method in (*pareto.SINGLES, *PLATEAU.values()):
        path = runs / f"seed{seed}" / method / "summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        for name, prefix in pareto.HELD_IN_AND_OUT.items():
            if f"{prefix}/sft_loss" in s:
                yield method, s["optimizer_steps"], name, s[f"{prefix}/sft_loss"], s[f"{prefix}/dpo_loss"]


def forgetting_markdown(rows: list[dict], runs: Path, seeds: list[int], plan: Protocol) -> str:
    """``forgetting.md``: the forgetting table, each Sequential run's trajectory, and the single-objective runs of E
    and 2E epochs (how far E is from a plateau)."""
    lines = [
        "# Does the second stage undo the first?",
        "",
        f"Sequential runs: E = {plan.epochs:g} epochs of the first objective, then of the second"
        f" ({plan.steps_per_epoch} optimizer steps an epoch), the optimizer re-created at the switch."
        " `forgetting = (f_end - f_switch) / (f_start - f_switch)` for the first stage's objective: the share of its"
        " gain that the second stage undid. held_in: a fixed sample of the training subset; held_out: a fixed sample"
        " of the eval files.",
        "",
        "| seed | lam | order | eval | objective | f_start | f_switch | f_end | forgetting |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['lam']:g} | {r['order']} | {r['eval']} | f_{r['objective']} | {r['f_start']:.4f} |"
            f" {r['f_switch']:.4f} | {r['f_end']:.4f} | {r['forgetting']:.3f} |"
        )
    lines += ["", "## Single-objective runs (the optima): E and 2E epochs", "",
              "| seed | run | epochs | eval | f_sft | f_dpo |", "|---|---|---|---|---|---|"]  # fmt: skip
    for seed in seeds:
        for method, steps, name, f_sft, f_dpo in single_runs(runs, seed):
            epochs = steps / plan.steps_per_epoch
            lines.append(f"| {seed} | {method} | {epochs:g} | {name} | {f_sft:.4f} | {f_dpo:.4f} |")
    lines += ["", "## Trajectories (every epoch: step, f_sft, f_dpo)", ""]
    for seed in seeds:
        for path in sorted((runs / f"seed{seed}").rglob("summary.json")):
            s = json.loads(path.read_text())
            name = str(path.parent.relative_to(runs))
            for label, key in (("held_in", "trajectory_held_in"), ("held_out", "trajectory")):
                pts = s.get(key) or []
                if pts:
                    text = ", ".join(f"{int(p[0])}: ({p[1]:.3f}, {p[2]:.4f})" for p in pts)
                    lines.append(f"- `{name}` {label}: {text}")
    return "\n".join(lines) + "\n"


TRADEOFF_COLUMNS = ["method", "lam", "seed", "eval", "sft_loss", "dpo_loss", "weighted", "best_sft", "best_dpo",
                    "sft_gap_best", "dpo_gap_best", "distance_best", "ideal_distance"]  # fmt: skip


def tradeoff_rows(rows: list[dict], runs: Path, seeds: list[int]) -> list[dict]:
    """Two views of each run's end point that need no E-epoch optimum (``pareto.csv``'s gaps use the E-epoch
    single-objective runs, which other runs can pass): the target itself, ``weighted = lam * f_dpo + (1 - lam) *
    f_sft``, and the distance to the *best-reached point* of its seed and evaluation, the lowest f_sft and the
    lowest f_dpo that any finished run of that seed ended at (the single-objective runs of E and 2E epochs and every
    method at every lam), so that every gap is >= 0."""
    best: dict[tuple[int, str], list[float]] = {}

    def reach(seed: int, name: str, f_sft: float, f_dpo: float) -> None:
        b = best.setdefault((seed, name), [math.inf, math.inf])
        b[0], b[1] = min(b[0], f_sft), min(b[1], f_dpo)

    for r in rows:
        reach(int(r["seed"]), r["eval"], r["sft_loss"], r["dpo_loss"])
    for seed in seeds:
        for _, _, name, f_sft, f_dpo in single_runs(runs, seed):
            reach(seed, name, f_sft, f_dpo)
    out = []
    for r in rows:
        b_sft, b_dpo = best[(int(r["seed"]), r["eval"])]
        gap_sft, gap_dpo = r["sft_loss"] - b_sft, r["dpo_loss"] - b_dpo
        out.append({
            "method": r["method"], "lam": r["lam"], "seed": int(r["seed"]), "eval": r["eval"],
            "sft_loss": r["sft_loss"], "dpo_loss": r["dpo_loss"],
            "weighted": r["lam"] * r["dpo_loss"] + (1 - r["lam"]) * r["sft_loss"], "best_sft": b_sft, "best_dpo": b_dpo,
            "sft_gap_best": gap_sft, "dpo_gap_best": gap_dpo, "distance_best": math.hypot(gap_sft, gap_dpo),
            "ideal_distance": r["ideal_distance"],
        })  # fmt: skip
    return out


def tradeoff_markdown(rows: list[dict]) -> str:
    """``tradeoff.md``: per evaluation, lam and method, the mean ± std over seeds of the weighted target, the
    distance to the best-reached point and ``pareto.csv``'s ideal distance (E-epoch optima)."""
    lines = [
        "# The trade-off, three ways",
        "",
        "Lower is better in every column; mean ± std over the seeds (column `seeds`). `weighted` is the target"
        " `lam * f_dpo + (1 - lam) * f_sft` itself. `to best-reached` is the distance to the lowest f_sft and the"
        " lowest f_dpo that any finished run of the same seed and evaluation ended at (single-objective runs of E and"
        " 2E epochs, every method at every lam): an estimate of the ideal point that no run can pass, so every gap is"
        " >= 0. `ideal distance (E f*)` is `pareto.csv`'s, against the single-objective runs of E epochs (the"
        " paper's definition); a run that passes an E-epoch optimum is counted as far from it as one that falls short.",
        "",
    ]
    for name in dict.fromkeys(r["eval"] for r in rows):
        lines += [f"## Evaluation: {name}", "", "| lam | method | seeds | f_sft | f_dpo | weighted | to best-reached |"
                  " ideal distance (E f*) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        here = [r for r in rows if r["eval"] == name]
        for lam in sorted({r["lam"] for r in here}):
            for method, label in pareto.METHODS.items():
                sel = [r for r in here if r["lam"] == lam and r["method"] == method]
                if not sel:
                    continue
                cells = []
                for key in ("sft_loss", "dpo_loss", "weighted", "distance_best", "ideal_distance"):
                    m, sd = pareto.mean_std([r[key] for r in sel])
                    cells.append(f"{m:.3f} ± {sd:.3f}")
                lines.append(f"| {lam:g} | {label} | {len(sel)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


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
    p.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results/real_smollm2,"
                   " with --protocol real_smollm2_protocol)")  # fmt: skip
    p.add_argument(
        "--runs",
        type=Path,
        default=None,
        help="folder of the runs (default: ../real_smollm2_runs, with --protocol ../real_smollm2_protocol_runs)",
    )
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
    g = p.add_argument_group("the paper's protocol (--protocol sets all of these; each can be changed)")
    g.add_argument("--protocol", action="store_true", help="LoRA, epochs of fixed subsets, two evaluations (above)")
    g.add_argument("--epochs", type=float, default=None, help="E: epochs of each objective at lam 0.5 (3)")
    g.add_argument("--sft-rows", type=int, default=None, help="SFT training subset, rows (128)")
    g.add_argument("--pairs", type=int, default=None, help="DPO training subset, pairs (64)")
    g.add_argument("--held-in", type=int, default=None, help="held-in sample of the subsets, rows/pairs (32)")
    g.add_argument("--held-out", type=int, default=None, help="held-out sample of the eval files (32)")
    g.add_argument("--lora", type=float, nargs=2, default=None, metavar=("R", "ALPHA"), help="LoRA rank, alpha (32 64)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (2e-4)")
    g.add_argument("--max-length", type=int, default=None, help="tokens per sequence (64)")
    g.add_argument("--max-prompt-length", type=int, default=None, help="prompt tokens (32)")
    g.add_argument("--plateau", action="store_true", help="also the single-objective runs of 2E epochs")
    a = p.parse_args(argv)
    model_dir, data_dir = a.model_dir.resolve(), a.data_dir.resolve()
    if not (model_dir / "config.json").is_file():
        p.error(f"{model_dir} holds no model: run python benchmarks/real_model/get_smollm2.py {a.model_dir}")
    a.plan = None
    if a.protocol or a.epochs is not None:
        for key, value in PROTOCOL.items():
            if getattr(a, key) is None:
                if not a.protocol:
                    p.error(f"--epochs needs --{key.replace('_', '-')} (or --protocol, which sets it)")
                setattr(a, key, value)
        batching = (pareto.yaml.safe_load(a.config.read_text()).get("data") or {}).get("batching") or {}
        sft_bs, dpo_bs = batching.get("sft_batch_size", 8), batching.get("dpo_batch_size", 4)
        if a.sft_rows % sft_bs or a.pairs % dpo_bs or a.sft_rows // sft_bs != a.pairs // dpo_bs:
            p.error(f"--sft-rows {a.sft_rows} at {sft_bs} a step and --pairs {a.pairs} at {dpo_bs} a step must make"
                    " the same whole number of steps an epoch")  # fmt: skip
        a.plan = Protocol(a.epochs, a.sft_rows // sft_bs)
    default = "real_smollm2_protocol" if a.plan else "real_smollm2"
    a.out = a.out or (PROTOCOL_OUT if a.plan else OUT)
    runs = (a.runs or REPO.parent / f"{default}_runs").resolve()
    settings = local_settings(model_dir, data_dir) + a.settings
    if a.generate:
        return generate(a, runs, model_dir, data_dir)
    a.out.mkdir(parents=True, exist_ok=True)
    for path in seed_runs(a.out, runs):
        print(f"reusing the committed {path.relative_to(runs)}", flush=True)

    def one(job: tuple[str, int, float]) -> None:
        method, seed, lam = job
        run_dir, sel, steps, extra, optimum_file = run_spec(a, runs, method, seed, lam, settings)
        s = pareto.fit(a.config.resolve(), run_dir, sel, lam, seed, steps, extra, optimum_file, reuse=True)
        print(f"seed {seed} lam {lam:g} {method}: f_sft {s['val/sft_loss']:.4f} f_dpo {s['val/dpo_loss']:.4f}"
              f" step time {s['step_time_s']:.1f}s", flush=True)  # fmt: skip

    points = parse_points(p, a.points) if a.points else [(seed, lam) for seed in a.seeds for lam in a.lams]
    point_seeds = sorted({seed for seed, _ in points})
    seeds, lams = sorted({*a.seeds, *point_seeds}), sorted({*a.lams, *(lam for _, lam in points)})
    if a.plan is not None:
        record = write_subsets(data_dir, runs, seeds, a.sft_rows, a.pairs, a.held_out)
        (a.out / "subsets.json").write_text(json.dumps(record, indent=1) + "\n")
    if a.gather:
        points = point_seeds = []  # start nothing
    singles = list(pareto.SINGLES) + (list(PLATEAU.values()) if a.plan is not None and a.plateau else [])
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(one, [(m, seed, 0.5) for seed in point_seeds for m in pareto.SINGLES]))
        for seed in point_seeds:
            seed_dir = runs / f"seed{seed}"
            summaries = (seed_dir / "sft_only" / "summary.json", seed_dir / "dpo_only" / "summary.json")
            write_optimum(optimum_from_summaries(*summaries), seed_dir / "optimum.json")
            if a.plan is not None:
                write_optimum(optimum_from_summaries(*summaries, prefix="held_in"), seed_dir / "optimum_held_in.json")
        # Mix costs two graphs per step: start it first so the pool stays balanced.
        order = sorted(a.methods, key=lambda m: m != "mix")
        list(pool.map(one, [(m, seed, lam) for seed, lam in points for m in order]))
        list(pool.map(one, [(m, seed, 0.5) for seed in point_seeds for m in singles[2:]]))
    # Gather: start no run, only write the table and the picture of the finished ones.
    if a.plan is None:
        pareto.run_benchmark(a.config.resolve(), a.out, seeds, lams, a.steps, a.methods, settings, True, runs, 1, True)
        (a.out / "conflict.md").write_text(conflict_report(runs, seeds, lams))
    else:
        words = (f"budget in epochs of the training subsets ({a.sft_rows} SFT rows, {a.pairs} pairs:"
                 f" {a.plan.steps_per_epoch} optimizer steps an epoch): E = {a.epochs:g} epochs for the optima,"
                 " T_SFT + T_DPO epochs for every other run (lam 0.5: E + E)")  # fmt: skip
        pareto.run_benchmark(a.config.resolve(), a.out, seeds, lams, a.steps, a.methods, settings, True, runs, 1, True,
                             steps_of=a.plan.steps, evals=pareto.HELD_IN_AND_OUT, budget=words)  # fmt: skip
        rows = forgetting_rows(runs, seeds, lams, a.plan)
        pareto.write_csv(a.out / "forgetting.csv", rows, FORGETTING_COLUMNS)
        (a.out / "forgetting.md").write_text(forgetting_markdown(rows, runs, seeds, a.plan))
        trade = tradeoff_rows(pareto.read_csv(a.out / "pareto.csv"), runs, seeds)
        pareto.write_csv(a.out / "tradeoff.csv", trade, TRADEOFF_COLUMNS)
        (a.out / "tradeoff.md").write_text(tradeoff_markdown(trade))
    (a.out / "commands.txt").write_text(finished_commands(a, runs, seeds, lams, settings))
    for summary in runs.rglob("summary.json"):
        dest = a.out / "runs" / summary.relative_to(runs)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(summary.read_text().replace(str(REPO.parent) + "/", "../"))  # paths beside the checkout
        for picture in summary.parent.glob("trajectory.png"):
            shutil.copyfile(picture, dest.parent / picture.name)
    print(f"wrote {a.out}", flush=True)


def generate(a: argparse.Namespace, runs: Path, model_dir: Path, data_dir: Path) -> None:
    """Answers of the reference, Sequential (SFT->DPO) and ALRIGHT for held-out HH prompts."""
    out = a.out / "answers"
    out.mkdir(parents=True, exist_ok=True)
    models = {"reference": str(model_dir)}
    commands: list[str] = []
    kept = KEEP_CHECKPOINT if a.plan is None else PROTOCOL_KEEP_CHECKPOINT
    for method in kept:
        models[method] = str(pareto.run_dir_of(runs, a.seeds[0], method, a.lams[0]) / "checkpoints" / "last.ckpt")
    if a.plan is not None:  # the reference as the runs saw it: their chat template and prompt length
        models["reference"] = models[kept[-1]]
    for name, model in models.items():
        args = [sys.executable, "-m", "xright_pl", "generate", "--model", model,
                "--prompts", str(data_dir / "hh_rlhf_pref_eval.jsonl"), "--format", "prompt_chosen_rejected",
                "--limit", str(a.prompts), "--max_new_tokens", "96", "--output", str(out / f"{name}.json"),
                "--generator", name, "--overwrite", "true", "--progress", "false"]  # fmt: skip
        if name == "reference":
            args += ["--reference", "true"] if a.plan is not None else ["--use_chat_template", "true",
                                                                        "--max_prompt_length", "64"]  # fmt: skip
        print(" ".join(args), flush=True)
        subprocess.run(args, check=True)
        commands.append(" ".join(shlex.quote(x) for x in ["python", *args[1:]]))
    text = "\n".join(commands).replace(str(REPO) + "/", "").replace(str(REPO.parent) + "/", "../")
    (out / "commands.txt").write_text(text + "\n")
    for settings in out.glob("*.settings.json"):  # paths beside the checkout, as commands.txt
        settings.write_text(settings.read_text().replace(str(REPO.parent) + "/", "../"))
    (out / "answers.md").write_text(answers_markdown(out, list(models)))


def answers_markdown(out: Path, names: list[str]) -> str:
    """The answers of every model side by side, prompt by prompt (greedy, as generated)."""
    answers = {n: json.loads((out / f"{n}.json").read_text()) for n in names}
    settings = out / f"{names[0]}.json.settings.json"
    prompt_tokens = json.loads(settings.read_text()).get("max_prompt_length") if settings.exists() else None
    fit = f"the last turns that fit in {prompt_tokens} tokens" if prompt_tokens else "whole prompts"
    lines = ["# Answers to held-out HH-RLHF prompts", "",
             f"Greedy decoding, at most 96 new tokens, prompts through the chat template ({fit}; the prompts below"
             f" are shown whole). Models: {', '.join(names)}. Commands: `commands.txt`.", ""]  # fmt: skip
    for i, row in enumerate(answers[names[0]]):
        prompt = row["instruction"].strip().replace("\n\n", " ").replace("\n", " ")
        lines += [f"## Prompt {i + 1}", "", f"> …{prompt[-400:]}" if len(prompt) > 400 else f"> {prompt}", ""]
        for n in names:
            text = answers[n][i]["output"].strip().replace("\n", " ")
            lines += [f"**{n}**: {text}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
