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
- ``xright_pl`` / ``run_sequential``, ``run_alright``, ``run_maxright_k10``, ``run_mix``: whole runs of
  ``--run-steps`` optimizer steps; ``step_ms`` is wall time / steps.

A step's time is the median interval between consecutive step ends (the device synchronised there), after
``--warmup`` steps, pooled over ``--repeats`` interleaved repeats: it includes loading the next batch and
every framework hook. ``peak_memory_mb`` is ``torch.cuda.max_memory_allocated`` (empty on CPU, where
``benchmarks/memory.py`` measures the peak RSS, one measurement per fresh process).

``--real-model DIR`` (an option, not the default) runs a pretrained model folder on real variable-length rows
(``--real-data`` preference pairs such as HH-RLHF, ``--real-sft-data`` SFT rows such as Alpaca), tokenized by
xright_pl's own loaders with the model's chat template (``max_length`` 128, ``max_prompt_length`` 64), in two
settings groups (see :func:`measure_real`): ``equal`` (plain, xright_pl and TRL on the same batches in the same
order, no length grouping, live reference; ``dpo_cached`` with precomputed reference log-probs) and ``best``
(xright_pl and TRL with cached reference log-probs on the same length-grouped batches, each with its own
padding). Rows are compared by real (non-padding) tokens per second over the measured steps (median over
repeats); the table prints each row's time over plain's (equal) and over TRL's (same settings).

Usage::

    python benchmarks/step_speed.py --quick --out out/bench        # tiny GPTNeoX on CPU, ~3 minutes
    python benchmarks/step_speed.py --gpu --out out/bench          # Pythia-1B shape, bf16, 8 x 512
    python benchmarks/step_speed.py --real-model ../smollm2 --real-data ../shared/data/hh_rlhf_pref_train.jsonl \
        --real-sft-data ../shared/data/alpaca_gpt4_sft_train.jsonl --threads 2 --out out/bench_real

TRL is a benchmark-only extra (``pip install trl``); without it the TRL rows are skipped.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import json
import logging
import math
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
    sft, pref, pad_id = _real_pool(setup)
    if best:
        pref = [pref[i] for i in _grouped_order(pref, setup.pairs, "dpo", setup.seed)[: setup.rows]]
        sft = [sft[i] for i in _grouped_order(sft, 2 * setup.pairs, "sft", setup.seed)[: 2 * setup.rows]]
    return [dict(r) for r in sft[: 2 * setup.rows]], [dict(r) for r in pref[: setup.rows]], pad_id


def _real_pool(setup: RealSetup) -> tuple[list[dict], list[dict], int]:
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


def _lengths(rows: list[dict], name: str) -> list[int]:
    from xright_pl.data.module import LENGTH_COLUMNS
    from xright_pl.data.streams import row_lengths

    return row_lengths(rows, LENGTH_COLUMNS[name])


def _grouped_order(rows: list[dict], batch_size: int, name: str, seed: int) -> list[int]:
    """The epoch order xright_pl's ``group_by_length`` gives ``rows`` (default mega-batches)."""
    from xright_pl import Batching
    from xright_pl.data.streams import length_grouped_order

    group = Batching().length_group_batches
    return length_grouped_order(_lengths(rows, name), batch_size, group, torch.Generator().manual_seed(seed))


