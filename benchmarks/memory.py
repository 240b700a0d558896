"""Peak memory and step time of one DPO step (live reference) and one SFT step, against TRL and today's path.

Systems (``system`` column): ``xright_pl`` (the default: fused, response-only log-probs, see
``xright_pl/objectives/fused.py``), ``xright_pl_unfused`` (``XRightModule(fused_logps=False)``: the full ``[N, T, V]``
logits), ``trl`` (TRL's ``DPOTrainer`` / ``SFTTrainer`` with their default fused LM head, gradient checkpointing
and bf16 autocast off as in ``step_speed.py``, no Liger) and ``plain`` (a hand-written PyTorch loop on the full
logits). Each (system, step, model) is measured in its own fresh process, so that nothing one measurement
allocated counts for the next. The rows, data, trainers and the plain loop are those of ``step_speed.py``
(``bench_setup.py``, ``bench_systems.py``: shared, not copied): synthetic token ids of exactly ``--seq-len``
tokens whose prompts are half of each sequence, ``--pairs`` preference pairs per DPO step and the same
``2 * pairs`` sequences per SFT step, AdamW, clipping at 1.0.

Models, random weights from the config (no download): the real SmolLM2-135M configuration (Llama, vocabulary
49,152, 30 layers, hidden 576, tied embeddings) and the same body cut to 2 layers at a Llama-3 vocabulary
(128,256), to show how each system scales with ``V``. ``--quick`` keeps the real vocabularies and width but runs
the 2-layer body at both, with 2 pairs x 256 tokens, one warm-up and one measured step, two measurements at a
time (``--jobs 2``, one thread each): 8 CPU-minutes in all (measured), so about 4 minutes on 2 idle CPU cores.

``peak_memory_mb``: the peak resident set size of the process over the warm-up and measured steps (Linux
``VmHWM``, reset after the model, the data and the trainer are built); on a GPU ``torch.cuda.max_memory_allocated``
over the same steps. ``step_ms``: the median measured step (step end to step end). Output: ``memory.csv``
(columns :data:`CSV_FIELDS`), ``memory.md`` (the table with the ratios) and the table on stdout.

Usage::

    python benchmarks/memory.py --quick --out out/memory      # CPU, 2-layer body at V = 49,152 and 128,256
    python benchmarks/memory.py --out out/memory              # CPU, SmolLM2-135M at 4 x 512 + 2 layers at 128,256
    python benchmarks/memory.py --gpu --out out/memory        # the same on CUDA, bf16 weights

TRL is a benchmark-only extra (``pip install trl``); without it the TRL rows are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_setup  # noqa: E402  (the shared benchmark helpers, beside this file)
from bench_setup import Setup  # noqa: E402
from bench_systems import plain_loop, trl_step, use_trl, xright_step  # noqa: E402

SMOLLM2_135M = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "attention_dropout": 0.0,
}
LLAMA3_VOCAB = 128_256

SYSTEMS = ("xright_pl", "xright_pl_unfused", "trl", "plain")
STEPS = ("dpo", "sft")
CSV_FIELDS = ("system", "step", "vocab", "layers", "tokens", "peak_memory_mb", "step_ms", "device")


def models(quick: bool) -> list[dict[str, Any]]:
    """The model configs of a run: SmolLM2-135M (30 layers; ``quick``: 2) and 2 layers at V = 128,256."""
    body = {**SMOLLM2_135M, "num_hidden_layers": 2}
    first = body if quick else dict(SMOLLM2_135M)
    return [first, {**body, "vocab_size": LLAMA3_VOCAB}]


def base_setup(args: argparse.Namespace) -> Setup:
    """The settings shared by every row (the model config is set per row)."""
    quick = args.quick
    setup = Setup(
        pairs=args.pairs or (2 if quick else 4),
        seq_len=args.seq_len or (256 if quick else 512),
        steps=args.steps or (1 if quick else 3),
        warmup=args.warmup if args.warmup is not None else 1,
        repeats=1,
    )
    if args.gpu:
        setup = replace(setup, dtype="bfloat16", precision="bf16-true", device="cuda")
    return replace(setup, prompt_len=setup.seq_len // 2)


# ------------------------------------------------------------------------------------------ one measurement
def measure_one(setup: Setup, system: str, step: str) -> tuple[float, float | None]:
    """``(median step seconds, peak MiB)`` of ``system`` on ``step``, in this process."""
    bench_setup.CPU_PEAK_RSS = setup.device == "cpu"
    if system == "plain":
        intervals, peak, _ = plain_loop(setup, step)
    elif system in ("xright_pl", "xright_pl_unfused"):
        intervals, peak, _ = xright_step(replace(setup, fused_logps=system == "xright_pl"), step)
    elif system == "trl":
        intervals, peak, _ = trl_step(setup, step)
    else:
        raise ValueError(f"unknown system {system!r}")
    if not intervals:
        raise RuntimeError(f"{system} {step}: no measured step (warmup {setup.warmup}, steps {setup.steps})")
    return statistics.median(intervals), peak


def child(spec: dict[str, Any]) -> None:
    """Run one measurement (``--one``) and print its row as the last line of stdout."""
    import torch

    torch.set_num_threads(spec["threads"])
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("xright_pl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    bench_setup.setup_out_dir = spec["out"]
    setup = Setup(**spec["setup"])
    torch.manual_seed(setup.seed)
    step_s, peak = measure_one(setup, spec["system"], spec["step"])
    row = {
        "system": spec["system"],
        "step": spec["step"],
        "vocab": setup.model_config["vocab_size"],
        "layers": setup.model_config["num_hidden_layers"],
        "tokens": setup.tokens_per_step,
        "peak_memory_mb": round(peak, 1) if peak is not None else "",
        "step_ms": round(1000 * step_s, 1),
        "device": torch.cuda.get_device_name() if setup.device == "cuda" else "cpu",
    }
    print(json.dumps(row), flush=True)


def run_in_fresh_process(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One measurement in a new Python process; its row, or an ``error`` row."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(lines[-1])


def _measured(spec: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    """:func:`run_in_fresh_process`, logged to stderr; None when it failed."""
    t0 = time.perf_counter()
    row = run_in_fresh_process(spec, timeout)
    took = time.perf_counter() - t0
    config = spec["setup"]["model_config"]
    label = f"{spec['system']:18s} {spec['step']:4s} V={config['vocab_size']} L={config['num_hidden_layers']}"
    if "error" in row:
        print(f"{label} FAILED after {took:.0f}s:\n{row['error']}", file=sys.stderr, flush=True)
        return None
    print(f"{label} {row['peak_memory_mb']} MiB {row['step_ms']} ms ({took:.0f}s)", file=sys.stderr, flush=True)
    return row


# ------------------------------------------------------------------------------------------ table
def ratios(table: list[dict]) -> dict[str, float]:
    """Per model (``V``, layers) and step: xright_pl over TRL and over today's path, for memory and time."""
    by = {(r["system"], r["step"], r["vocab"], r["layers"]): r for r in table}
    out: dict[str, float] = {}
    for (system, step, vocab, layers), row in by.items():
        if system != "xright_pl":
            continue
        for other, name in (("trl", "trl"), ("xright_pl_unfused", "unfused")):
            den = by.get((other, step, vocab, layers))
            if den is None:
                continue
            for col, short in (("peak_memory_mb", "memory"), ("step_ms", "time")):
                if row[col] not in ("", None) and den[col] not in ("", None, 0):
                    out[f"{step} V={vocab} L={layers} {short} xright_pl/{name}"] = round(row[col] / den[col], 3)
    return out


