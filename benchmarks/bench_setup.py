"""What the speed and memory benchmarks share: the set-up of a job and the means to measure it.

- the model shapes (:data:`PYTHIA_1B`, :data:`TINY_NEOX`), :class:`Setup` with its ``--quick`` / ``--gpu`` presets,
  and :class:`RealSetup` (a pretrained model folder and real rows instead);
- a job's rows (:func:`synthetic_rows`, :func:`real_rows`) and the library's data module over them
  (:func:`data_module`);
- device synchronisation and the memory probes (:func:`reset_memory`, :func:`peak_mb`, :data:`CPU_PEAK_RSS`);
- the driver of the synthetic benchmarks (``step_speed.py``, ``run_speed.py``): interleaved repeats
  (:func:`measure_jobs`), the table (:data:`CSV_FIELDS`, :func:`speed_table`, :func:`format_table`), the ratios
  and the output files (:func:`put_ratio`, :func:`report`), and the command-line options every benchmark reads
  (:func:`add_setup_args`, :func:`prepare`).

The systems measured (the plain loop, xright_pl, TRL) are ``bench_systems.py``. Not a script: the benchmarks
beside it import it.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import json
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

PYTHIA_1B = {
    "model_type": "gpt_neox",
    "vocab_size": 50304,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 8,
    "max_position_embeddings": 2048,
    "rotary_pct": 0.25,
    "use_parallel_residual": True,
    "tie_word_embeddings": False,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
}

TINY_NEOX = {
    **PYTHIA_1B,
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
}

CSV_FIELDS = ("system", "step", "tokens_per_s", "step_ms", "peak_memory_mb", "device")


@dataclass
class Setup:
    """One benchmark configuration (shared by every row)."""

    model_config: dict[str, Any] = field(default_factory=lambda: dict(TINY_NEOX))
    dtype: str = "float32"
    precision: str = "32-true"
    pairs: int = 4
    seq_len: int = 128
    prompt_len: int = 32
    steps: int = 8
    warmup: int = 3
    repeats: int = 3
    run_steps: int = 40
    lr: float = 1e-5
    lam: float = 0.5
    beta: float = 0.1
    seed: int = 0
    device: str = "cpu"
    fused_logps: bool = True  # xright_pl's fused, response-only log-probs (XRightModule(fused_logps=...))

    @property
    def tokens_per_step(self) -> int:
        return 2 * self.pairs * self.seq_len

    @property
    def rows(self) -> int:
        return self.pairs * (self.warmup + self.steps + 2)


def quick_setup() -> Setup:
    return Setup()


def gpu_setup() -> Setup:
    return Setup(
        model_config=dict(PYTHIA_1B),
        dtype="bfloat16",
        precision="bf16-true",
        pairs=8,
        seq_len=512,
        prompt_len=128,
        steps=10,
        warmup=3,
        repeats=1,
        run_steps=30,
        device="cuda",
    )


@dataclass
class RealSetup(Setup):
    """A pretrained model folder and real preference (and SFT) rows instead of a config and synthetic ids.

    ``seq_len`` / ``prompt_len`` are the data's ``max_length`` / ``max_prompt_length``. Each job trains one epoch
    of ``warmup + steps`` batches: ``rows`` pairs (``2 * rows`` SFT rows), the same for every system at the same
    settings (see :func:`real_rows`). ``pool`` pairs (``2 * pool`` SFT rows) are tokenized for the length-grouped
    (best settings) batches; 0: ``200 * pairs``, four mega-batches of 50 batches."""

    model_config: dict[str, Any] = field(default_factory=dict)
    model_path: str = ""
    pref_path: str = ""
    sft_path: str | None = None
    tokenizer: str | None = None
    pairs: int = 2
    prompt_len: int = 64
    steps: int = 4
    warmup: int = 1
    repeats: int = 1
    pool: int = 0

    @property
    def rows(self) -> int:
        return self.pairs * (self.warmup + self.steps)

    @property
    def pool_pairs(self) -> int:
        return max(self.rows, self.pool or 200 * self.pairs)


# ------------------------------------------------------------------------------------------ data
def synthetic_rows(setup: Setup) -> tuple[list[dict], list[dict]]:
    """SFT rows and preference rows of exactly ``seq_len`` tokens (prompt ``prompt_len``), seeded.

    The SFT rows are the chosen and rejected sequences of the preference rows: the same tokens."""
    g = torch.Generator().manual_seed(setup.seed)
    vocab = setup.model_config["vocab_size"]
    n, t, p = setup.rows, setup.seq_len, setup.prompt_len
    ids = torch.randint(3, vocab, (n, 3, t), generator=g).tolist()
    pref, sft = [], []
    for prompt_c_r in ids:
        prompt = prompt_c_r[0][:p]
        seqs = [prompt + prompt_c_r[k][: t - p] for k in (1, 2)]
        labels = [[-100] * p + s[p:] for s in seqs]
        pref.append(
            {
                "chosen_input_ids": seqs[0],
                "chosen_labels": labels[0],
                "rejected_input_ids": seqs[1],
                "rejected_labels": labels[1],
            }
        )
        sft.extend({"input_ids": s, "labels": lab} for s, lab in zip(seqs, labels))
    return sft, pref


def real_rows(setup: RealSetup, best: bool = False) -> tuple[list[dict], list[dict], int]:
    """``(sft_rows, pref_rows, pad_id)`` of a real-model job, tokenized by xright_pl's own loaders as training
    does (chat template, ``max_length`` / ``max_prompt_length``); fresh dicts on every call.

    Equal settings: the first ``rows`` pairs and ``2 * rows`` SFT rows of the files, in file order. Best settings:
    the first ``warmup + steps`` batches of the order ``group_by_length`` gives the pool (a seeded permutation cut
    into mega-batches of 50 batches, each sorted by length, batches shuffled, the longest first), the same for
    xright_pl and TRL. Without an SFT file the SFT rows are the pairs' chosen and rejected sequences."""
    sft, pref, pad_id = real_pool(setup)
    if best:
        pref = [pref[i] for i in grouped_order(pref, setup.pairs, "dpo", setup.seed)[: setup.rows]]
        sft = [sft[i] for i in grouped_order(sft, 2 * setup.pairs, "sft", setup.seed)[: 2 * setup.rows]]
    return [dict(r) for r in sft[: 2 * setup.rows]], [dict(r) for r in pref[: setup.rows]], pad_id