def grouping_padding(setup: RealSetup) -> dict[str, dict[str, float]]:
    """Padding share of one epoch over the whole pool, per objective, for a random order and for the orders of
    xright_pl's and of transformers' (TRL's) ``group_by_length`` samplers, each padding to the longest row of a
    batch: how well each library's own grouping does on this data at full size."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    sft, pref, _ = _real_pool(setup)
    out = {}
    for name, rows, bs in (("dpo", pref, setup.pairs), ("sft", sft, 2 * setup.pairs)):
        lengths = _lengths(rows, name)
        seqs = 2 if name == "dpo" else 1
        real = sum(len(r[c]) for r in rows for c in rows[0] if c.endswith("input_ids"))
        g = lambda: torch.Generator().manual_seed(setup.seed)  # noqa: E731
        orders = {
            "random": torch.randperm(len(rows), generator=g()).tolist(),
            "xright_pl": _grouped_order(rows, bs, name, setup.seed),
            "transformers": get_length_grouped_indices(lengths, bs, generator=g()),
        }
        out[name] = {"rows": len(rows)}
        for k, order in orders.items():
            positions = sum(seqs * len(b) * max(lengths[i] for i in b) for b in _batches(order, bs))
            out[name][k] = round(1 - real / positions, 4)
    return out


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _rows(setup: Setup, best: bool = False) -> tuple[list[dict], list[dict], int]:
    """``(sft_rows, pref_rows, pad_id)`` of a job: real rows for a :class:`RealSetup`, else synthetic ones."""
    if isinstance(setup, RealSetup):
        return real_rows(setup, best)
    return (*synthetic_rows(setup), 0)


def _data_module(setup: Setup, best: bool = False):
    """The library's data module over a job's rows, in their order; ``best``: padded to a multiple of 8 only on a
    GPU (the rows already come length-grouped, see :func:`real_rows`)."""
    from xright_pl import Batching, JointDataModule

    sft, pref, pad_id = _rows(setup, best)

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


# ------------------------------------------------------------------------------------------ timing
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


#: Measure the peak RSS on a CPU (``benchmarks/memory.py`` sets it: one measurement per fresh process, so the peak
#: since the reset before the measurement is that measurement's). Off here: this script measures many rows per
#: process, and memory the allocator kept from an earlier row would count for the next.
CPU_PEAK_RSS = False


def _reset_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    elif CPU_PEAK_RSS:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak RSS (VmHWM) starts again from the current RSS


def _peak_mb(device: str) -> float | None:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return cpu_peak_rss_mb() if CPU_PEAK_RSS else None


def cpu_peak_rss_mb() -> float:
    """This process's peak resident set size (``VmHWM``) in MiB, since it started or the last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (the peak RSS needs Linux)")


def _intervals(ends: list[float], warmup: int) -> list[float]:
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


# ------------------------------------------------------------------------------------------ plain loop
def _to(batch: Any, device: str) -> Any:
    fields = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in vars(batch).items()}
    return type(batch)(**fields)


