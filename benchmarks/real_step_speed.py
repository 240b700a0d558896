"""Step speed of xright_pl against the plain PyTorch loop and TRL on a pretrained model and real rows.

A pretrained model folder (``save_pretrained``) on real variable-length rows (``--real-data`` preference pairs
such as HH-RLHF, ``--real-sft-data`` SFT rows such as Alpaca), tokenized by xright_pl's own loaders with the
model's chat template (``max_length`` 128, ``max_prompt_length`` 64), in two settings groups (see
:func:`measure_real`): ``equal`` (plain, xright_pl and TRL on the same batches in the same order, no length
grouping, live reference; ``dpo_cached`` with precomputed reference log-probs) and ``best`` (xright_pl and TRL
with cached reference log-probs on the same length-grouped batches, each with its own padding). Rows are compared
by real (non-padding) tokens per second over the measured steps (median over repeats); the table prints each
row's time over plain's (equal) and over TRL's (same settings).

Output: ``step_speed.csv`` (columns :data:`REAL_CSV_FIELDS`) and ``ratios.json`` (the setup, the threads, the
ratios, the targets met or missed and each grouper's padding share of one epoch of the pool), the table on stdout.
The systems are those of ``step_speed.py`` (``bench_systems.py``), the rows :func:`bench_setup.real_rows`.

Usage::

    python benchmarks/real_step_speed.py ../smollm2 --real-data ../shared/data/hh_rlhf_pref_train.jsonl \
        --real-sft-data ../shared/data/alpaca_gpt4_sft_train.jsonl --threads 2 --out out/real_step_speed

Defaults: 2 pairs, max_length 128, 1 warm-up + 4 measured steps, 1 repeat. TRL is a benchmark-only extra
(``pip install trl``); without it the TRL rows are skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers, beside this file

from bench_setup import (  # noqa: E402
    RealSetup,
    add_setup_args,
    grouped_order,
    log,
    objective_lengths,
    only_rows,
    prepare,
    real_pool,
    write_csv,
)
from bench_systems import Timed, plain_loop, trl_step, use_trl, xright_step  # noqa: E402

REAL_STEPS = ("dpo", "dpo_cached", "sft")
#: Steps at each system's best settings: DPO with cached reference log-probs, and SFT, both length-grouped.
BEST_STEPS = ("dpo_cached", "sft")
REAL_CSV_FIELDS = (
    "settings",
    "system",
    "step",
    "real_tokens_per_s",
    "step_ms",
    "vs_plain",
    "vs_trl",
    "padding_share",
    "real_tokens",
    "padded_positions",
    "peak_memory_mb",
    "device",
)
#: Issue 12's targets: xright_pl's time for the same work over plain's (equal settings: within 5%) and over
#: TRL's (best settings: faster).
REAL_TARGETS = {("equal", "plain"): ("<=", 1.05), ("best", "trl"): ("<", 1.0)}


def measure_real(
    setup: RealSetup,
    with_trl: bool,
    log: Callable[[str], None] = print,
    only: tuple[str, ...] = REAL_STEPS,
    settings: tuple[str, ...] = ("equal", "best"),
) -> list[dict]:
    """Measure the real-model rows, repeats interleaved across systems; returns the table rows.

    ``equal``: plain, xright_pl and TRL on the same batches in the same order (file order, no length grouping,
    padded to a multiple of 8, reference forward live; ``dpo_cached``: reference log-probs precomputed before
    training). ``best``: xright_pl and TRL on the same length-grouped batches (see :func:`bench_setup.real_rows`), each
    padding as it does by default on this device (``dpo_cached``: precomputed reference log-probs). At one
    settings every system trains the same batches, so ``vs_plain`` / ``vs_trl`` (real tokens per second of plain /
    TRL over the row's) are the row's time over plain's / TRL's (below 1: faster)."""
    jobs: list[tuple[str, str, str, Callable[[], Timed]]] = []
    if "equal" in settings:
        for step in only:
            jobs.append(("equal", "plain", step, lambda s=step: plain_loop(setup, s)))
            jobs.append(("equal", "xright_pl", step, lambda s=step: xright_step(setup, s)))
            if with_trl:
                jobs.append(("equal", "trl", step, lambda s=step: trl_step(setup, s)))
    if "best" in settings:
        for step in (s for s in BEST_STEPS if s in only):
            jobs.append(("best", "xright_pl", step, lambda s=step: xright_step(setup, s, best=True)))
            if with_trl:
                jobs.append(("best", "trl", step, lambda s=step: trl_step(setup, s, best=True)))
    if not jobs:
        raise SystemExit(f"nothing to measure: best settings measure {BEST_STEPS}, --only gave {only}")
    threads = torch.get_num_threads()
    runs: dict[tuple[str, str, str], list[tuple[float, int, int, int]]] = {j[:3]: [] for j in jobs}
    peaks: dict[tuple[str, str, str], list[float]] = {j[:3]: [] for j in jobs}
    for rep in range(setup.repeats):
        for settings_, system, step, fn in jobs:
            torch.set_num_threads(threads)  # the same threads for every system
            t0 = time.perf_counter()
            intervals, peak, tokens = fn()
            if len(tokens) != len(intervals) or not intervals:
                raise RuntimeError(f"{system} {step}: {len(intervals)} step times but {len(tokens)} token counts")
            real, positions = sum(t[0] for t in tokens), sum(t[1] for t in tokens)
            runs[(settings_, system, step)].append((sum(intervals), real, positions, len(intervals)))
            if peak is not None:
                peaks[(settings_, system, step)].append(peak)
            log(f"[{rep + 1}/{setup.repeats}] {settings_:5s} {system:9s} {step:10s} {time.perf_counter() - t0:6.1f}s")
    device = torch.cuda.get_device_name() if setup.device == "cuda" else "cpu"
    table = []
    for key, reps in runs.items():
        settings_, system, step = key
        _, real, positions, _ = reps[0]
        table.append(
            {
                "settings": settings_,
                "system": system,
                "step": step,
                "real_tokens_per_s": round(statistics.median(r / t for t, r, _, _ in reps), 1),
                "step_ms": round(statistics.median(1000 * t / n for t, _, _, n in reps), 1),
                "vs_plain": "",
                "vs_trl": "",
                "padding_share": round(1 - real / positions, 4),
                "real_tokens": real,
                "padded_positions": positions,
                "peak_memory_mb": round(max(peaks[key]), 1) if peaks[key] else "",
                "device": device,
            }
        )
    by_key = {(r["settings"], r["system"], r["step"]): r for r in table}
    for r in table:
        for other in ("plain", "trl"):
            base = by_key.get((r["settings"], other, r["step"]))
            if base is not None and base is not r:
                r[f"vs_{other}"] = round(base["real_tokens_per_s"] / r["real_tokens_per_s"], 4)
        first = next(q for q in table if (q["settings"], q["step"]) == (r["settings"], r["step"]))
        if r["real_tokens"] != first["real_tokens"]:
            log(f"warning: {r['settings']} {r['system']} {r['step']} trained other tokens than {first['system']}")
    return table


def real_ratios(table: list[dict]) -> dict[str, float]:
    """xright_pl's time for the same work over plain's and TRL's, per settings and step (from one table)."""
    return {
        f"{r['settings']}: xright_pl/{other} {r['step']} time": r[f"vs_{other}"]
        for r in table
        if r["system"] == "xright_pl"
        for other in ("plain", "trl")
        if r[f"vs_{other}"] != ""
    }


def format_real_table(table: list[dict]) -> str:
    head = f"{'settings':8s} {'system':10s} {'step':10s} {'real tok/s':>10s} {'step ms':>9s} {'vs plain':>8s}"
    lines = [head + f" {'vs trl':>7s} {'padding':>7s} {'peak MiB':>9s}  device"]
    for r in table:
        lines.append(
            f"{r['settings']:8s} {r['system']:10s} {r['step']:10s} {r['real_tokens_per_s']:10.1f} {r['step_ms']:9.1f}"
            f" {str(r['vs_plain']):>8s} {str(r['vs_trl']):>7s} {r['padding_share']:7.1%}"
            f" {str(r['peak_memory_mb']):>9s}  {r['device']}"
        )
    return "\n".join(lines)


def grouping_padding(setup: RealSetup) -> dict[str, dict[str, float]]:
    """Padding share of one epoch over the whole pool, per objective, for a random order and for the orders of
    xright_pl's and of transformers' (TRL's) ``group_by_length`` samplers, each padding to the longest row of a
    batch: how well each library's own grouping does on this data at full size."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    sft, pref, _ = real_pool(setup)
    out = {}
    for name, rows, bs in (("dpo", pref, setup.pairs), ("sft", sft, 2 * setup.pairs)):
        lengths = objective_lengths(rows, name)
        seqs = 2 if name == "dpo" else 1
        real = sum(len(r[c]) for r in rows for c in rows[0] if c.endswith("input_ids"))
        g = lambda: torch.Generator().manual_seed(setup.seed)  # noqa: E731
        orders = {
            "random": torch.randperm(len(rows), generator=g()).tolist(),
            "xright_pl": grouped_order(rows, bs, name, setup.seed),
            "transformers": get_length_grouped_indices(lengths, bs, generator=g()),
        }
        out[name] = {"rows": len(rows)}
        for k, order in orders.items():
            positions = sum(seqs * len(b) * max(lengths[i] for i in b) for b in _batches(order, bs))
            out[name][k] = round(1 - real / positions, 4)
    return out


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def main(argv: list[str] | None = None) -> list[dict]:
    """Equal- and best-settings rows on a pretrained model and real rows."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Defaults: 2 pairs, max_length 128, 1 warm-up + 4 measured steps, 1 repeat.",
    )
    parser.add_argument("model_dir", metavar="DIR", help="a pretrained model folder (save_pretrained)")
    parser.add_argument("--gpu", action="store_true", help="on CUDA, bf16 weights")
    add_setup_args(
        parser,
        "out/real_step_speed",
        "step_speed.csv and ratios.json",
        seq_len="max_length of the rows (max_prompt_length: half of it; default 128)",
    )
    parser.add_argument(
        "--real-data", metavar="PREF_JSONL", required=True, help="preference rows (e.g. HH-RLHF prompt/chosen/rejected)"
    )
    parser.add_argument(
        "--real-sft-data",
        metavar="SFT_JSONL",
        help="SFT rows (e.g. Alpaca); default: the pairs' chosen and rejected sequences",
    )
    parser.add_argument("--tokenizer", help="tokenizer folder or name (default: the model folder)")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL rows")
    parser.add_argument("--only", help=f"comma-separated step rows to measure (of {','.join(REAL_STEPS)})")
    parser.add_argument("--settings", default="equal,best", help="settings groups to measure")
    parser.add_argument(
        "--pool", type=int, help="pairs the best-settings batches are length-grouped from (default 200 x pairs)"
    )
    args = parser.parse_args(argv)
    settings = tuple(args.settings.split(","))
    if set(settings) - {"equal", "best"}:
        parser.error(f"--settings: choose from equal,best; got {args.settings!r}")
    only = only_rows(args.only, REAL_STEPS, parser)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device")
    gpu = {"device": "cuda", "dtype": "bfloat16", "precision": "bf16-true"} if args.gpu else {}
    lengths = {"seq_len": args.seq_len, "prompt_len": args.seq_len // 2} if args.seq_len else {}
    overrides = {"pairs": args.pairs, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats}
    overrides["pool"] = args.pool
    setup = RealSetup(
        model_path=args.model_dir,
        pref_path=args.real_data,
        sft_path=args.real_sft_data,
        tokenizer=args.tokenizer,
        **gpu,
        **lengths,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    if setup.warmup < 1 or setup.steps < 1:
        parser.error("needs --warmup >= 1 and --steps >= 1")
    out = prepare(args)
    import datasets

    datasets.disable_progress_bars()
    with_trl = use_trl(not args.no_trl)
    torch.manual_seed(setup.seed)
    table = measure_real(setup, with_trl, log=log, only=only, settings=settings)
    write_csv(out / "step_speed.csv", REAL_CSV_FIELDS, table)
    r = real_ratios(table)
    targets = {n: t for n in r for (g, o), t in REAL_TARGETS.items() if n.startswith(f"{g}: xright_pl/{o} ")}
    padding = grouping_padding(setup) if "best" in settings else {}
    info = {"setup": asdict(setup), "threads": torch.get_num_threads(), "ratios": r, "targets": targets}
    info["grouping_padding"] = padding
    (out / "ratios.json").write_text(json.dumps(info, indent=2))
    print(format_real_table(table))
    print()
    for name, shares in padding.items():
        orders = ", ".join(f"{k} {v:.1%}" for k, v in shares.items() if k != "rows")
        print(f"padding share of one epoch of the {name} pool ({shares['rows']} rows), by order: {orders}")
    for name, v in r.items():
        op, t = targets.get(name, ("", None))
        met = t is not None and (v <= t if op == "<=" else v < t)
        verdict = "" if t is None else f"  target {op} {t:.2f}: {'met' if met else 'missed'}"
        print(f"{name:42s} {v:.3f}{verdict}")
    return table


if __name__ == "__main__":
    main()