def real_pool(setup: RealSetup) -> tuple[list[dict], list[dict], int]:
    tokenizer = setup.tokenizer or setup.model_path
    lengths = (setup.seq_len, setup.prompt_len)
    sft, pref, pad_id = _tokenized(tokenizer, setup.pref_path, setup.sft_path, *lengths, setup.pool_pairs)
    for flag, have, need in (("--real-data", len(pref), setup.rows), ("--real-sft-data", len(sft), 2 * setup.rows)):
        if have < need:
            raise SystemExit(f"{flag}: {have} usable rows after tokenization; the run needs {need}")
    return sft, pref, pad_id


@functools.cache
def _tokenized(tokenizer: str, pref_path: str, sft_path: str | None, max_length: int, max_prompt_length: int, n: int):
    """Up to ``n`` pairs and ``2 * n`` SFT rows, tokenized (cached: every job of a run reads the same rows)."""
    from xright_pl.data.chat import has_chat_template
    from xright_pl.data.sources import PreferenceData, SFTData, load_preference, load_sft, load_tokenizer

    tok = load_tokenizer(tokenizer)
    cfg = {
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "val_fraction": 0.0,
        "use_chat_template": has_chat_template(tok),
    }

    def head(ds, k: int, columns: tuple[str, ...]) -> list[dict]:
        return [{c: r[c] for c in columns} for r in ds.select(range(min(k, len(ds))))]

    # Read more rows than needed: rows whose prompt cannot be fitted and identical pairs are skipped.
    pref = load_preference(PreferenceData(path=pref_path, limit=n + n // 4 + 16, **cfg), tok).train
    pref_rows = head(pref, n, ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"))
    if sft_path:
        sft = load_sft(SFTData(path=sft_path, limit=2 * n + n // 2 + 16, **cfg), tok).train
        sft_rows = head(sft, 2 * n, ("input_ids", "labels"))
    else:
        sides = ("chosen", "rejected")
        sft_rows = [{"input_ids": r[f"{s}_input_ids"], "labels": r[f"{s}_labels"]} for r in pref_rows for s in sides]
    return sft_rows, pref_rows, tok.pad_token_id


def objective_lengths(rows: list[dict], name: str) -> list[int]:
    from xright_pl.data.module import LENGTH_COLUMNS
    from xright_pl.data.streams import row_lengths

    return row_lengths(rows, LENGTH_COLUMNS[name])


def grouped_order(rows: list[dict], batch_size: int, name: str, seed: int) -> list[int]:
    """The epoch order xright_pl's ``group_by_length`` gives ``rows`` (default mega-batches)."""
    from xright_pl import Batching
    from xright_pl.data.streams import length_grouped_order

    group = Batching().length_group_batches
    return length_grouped_order(objective_lengths(rows, name), batch_size, group, torch.Generator().manual_seed(seed))


def job_rows(setup: Setup, best: bool = False) -> tuple[list[dict], list[dict], int]:
    """``(sft_rows, pref_rows, pad_id)`` of a job: real rows for a :class:`RealSetup`, else synthetic ones."""
    if isinstance(setup, RealSetup):
        return real_rows(setup, best)
    return (*synthetic_rows(setup), 0)


def data_module(setup: Setup, best: bool = False):
    """The library's data module over a job's rows, in their order; ``best``: padded to a multiple of 8 only on a
    GPU (the rows already come length-grouped, see :func:`real_rows`)."""
    from xright_pl import Batching, JointDataModule

    sft, pref, pad_id = job_rows(setup, best)

    class InMemoryData(JointDataModule):
        """The library's data module over in-memory rows (already tokenized: no tokenizer, no files)."""

        def load(self) -> None:
            if not self.train_sets:
                self.train_sets, self.val_sets = {"sft": sft, "dpo": pref}, {}

        @property
        def pad_id(self) -> int:
            return pad_id

    return InMemoryData(
        batching=Batching(
            sft_batch_size=2 * setup.pairs,
            dpo_batch_size=setup.pairs,
            eval_batch_size=2 * setup.pairs,
            shuffle=False,
            pad_to_multiple_of=8 if not best or setup.device == "cuda" else 1,
        ),
        seed=setup.seed,
    )


def to_device(batch: Any, device: str) -> Any:
    fields = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in vars(batch).items()}
    return type(batch)(**fields)


# ------------------------------------------------------------------------------------------ timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


#: Measure the peak RSS on a CPU (``benchmarks/memory.py`` sets it: one measurement per fresh process, so the peak
#: since the reset before the measurement is that measurement's). Off otherwise: the other benchmarks measure many
#: rows per process, and memory the allocator kept from an earlier row would count for the next.
CPU_PEAK_RSS = False


def reset_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    elif CPU_PEAK_RSS:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak RSS (VmHWM) starts again from the current RSS


def peak_mb(device: str) -> float | None:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return cpu_peak_rss_mb() if CPU_PEAK_RSS else None


def cpu_peak_rss_mb() -> float:
    """This process's peak resident set size (``VmHWM``) in MiB, since it started or the last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (the peak RSS needs Linux)")


def step_intervals(ends: list[float], warmup: int) -> list[float]:
    """Step durations from step-end timestamps, dropping the first ``warmup`` steps."""
    return [b - a for a, b in zip(ends[warmup - 1 :], ends[warmup:])] if warmup >= 1 else []


@dataclass
class Measurement:
    step_s: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)

    def add(self, step_s: list[float], peak: float | None) -> None:
        self.step_s.extend(step_s)
        if peak is not None:
            self.peak_mb.append(peak)


#: The folder the benchmark writes to (:func:`prepare` sets it; TRL's trainers keep their scratch files there).
setup_out_dir = "."


# ------------------------------------------------------------------------------------------ driver
#: A job of the synthetic benchmarks: ``(system, step, run)``; ``run()`` measures one repeat and returns the step
#: times in seconds and the peak MiB (or None).
Job = tuple[str, str, Callable[[], tuple[list[float], float | None]]]


def measure_jobs(jobs: list[Job], repeats: int, log: Callable[[str], None]) -> dict[tuple[str, str], Measurement]:
    """Each job ``repeats`` times, repeats interleaved across the jobs (and so across systems)."""
    results: dict[tuple[str, str], Measurement] = {(s, k): Measurement() for s, k, _ in jobs}
    for rep in range(repeats):
        for system, step, fn in jobs:
            t0 = time.perf_counter()
            step_s, peak = fn()
            results[(system, step)].add(step_s, peak)
            log(f"[{rep + 1}/{repeats}] {system:9s} {step:22s} {time.perf_counter() - t0:6.1f}s")
    return results


def speed_table(setup: Setup, results: dict[tuple[str, str], Measurement], tokens: Callable[[str], int]) -> list[dict]:
    """The table rows (:data:`CSV_FIELDS`) of the measured jobs; ``tokens(step)``: the tokens one step trains on."""
    device = torch.cuda.get_device_name() if setup.device == "cuda" else "cpu"
    table = []
    for (system, step), m in results.items():
        step_s = statistics.median(m.step_s)
        table.append(
            {
                "system": system,
                "step": step,
                "tokens_per_s": round(tokens(step) / step_s, 1),
                "step_ms": round(1000 * step_s, 3),
                "peak_memory_mb": round(max(m.peak_mb), 1) if m.peak_mb else "",
                "device": device,
            }
        )
    return table


def by_row(table: list[dict], column: str) -> dict[tuple[str, str], Any]:
    """``column`` of each row of a table, by ``(system, step)``."""
    return {(r["system"], r["step"]): r[column] for r in table}


def put_ratio(out: dict, name: str, num: tuple[str, str], den: tuple[str, str], src: dict) -> None:
    """``out[name] = src[num] / src[den]`` (4 decimals); left out when a row is missing or empty."""
    if src.get(num) not in (None, "") and src.get(den) not in (None, ""):
        out[name] = round(float(src[num]) / float(src[den]), 4)


def format_table(table: list[dict]) -> str:
    lines = [f"{'system':10s} {'step':22s} {'tokens/s':>11s} {'step ms':>10s} {'peak MiB':>10s}  device"]
    for r in table:
        lines.append(
            f"{r['system']:10s} {r['step']:22s} {r['tokens_per_s']:11.1f} {r['step_ms']:10.2f}"
            f" {str(r['peak_memory_mb']):>10s}  {r['device']}"
        )
    return "\n".join(lines)


def only_rows(only: str | None, choices: tuple[str, ...], parser: argparse.ArgumentParser, what: str = "rows"):
    """The comma-separated ``--only`` (default: all of ``choices``), each checked to be one of ``choices``."""
    picked = tuple(only.split(",")) if only else choices
    unknown = set(picked) - set(choices)
    if unknown:
        parser.error(f"--only: unknown {what} {sorted(unknown)}; choose from {choices}")
    return picked


def report(out: Path, csv_name: str, ratios_name: str, setup: Setup, table: list[dict], ratios: dict) -> None:
    """``csv_name`` (:data:`CSV_FIELDS`) and ``ratios_name`` (the setup and the ratios, JSON) in ``out``; the table
    and the ratios on stdout."""
    write_csv(out / csv_name, CSV_FIELDS, table)
    (out / ratios_name).write_text(json.dumps({"setup": asdict(setup), "ratios": ratios}, indent=2))
    print(format_table(table))
    print()
    for k, v in ratios.items():
        print(f"{k:48s} {v:.3f}" if isinstance(v, float) else f"{k:48s} {v}")


def write_csv(path: Path, fields: tuple[str, ...], table: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(table)


def log(line: str) -> None:
    """Progress, on stderr (stdout holds the table)."""
    print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ command line
SETUP_HELP = {
    "pairs": "preference pairs per DPO step (SFT: twice as many rows)",
    "seq-len": "tokens per sequence",
    "steps": "measured steps per repeat",
    "warmup": "unmeasured steps per repeat",
    "repeats": "interleaved repeats (medians pool them)",
}


def add_setup_args(
    parser: argparse.ArgumentParser, out: str, files: str, names: tuple[str, ...] = tuple(SETUP_HELP), **helps: str
) -> None:
    """``--out`` (default ``out``, the folder for ``files``), the size options ``names`` (``--pairs``, ``--seq-len``,
    ...: integers, None when not given; ``helps`` overrides a help text, by the option's name with ``_``) and
    ``--threads``. Each benchmark adds ``--quick`` / ``--gpu`` and its own options."""
    parser.add_argument("--out", default=out, help=f"folder for {files}")
    for name in names:
        parser.add_argument(f"--{name}", type=int, help=helps.get(name.replace("-", "_"), SETUP_HELP[name]))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs; default 1)")


def add_synthetic_args(parser: argparse.ArgumentParser, out: str, files: str) -> None:
    """The options :func:`synthetic_setup` reads: ``--quick`` / ``--gpu``, the sizes, ``--model-config``."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny GPTNeoX on CPU, fp32 (default)")
    mode.add_argument("--gpu", action="store_true", help="Pythia-1B shape on CUDA, bf16 weights")
    add_setup_args(parser, out, files)
    parser.add_argument("--model-config", type=json.loads, help="JSON overrides of the model config")


def synthetic_setup(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Setup:
    """The :class:`Setup` of a synthetic benchmark: the ``--quick`` or ``--gpu`` preset with the options given
    (``--run-steps`` where the benchmark has it); TF32 matmuls on CUDA."""
    setup = gpu_setup() if args.gpu else quick_setup()
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device")
    overrides = {
        "pairs": args.pairs,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "run_steps": getattr(args, "run_steps", None),
    }
    setup = replace(setup, **{k: v for k, v in overrides.items() if v is not None})
    if args.model_config:
        setup.model_config.update(args.model_config)
    setup.prompt_len = min(setup.prompt_len, setup.seq_len // 4)
    if setup.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return setup


def prepare(args: argparse.Namespace) -> Path:
    """Before measuring: torch's CPU threads (``--threads``; CPU runs: default 1), the output folder (created, and
    :data:`setup_out_dir`), Lightning's info logs and the few-workers warning off. Returns the folder."""
    global setup_out_dir
    if args.threads or not args.gpu:
        torch.set_num_threads(args.threads or 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup_out_dir = str(out)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    return out