def _fp32_log_softmax_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Textbook sequence log-probs: a full-vocabulary fp32 log-softmax, then a gather."""
    labels = labels[:, 1:]
    mask = labels != -100
    logps = logits[:, :-1].float().log_softmax(-1).gather(2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1)


def _policy(setup: Setup) -> torch.nn.Module:
    """The policy on the device in train mode: the pretrained model of a :class:`RealSetup`, else a seeded random
    init from the config (initialised on the device: a 1B model initialised on CPU takes many seconds)."""
    from xright_pl.models.build import build_causal_lm

    if isinstance(setup, RealSetup):
        return build_causal_lm(setup.model_path, None, setup.seed, setup.dtype, "sdpa").to(setup.device).train()
    with torch.device(setup.device):
        return build_causal_lm(None, setup.model_config, setup.seed, setup.dtype, "sdpa").train()


def _tokens(*batches: Any) -> tuple[int, int]:
    """(real tokens, padded positions) of the batches of one step."""
    return sum(int(b.attention_mask.sum()) for b in batches), sum(b.attention_mask.numel() for b in batches)


#: What a step measurement returns: (intervals in s, peak MiB or None, [(real tokens, positions)] per interval).
Timed = tuple[list[float], float | None, list[tuple[int, int]]]


def plain_loop(setup: Setup, step: str) -> Timed:
    """Per-step times of a hand-written loop doing ``step``'s math on the run's rows, in dataset order."""
    from xright_pl.data.collate import collate_preference, collate_sft
    from xright_pl.models.build import frozen_copy
    from xright_pl.objectives.losses import dpo_loss, sequence_logps, sft_loss

    dev = setup.device
    policy = _policy(setup)
    ref = frozen_copy(policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=setup.lr, fused=dev == "cuda")
    sft_rows, pref_rows, pad_id = _rows(setup)
    n_steps = setup.warmup + setup.steps

    def logps_of(model, b, textbook=False):
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
        return _fp32_log_softmax_logps(logits, b.labels) if textbook else sequence_logps(logits, b.labels).logps

    if step == "dpo_cached":  # cached once before training, as both libraries do
        with torch.no_grad():
            for i in range(0, len(pref_rows), setup.pairs):
                rows = pref_rows[i : i + setup.pairs]
                r = logps_of(ref, _to(collate_preference(rows, pad_id), dev)).float().cpu()
                for j, row in enumerate(rows):
                    row["ref_chosen_logps"], row["ref_rejected_logps"] = float(r[j]), float(r[len(rows) + j])
        ref = None  # released, as both libraries do

    def dpo(b, textbook=False):
        if b.ref_logps is not None:
            r = b.ref_logps
        else:
            with torch.no_grad():
                r = logps_of(ref, b, textbook)
        pi = logps_of(policy, b, textbook)
        k = b.num_examples
        return dpo_loss(pi[:k], pi[k:], r[:k], r[k:], setup.beta).losses.mean()

    def sft(b):
        logits = policy(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
        return sft_loss(logits, b.labels)[0]

    _reset_memory(dev)
    ends, tokens = [], []
    for i in range(n_steps):
        pb = collate_preference(pref_rows[i * setup.pairs : (i + 1) * setup.pairs], pad_id)
        sb = collate_sft(sft_rows[2 * i * setup.pairs : 2 * (i + 1) * setup.pairs], pad_id)
        tokens.append(_tokens(sb) if step == "sft" else _tokens(pb) if step.startswith("dpo") else _tokens(pb, sb))
        pb, sb = _to(pb, dev), _to(sb, dev)
        if step in ("dpo", "dpo_cached"):
            dpo(pb).backward()
        elif step == "dpo_fp32_log_softmax":
            dpo(pb, textbook=True).backward()
        elif step == "sft":
            sft(sb).backward()
        elif step == "mix":
            (sft(sb) * (1 - setup.lam)).backward()
            (dpo(pb) * setup.lam).backward()
        elif step == "maxright_eval":
            losses = {"sft": sft(sb), "dpo": dpo(pb)}
            gaps = {"sft": (1 - setup.lam) * losses["sft"].item(), "dpo": setup.lam * losses["dpo"].item()}
            chosen = "dpo" if gaps["dpo"] >= gaps["sft"] else "sft"
            loss = losses.pop(chosen)
            losses.clear()
            loss.backward()
        else:
            raise ValueError(step)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(dev)
        ends.append(time.perf_counter())
    return _intervals(ends, setup.warmup), _peak_mb(dev), tokens[setup.warmup :]


# ------------------------------------------------------------------------------------------ xright_pl
def _trainer(setup: Setup, max_steps: int, callbacks: list) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="gpu" if setup.device == "cuda" else "cpu",
        devices=1,
        precision=setup.precision,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )


def _module(setup: Setup, selector: Any, precompute: bool = False) -> Any:
    from xright_pl import XRightModule

    fused = setup.device == "cuda"
    model = {"model": setup.model_path} if isinstance(setup, RealSetup) else {"model_config": dict(setup.model_config)}
    return XRightModule(
        **model,
        selector=selector,
        lam=setup.lam,
        beta=setup.beta,
        optimizer=lambda p: torch.optim.AdamW(p, lr=setup.lr, fused=fused),
        gradient_clip_val=1.0,
        seed=setup.seed,
        dtype=setup.dtype,
        attn_implementation="sdpa",
        precompute_reference_logps=precompute,
        fused_logps=setup.fused_logps,
    )


def _step_timer(device: str, objective: str | None = None):
    import lightning.pytorch as pl

    class StepTimer(pl.Callback):
        """Records the time at each step end (device synchronised), and the whole training loop's span; with an
        ``objective``, also the (real tokens, padded positions) of the batch each step trains on."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.tokens: list[tuple[int, int]] = []
            self.start = self.stop = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if objective is not None:  # the batch the module is about to train on (peeking does not consume it)
                self.tokens.append(_tokens(trainer.datamodule.streams[objective].peek()))

        def on_train_start(self, trainer, pl_module) -> None:
            _sync(device)
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            _sync(device)
            self.ends.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module) -> None:
            _sync(device)
            self.stop = time.perf_counter()

    return StepTimer()


def _selector(step: str) -> tuple[Any, bool]:
    from xright_pl import Maxright, Mix, Single

    return {
        "dpo": (Single("dpo"), False),
        "dpo_cached": (Single("dpo"), True),
        "sft": (Single("sft"), False),
        "mix": (Mix(), False),
        "maxright_eval": (Maxright(f_sft_star=0.0, f_dpo_star=0.0, eval_every=1), False),
    }[step]