def format_table(table: list[dict], r: dict[str, float]) -> str:
    head = "| system | step | V | layers | tokens | peak memory (MiB) | step (ms) | device |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(
            f"| {row['system']} | {row['step']} | {row['vocab']} | {row['layers']} | {row['tokens']} |"
            f" {row['peak_memory_mb']} | {row['step_ms']} | {row['device']} |"
        )
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in r.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2-layer body at both vocabularies, 2 x 256 tokens")
    mode.add_argument("--gpu", action="store_true", help="on CUDA with bf16 weights")
    mode.add_argument("--one", metavar="JSON", help=argparse.SUPPRESS)  # a child process: one measurement
    parser.add_argument("--out", default="out/memory", help="folder for memory.csv and memory.md")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {','.join(SYSTEMS)}")
    parser.add_argument("--steps-of", default=",".join(STEPS), help=f"comma-separated step kinds, of {','.join(STEPS)}")
    parser.add_argument("--pairs", type=int, help="preference pairs per DPO step (SFT: twice as many rows)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (the prompt is half of it)")
    parser.add_argument("--steps", type=int, help="measured steps (median)")
    parser.add_argument("--warmup", type=int, help="unmeasured steps first (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of each measurement (default 1)")
    parser.add_argument("--vocabs", help="comma-separated vocabulary sizes to keep (default: both models)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument(
        "--jobs",
        type=int,
        help="measurements at once, each its own process of --threads threads (default: 2 with --quick, else 1;"
        " peak memory is per process either way, step times then share the machine)",
    )
    parser.add_argument(
        "--model-config", type=json.loads, help="JSON overrides of every model's config (not its vocab_size)"
    )
    args = parser.parse_args(argv)
    if args.one:
        child(json.loads(args.one))
        return []
    systems = [s for s in args.systems.split(",") if s]
    steps = [s for s in args.steps_of.split(",") if s]
    bad = sorted(set(systems) - set(SYSTEMS)) + sorted(set(steps) - set(STEPS))
    if bad:
        parser.error(f"unknown systems or steps {bad}; systems: {SYSTEMS}, steps: {STEPS}")
    if "trl" in systems and not use_trl(True):
        systems.remove("trl")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = base_setup(args)
    configs = models(args.quick)
    if args.model_config:
        extra = {k: v for k, v in args.model_config.items() if k != "vocab_size"}
        configs = [{**c, **extra} for c in configs]
    if args.vocabs:
        keep = {int(v) for v in args.vocabs.split(",")}
        configs = [c for c in configs if c["vocab_size"] in keep]
    specs = [
        {
            "setup": asdict(replace(setup, model_config=dict(config))),
            "system": system,
            "step": step,
            "threads": args.threads,
            "out": str(out),
        }
        for config in configs
        for step in steps
        for system in systems
    ]
    jobs = args.jobs or (2 if args.quick else 1)
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads that wait on child processes
        rows = list(pool.map(lambda spec: _measured(spec, args.timeout), specs))
    table = [row for row in rows if row is not None]
    bench_setup.write_csv(out / "memory.csv", CSV_FIELDS, table)
    r = ratios(table)
    text = format_table(table, r)
    (out / "memory.md").write_text(text + "\n")
    print(text)
    return table


if __name__ == "__main__":
    main()