def xright_step(setup: Setup, step: str, best: bool = False) -> Timed:
    """Steps through ``Trainer.fit``; ``best``: the length-grouped rows of :func:`real_rows`, padded to the longest
    row on a CPU (see :func:`_data_module`)."""
    selector, precompute = _selector(step)
    objective = getattr(selector, "objective", None)
    timer = _step_timer(setup.device, objective)
    trainer = _trainer(setup, setup.warmup + setup.steps, [timer])
    module = _module(setup, selector, precompute)
    _reset_memory(setup.device)
    trainer.fit(module, datamodule=_data_module(setup, best))
    peak = _peak_mb(setup.device)
    del trainer, module
    return _intervals(timer.ends, setup.warmup), peak, timer.tokens[setup.warmup :]


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
    timer = _step_timer(setup.device)
    trainer = _trainer(run_setup, setup.run_steps, [timer])
    module = _module(run_setup, selector)
    _reset_memory(setup.device)
    trainer.fit(module, datamodule=_data_module(replace(run_setup, warmup=2)))
    peak = _peak_mb(setup.device)
    RUN_BRANCHES.setdefault(method, []).append(dict(module.steps))
    del trainer, module
    return timer.stop - timer.start, peak


#: Branch counts ({"sft": n, "dpo": m}) of every whole run measured, by run row.
RUN_BRANCHES: dict[str, list[dict[str, int]]] = {}


# ------------------------------------------------------------------------------------------ TRL
def trl_available() -> bool:
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except Exception:
        return False
    return True


def _word_tokenizer(vocab: int):
    """A tokenizer whose words ``t<id>`` are token ``id``: the synthetic ids round-trip exactly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _text(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def _trl_trainers() -> tuple[type, type]:
    """TRL's DPOTrainer and SFTTrainer, recording the (real tokens, padded positions) of each step's batch. The DPO
    one takes rows already tokenized (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) as they are, as the SFT one
    does with ``input_ids`` and ``labels``."""
    from trl import DPOTrainer, SFTTrainer

    class Counted:
        def training_step(self, model, inputs, *args, **kwargs):
            mask, ids = inputs.get("attention_mask"), inputs["input_ids"]  # padding-free batches have no mask
            # kept on the device (no sync here), read after training
            self.bench_tokens.append((mask.sum(), mask.numel()) if mask is not None else (ids.numel(),) * 2)
            return super().training_step(model, inputs, *args, **kwargs)

    class DPO(Counted, DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, *args, **kwargs)

    class SFT(Counted, SFTTrainer):
        pass

    return DPO, SFT


def _prompt_length(labels: list[int]) -> int:
    return next((i for i, t in enumerate(labels) if t != -100), len(labels))


def _trl_rows(setup: Setup, step: str, best: bool) -> tuple[list[dict], Any]:
    """TRL's training rows for ``step`` and its tokenizer. Synthetic ids travel as words of a word-level
    tokenizer (TRL tokenizes them again and adds an EOS: one token longer); real rows are xright_pl's token ids."""
    sft, pref, _ = _rows(setup, best)
    if not isinstance(setup, RealSetup):
        p = setup.prompt_len
        if step == "sft":
            sides = ("chosen_input_ids", "rejected_input_ids")
            rows = [{"prompt": _text(r[k][:p]), "completion": " " + _text(r[k][p:])} for r in pref for k in sides]
        else:
            rows = [
                {
                    "prompt": _text(r["chosen_input_ids"][:p]),
                    "chosen": " " + _text(r["chosen_input_ids"][p:]),
                    "rejected": " " + _text(r["rejected_input_ids"][p:]),
                }
                for r in pref
            ]
        return rows, _word_tokenizer(setup.model_config["vocab_size"])
    from xright_pl.data.sources import load_tokenizer

    if step == "sft":
        rows = sft
    else:
        rows = []
        for r in pref:
            c, j = r["chosen_input_ids"], r["rejected_input_ids"]
            p = _prompt_length(r["chosen_labels"])
            if c[:p] != j[:p] or _prompt_length(r["rejected_labels"]) != p:
                raise ValueError("a preference row whose chosen and rejected sequences have different prompts")
            rows.append({"prompt_ids": c[:p], "chosen_ids": c[p:], "rejected_ids": j[p:]})
    return rows, load_tokenizer(setup.tokenizer or setup.model_path)


def trl_step(setup: Setup, step: str, best: bool = False) -> Timed:
    """TRL's DPOTrainer / SFTTrainer on the same tokens.

    Synthetic rows keep TRL's config defaults. Real rows (:class:`RealSetup`) turn off TRL's defaults that differ
    from the other systems (gradient checkpointing, bf16 autocast) and take the same batches in the same order
    (sequential sampler), padded to a multiple of 8; ``best``: the length-grouped batches of :func:`real_rows`
    with TRL's own padding (to the longest row). TRL 1.16 has no other speed option on a CPU: DPO's
    ``padding_free`` is disabled in that version, SFT's needs FlashAttention, Liger kernels need Triton."""
    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig, SFTConfig

    from xright_pl.models.build import frozen_copy

    dev = setup.device
    rows, tok = _trl_rows(setup, step, best)
    DPO, SFT = _trl_trainers()

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            _sync(dev)
            self.ends.append(time.perf_counter())

    timer = Timer()
    model = _policy(setup)
    common = dict(
        output_dir=str(Path(setup_out_dir) / "trl_tmp"),
        max_steps=setup.warmup + setup.steps,
        learning_rate=setup.lr,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        optim="adamw_torch_fused" if dev == "cuda" else "adamw_torch",
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=dev != "cuda",
        seed=setup.seed,
        max_length=None,
    )
    # The same work as the other rows: no activation checkpointing (TRL 1.16's default: on; transformers 5 renamed
    # gradient_checkpointing to activation_checkpointing) and no bf16 autocast (TRL's default, even on a CPU).
    ckpt = "activation_checkpointing" if "activation_checkpointing" in DPOConfig.__dataclass_fields__ else ""
    common.update({ckpt or "gradient_checkpointing": False}, bf16=False, fp16=False)
    if setup.dtype == "bfloat16":
        common.update(bf16=True)  # --gpu: bf16 weights, as the other rows
    if isinstance(setup, RealSetup):
        common.update(train_sampling_strategy="sequential")
        if not best:
            common.update(pad_to_multiple_of=8)
    dataset = datasets.Dataset.from_list(rows)
    if step in ("dpo", "dpo_cached"):
        args = DPOConfig(
            per_device_train_batch_size=setup.pairs,
            beta=setup.beta,
            precompute_ref_log_probs=step == "dpo_cached",
            **common,
        )
        ref_model = None if step == "dpo_cached" else frozen_copy(model)  # cached: TRL uses the policy once
        trainer = DPO(
            model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[timer]
        )
    elif step == "sft":
        args = SFTConfig(per_device_train_batch_size=2 * setup.pairs, **common)
        trainer = SFT(model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[timer])
    else:
        raise ValueError(step)
    trainer.bench_tokens = []
    _reset_memory(dev)
    trainer.train()
    peak = _peak_mb(dev)
    tokens = [(int(real), int(positions)) for real, positions in trainer.bench_tokens[setup.warmup :]]
    del trainer, model
    return _intervals(timer.ends, setup.warmup), peak, tokens


setup_out_dir = "."


# ------------------------------------------------------------------------------------------ driver
STEP_ROWS = ("dpo", "dpo_cached", "sft", "mix", "maxright_eval")
RUN_ROWS = ("run_sequential", "run_alright", "run_maxright_k10", "run_mix")


def measure(
    setup: Setup,
    with_trl: bool,
    with_runs: bool,
    log: Callable[[str], None] = print,
    only: tuple[str, ...] = STEP_ROWS,
) -> list[dict]:
    """Measure every row, repeats interleaved across systems; returns the table rows."""
    jobs: list[tuple[str, str, Callable[[], tuple[Any, float | None]]]] = []
    for step in only:
        jobs.append(("plain", step, lambda s=step: plain_loop(setup, s)))
        jobs.append(("xright_pl", step, lambda s=step: xright_step(setup, s)))
    if "dpo" in only:
        jobs.append(("plain", "dpo_fp32_log_softmax", lambda: plain_loop(setup, "dpo_fp32_log_softmax")))
    if with_trl:
        for step in ("dpo", "dpo_cached", "sft"):
            jobs.append(("trl", step, lambda s=step: trl_step(setup, s)))
    if with_runs:
        for run in RUN_ROWS:
            jobs.append(("xright_pl", run, lambda r=run: xright_run(setup, r)))
    results: dict[tuple[str, str], Measurement] = {(s, k): Measurement() for s, k, _ in jobs}
    for rep in range(setup.repeats):
        for system, step, fn in jobs:
            t0 = time.perf_counter()
            value, peak, *_ = fn()
            if step.startswith("run_"):
                results[(system, step)].add([value / setup.run_steps], peak)
            else:
                results[(system, step)].add(value, peak)
            log(f"[{rep + 1}/{setup.repeats}] {system:9s} {step:22s} {time.perf_counter() - t0:6.1f}s")
    device = torch.cuda.get_device_name() if setup.device == "cuda" else "cpu"
    table = []
    for (system, step), m in results.items():
        step_s = statistics.median(m.step_s)
        tokens = setup.tokens_per_step * (2 if step in ("mix", "run_mix") else 1)
        if step in ("run_sequential", "run_alright", "run_maxright_k10"):
            tokens = setup.tokens_per_step  # one objective per step (SFT and DPO steps hold the same tokens)
        table.append(
            {
                "system": system,
                "step": step,
                "tokens_per_s": round(tokens / step_s, 1),
                "step_ms": round(1000 * step_s, 3),
                "peak_memory_mb": round(max(m.peak_mb), 1) if m.peak_mb else "",
                "device": device,
            }
        )
    return table


def ratios(table: list[dict]) -> dict[str, float]:
    """The target ratios computed from one table (missing rows are left out)."""
    ms = {(r["system"], r["step"]): r["step_ms"] for r in table}
    mem = {(r["system"], r["step"]): r["peak_memory_mb"] for r in table}
    out: dict[str, float] = {}

    def put(name: str, num: tuple[str, str], den: tuple[str, str], src=ms) -> None:
        if src.get(num) not in (None, "") and src.get(den) not in (None, ""):
            out[name] = round(float(src[num]) / float(src[den]), 4)

    for step in STEP_ROWS:
        put(f"xright/plain {step} time", ("xright_pl", step), ("plain", step))
    put("plain dpo recomputed/cached time", ("plain", "dpo"), ("plain", "dpo_cached"))
    put("xright dpo recomputed/cached time", ("xright_pl", "dpo"), ("xright_pl", "dpo_cached"))
    put("trl/xright dpo time (xright speed-up)", ("trl", "dpo"), ("xright_pl", "dpo"))
    put("trl/xright dpo_cached time", ("trl", "dpo_cached"), ("xright_pl", "dpo_cached"))
    put("trl/xright sft time", ("trl", "sft"), ("xright_pl", "sft"))
    put("xright/trl dpo peak memory", ("xright_pl", "dpo"), ("trl", "dpo"), mem)
    put("xright/trl dpo_cached peak memory", ("xright_pl", "dpo_cached"), ("trl", "dpo_cached"), mem)
    put("alright/sequential wall", ("xright_pl", "run_alright"), ("xright_pl", "run_sequential"))
    put("maxright_k10/sequential wall", ("xright_pl", "run_maxright_k10"), ("xright_pl", "run_sequential"))
    if all(("xright_pl", s) in ms for s in ("mix", "sft", "dpo")):
        out["mix/(sft+dpo) time"] = round(
            ms[("xright_pl", "mix")] / (ms[("xright_pl", "sft")] + ms[("xright_pl", "dpo")]), 4
        )
    put("mix/dpo peak memory", ("xright_pl", "mix"), ("xright_pl", "dpo"), mem)
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


def format_table(table: list[dict]) -> str:
    lines = [f"{'system':10s} {'step':22s} {'tokens/s':>11s} {'step ms':>10s} {'peak MiB':>10s}  device"]
    for r in table:
        lines.append(
            f"{r['system']:10s} {r['step']:22s} {r['tokens_per_s']:11.1f} {r['step_ms']:10.2f}"
            f" {str(r['peak_memory_mb']):>10s}  {r['device']}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ real model
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
    training). ``best``: xright_pl and TRL on the same length-grouped batches (see :func:`real_rows`), each
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


def real_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[dict]:
    """The ``--real-model`` mode: equal- and best-settings rows on a pretrained model and real rows."""
    if not args.real_data:
        parser.error("--real-model needs --real-data (a preference .jsonl, e.g. HH-RLHF prompt/chosen/rejected rows)")
    settings = tuple(args.settings.split(","))
    if set(settings) - {"equal", "best"}:
        parser.error(f"--settings: choose from equal,best; got {args.settings!r}")
    only = tuple(args.only.split(",")) if args.only else REAL_STEPS
    unknown = set(only) - set(REAL_STEPS)
    if unknown:
        parser.error(f"--only: unknown rows {sorted(unknown)}; with --real-model choose from {REAL_STEPS}")
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device")
    gpu = {"device": "cuda", "dtype": "bfloat16", "precision": "bf16-true"} if args.gpu else {}
    lengths = {"seq_len": args.seq_len, "prompt_len": args.seq_len // 2} if args.seq_len else {}
    overrides = {"pairs": args.pairs, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats}
    overrides["pool"] = args.pool
    setup = RealSetup(
        model_path=args.real_model,
        pref_path=args.real_data,
        sft_path=args.real_sft_data,
        tokenizer=args.tokenizer,
        **gpu,
        **lengths,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    if setup.warmup < 1 or setup.steps < 1:
        parser.error("--real-model needs --warmup >= 1 and --steps >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    global setup_out_dir
    setup_out_dir = str(out)
    import datasets

    datasets.disable_progress_bars()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    with_trl = not args.no_trl and trl_available()
    if not args.no_trl and not with_trl:
        print("TRL rows skipped: `trl` (and `datasets`) are not importable here; pip install trl", file=sys.stderr)
    torch.manual_seed(setup.seed)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    table = measure_real(setup, with_trl, log=log, only=only, settings=settings)
    with (out / "step_speed.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=REAL_CSV_FIELDS)
        w.writeheader()
        w.writerows(table)
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


def length_grouping(args: argparse.Namespace, setup: Setup) -> list[dict]:
    """Padding and DPO step speed of length-grouped vs random batches on a real preference file.

    Tokenizes the file with the library's loader (``datasets`` needed), builds the training stream with and
    without ``group_by_length``, and reports over one epoch the share of padded positions; then times plain
    DPO steps (policy + reference, the library's losses) on the first ``--steps`` batches of each order,
    interleaved, and reports real (non-padding) tokens per second.
    """
    from xright_pl import Batching, JointDataModule
    from xright_pl.data.sources import PreferenceData, SFTData
    from xright_pl.models.build import build_causal_lm, frozen_copy
    from xright_pl.objectives.losses import dpo_loss, sequence_logps

    if not args.tokenizer:
        raise SystemExit("--length-grouping needs --tokenizer (a folder with vocab.json and merges.txt, or a name)")
    pairs = args.pairs or setup.pairs
    steps = args.steps or setup.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, batches = [], {}
    for grouped in (False, True):
        dm = JointDataModule(
            tokenizer=args.tokenizer,
            sft=SFTData(path="builtin:demo/sft_train.jsonl", limit=8),
            preference=PreferenceData(path=args.length_grouping, val_fraction=0.0, max_length=args.seq_len or 512),
            batching=Batching(dpo_batch_size=pairs, group_by_length=grouped),
            seed=setup.seed,
        )
        dm.setup("fit")
        dm.train_dataloader()
        stream = dm.streams["dpo"]
        epoch = []
        for _ in range(len(stream)):
            epoch.append(stream.peek())
            stream.consume(pairs)
        real = sum(int(b.attention_mask.sum()) for b in epoch)
        padded = sum(b.attention_mask.numel() for b in epoch)
        batches[grouped] = epoch[:steps]
        results.append({"grouped": grouped, "real_tokens": real, "padded_positions": padded})
    cfg = dict(setup.model_config)
    cfg["vocab_size"] = max(cfg["vocab_size"], len(dm.tokenizer))
    dev = setup.device
    policy = build_causal_lm(None, cfg, setup.seed, setup.dtype, "sdpa").to(dev).train()
    ref = frozen_copy(policy)
    times: dict[bool, float] = {False: 0.0, True: 0.0}
    for i in range(steps):
        for grouped in (False, True):
            b = _to(batches[grouped][i], dev)
            _sync(dev)
            t0 = time.perf_counter()
            with torch.no_grad():
                r = sequence_logps(ref(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.labels).logps
            pi = sequence_logps(policy(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.labels).logps
            k = b.num_examples
            dpo_loss(pi[:k], pi[k:], r[:k], r[k:], setup.beta).losses.mean().backward()
            policy.zero_grad(set_to_none=True)
            _sync(dev)
            times[grouped] += time.perf_counter() - t0
    for r in results:
        g = r["grouped"]
        r["padding_share"] = round(1 - r["real_tokens"] / r["padded_positions"], 4)
        r["timed_batches"] = steps
        r["timed_real_tokens"] = sum(int(b.attention_mask.sum()) for b in batches[g])
        r["real_tokens_per_s"] = round(r["timed_real_tokens"] / times[g], 1)
    (out / "length_grouping.json").write_text(json.dumps({"pairs": pairs, "model": cfg, "rows": results}, indent=2))
    for r in results:
        print(json.dumps(r))
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny GPTNeoX on CPU, fp32 (default)")
    mode.add_argument("--gpu", action="store_true", help="Pythia-1B shape on CUDA, bf16 weights")
    parser.add_argument("--out", default="out/step_speed", help="folder for step_speed.csv and ratios.json")
    parser.add_argument("--pairs", type=int, help="preference pairs per DPO step (SFT: twice as many rows)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence")
    parser.add_argument("--steps", type=int, help="measured steps per repeat")
    parser.add_argument("--warmup", type=int, help="unmeasured steps per repeat")
    parser.add_argument("--repeats", type=int, help="interleaved repeats (medians pool them)")
    parser.add_argument("--run-steps", type=int, help="optimizer steps of each whole run")
    parser.add_argument("--model-config", type=json.loads, help="JSON overrides of the model config")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL rows")
    parser.add_argument("--no-runs", action="store_true", help="skip the whole-run rows")
    rows_help = f"of {','.join(STEP_ROWS)}; --real-model: of {','.join(REAL_STEPS)}"
    parser.add_argument("--only", help=f"comma-separated step rows to measure ({rows_help})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs; default 1)")
    parser.add_argument(
        "--length-grouping",
        metavar="PREF_JSONL",
        help="instead: measure length-grouped vs random DPO batches on this preference file (needs --tokenizer)",
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer folder or name for --length-grouping (--real-model: default, the model folder)"
    )
    parser.add_argument(
        "--real-model",
        metavar="DIR",
        help="instead: a pretrained model folder (save_pretrained) on real rows, at equal and best settings "
        "(needs --real-data; defaults: 2 pairs, max_length 128, 1 warm-up + 4 measured steps, 1 repeat)",
    )
    parser.add_argument("--real-data", metavar="PREF_JSONL", help="--real-model: preference rows (e.g. HH-RLHF)")
    parser.add_argument(
        "--real-sft-data",
        metavar="SFT_JSONL",
        help="--real-model: SFT rows (e.g. Alpaca); default: the pairs' chosen and rejected sequences",
    )
    parser.add_argument("--settings", default="equal,best", help="--real-model: settings groups to measure")
    parser.add_argument(
        "--pool", type=int, help="--real-model: pairs the best-settings batches are length-grouped from (200 x pairs)"
    )
    args = parser.parse_args(argv)
    if args.threads or not args.gpu:
        torch.set_num_threads(args.threads or 1)
    if args.real_model:
        if args.length_grouping:
            parser.error("--real-model and --length-grouping are separate modes")
        return real_model(args, parser)
    if args.length_grouping:
        return length_grouping(args, quick_setup() if not args.gpu else gpu_setup())

    setup = gpu_setup() if args.gpu else quick_setup()
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device")
    overrides = {
        "pairs": args.pairs,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "run_steps": args.run_steps,
    }
    setup = replace(setup, **{k: v for k, v in overrides.items() if v is not None})
    if args.model_config:
        setup.model_config.update(args.model_config)
    setup.prompt_len = min(setup.prompt_len, setup.seq_len // 4)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    global setup_out_dir
    setup_out_dir = str(out)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    with_trl = not args.no_trl and trl_available()
    if not args.no_trl and not with_trl:
        print("TRL rows skipped: `trl` (and `datasets`) are not importable here; pip install trl", file=sys.stderr)
    torch.manual_seed(setup.seed)
    if setup.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    only = tuple(args.only.split(",")) if args.only else STEP_ROWS
    unknown = set(only) - set(STEP_ROWS)
    if unknown:
        parser.error(f"--only: unknown rows {sorted(unknown)}; choose from {STEP_ROWS}")
    table = measure(setup, with_trl, not args.no_runs, log=lambda s: print(s, file=sys.stderr, flush=True), only=only)
    with (out / "step_speed.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(table)
    r = ratios(table)
    (out / "ratios.json").write_text(json.dumps({"setup": asdict(setup), "ratios": r}, indent=2))
    print(format_table(table))
    print()
    for k, v in r.items():
        print(f"{k:48s} {v:.3f}" if isinstance(v, float) else f"{k:48s} {v}")
    return table


if __name__ == "__main__":
    main()
