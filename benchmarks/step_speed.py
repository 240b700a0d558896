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
- ``trl`` / ``dpo``, ``dpo_cached`` (``precompute_ref_log_probs``), ``sft``: TRL's trainers, if installed.
- ``xright_pl`` / ``run_sequential``, ``run_alright``, ``run_maxright_k10``, ``run_mix``: whole runs of
  ``--run-steps`` optimizer steps; ``step_ms`` is wall time / steps.

A step's time is the median interval between consecutive step ends (the device synchronised there), after
``--warmup`` steps, pooled over ``--repeats`` interleaved repeats: it includes loading the next batch and
every framework hook. ``peak_memory_mb`` is ``torch.cuda.max_memory_allocated`` (empty on CPU).

Usage::

    python benchmarks/step_speed.py --quick --out out/bench        # tiny GPTNeoX on CPU, ~3 minutes
    python benchmarks/step_speed.py --gpu --out out/bench          # Pythia-1B shape, bf16, 8 x 512

TRL is a benchmark-only extra (``pip install trl``); without it the TRL rows are skipped.
"""

from __future__ import annotations

import argparse
import csv
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


def _data_module(setup: Setup):
    from xright_pl.data.module import Batching, JointDataModule

    class SyntheticData(JointDataModule):
        """The library's data module over in-memory synthetic rows (no tokenizer, no files)."""

        def load(self) -> None:
            if self.train_sets:
                return
            sft, pref = synthetic_rows(setup)
            self.train_sets, self.val_sets = {"sft": sft, "dpo": pref}, {}

        @property
        def pad_id(self) -> int:
            return 0

    return SyntheticData(
        batching=Batching(
            sft_batch_size=2 * setup.pairs,
            dpo_batch_size=setup.pairs,
            eval_batch_size=2 * setup.pairs,
            shuffle=False,
        ),
        seed=setup.seed,
    )


# ------------------------------------------------------------------------------------------ timing
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


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


def plain_loop(setup: Setup, step: str) -> tuple[list[float], float | None]:
    """Per-step times of a hand-written loop doing ``step``'s math; returns (intervals, peak MiB)."""
    from xright_pl.data.collate import collate_preference, collate_sft
    from xright_pl.losses import dpo_loss, sequence_logps, sft_loss
    from xright_pl.models import build_causal_lm, frozen_copy

    dev = setup.device
    cfg = setup.model_config
    with torch.device(dev):  # initialise on the device (a 1B model initialised on CPU takes many seconds)
        policy = build_causal_lm(None, cfg, setup.seed, setup.dtype, "sdpa").train()
    ref = frozen_copy(policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=setup.lr, fused=dev == "cuda")
    sft_rows, pref_rows = synthetic_rows(setup)
    n_steps = setup.warmup + setup.steps

    def logps_of(model, b, textbook=False):
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
        return _fp32_log_softmax_logps(logits, b.labels) if textbook else sequence_logps(logits, b.labels).logps

    if step == "dpo_cached":  # cached once before training, as both libraries do
        with torch.no_grad():
            for i in range(0, len(pref_rows), setup.pairs):
                rows = pref_rows[i : i + setup.pairs]
                r = logps_of(ref, _to(collate_preference(rows, 0), dev)).float().cpu()
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
    ends = []
    for i in range(n_steps):
        pb = _to(collate_preference(pref_rows[i * setup.pairs : (i + 1) * setup.pairs], 0), dev)
        sb = _to(collate_sft(sft_rows[2 * i * setup.pairs : 2 * (i + 1) * setup.pairs], 0), dev)
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
    return _intervals(ends, setup.warmup), _peak_mb(dev)


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
    return XRightModule(
        model_config=dict(setup.model_config),
        selector=selector,
        lam=setup.lam,
        beta=setup.beta,
        optimizer=lambda p: torch.optim.AdamW(p, lr=setup.lr, fused=fused),
        gradient_clip_val=1.0,
        seed=setup.seed,
        dtype=setup.dtype,
        attn_implementation="sdpa",
        precompute_reference_logps=precompute,
    )


def _step_timer(device: str):
    import lightning.pytorch as pl

    class StepTimer(pl.Callback):
        """Records the time at each step end (device synchronised), and the whole training loop's span."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.start = self.stop = 0.0

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


def xright_step(setup: Setup, step: str) -> tuple[list[float], float | None]:
    selector, precompute = _selector(step)
    timer = _step_timer(setup.device)
    trainer = _trainer(setup, setup.warmup + setup.steps, [timer])
    module = _module(setup, selector, precompute)
    _reset_memory(setup.device)
    trainer.fit(module, datamodule=_data_module(setup))
    peak = _peak_mb(setup.device)
    del trainer, module
    return _intervals(timer.ends, setup.warmup), peak


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


def trl_step(setup: Setup, step: str) -> tuple[list[float], float | None]:
    """TRL's DPOTrainer / SFTTrainer on the same tokens (their EOS makes each sequence one token longer)."""
    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from xright_pl.models import build_causal_lm, frozen_copy

    tok = _word_tokenizer(setup.model_config["vocab_size"])
    _, pref = synthetic_rows(setup)
    p = setup.prompt_len
    dev = setup.device

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            _sync(dev)
            self.ends.append(time.perf_counter())

    timer = Timer()
    with torch.device(dev):
        model = build_causal_lm(None, setup.model_config, setup.seed, setup.dtype, "sdpa")
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
    if step in ("dpo", "dpo_cached"):
        rows = [
            {
                "prompt": _text(r["chosen_input_ids"][:p]),
                "chosen": " " + _text(r["chosen_input_ids"][p:]),
                "rejected": " " + _text(r["rejected_input_ids"][p:]),
            }
            for r in pref
        ]
        args = DPOConfig(
            per_device_train_batch_size=setup.pairs,
            beta=setup.beta,
            precompute_ref_log_probs=step == "dpo_cached",
            **common,
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=None if step == "dpo_cached" else frozen_copy(model),  # cached: TRL uses the policy once
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tok,
            callbacks=[timer],
        )
    elif step == "sft":
        rows = [
            {"prompt": _text(r[k][:p]), "completion": " " + _text(r[k][p:])}
            for r in pref
            for k in ("chosen_input_ids", "rejected_input_ids")
        ]
        args = SFTConfig(per_device_train_batch_size=2 * setup.pairs, **common)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tok,
            callbacks=[timer],
        )
    else:
        raise ValueError(step)
    _reset_memory(dev)
    trainer.train()
    peak = _peak_mb(dev)
    del trainer, model
    return _intervals(timer.ends, setup.warmup), peak


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
            value, peak = fn()
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


def length_grouping(args: argparse.Namespace, setup: Setup) -> list[dict]:
    """Padding and DPO step speed of length-grouped vs random batches on a real preference file.

    Tokenizes the file with the library's loader (``datasets`` needed), builds the training stream with and
    without ``group_by_length``, and reports over one epoch the share of padded positions; then times plain
    DPO steps (policy + reference, the library's losses) on the first ``--steps`` batches of each order,
    interleaved, and reports real (non-padding) tokens per second.
    """
    from xright_pl.data.module import Batching, JointDataModule
    from xright_pl.data.sources import PreferenceData, SFTData
    from xright_pl.losses import dpo_loss, sequence_logps
    from xright_pl.models import build_causal_lm, frozen_copy

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
    parser.add_argument("--only", help=f"comma-separated step rows to measure (of {','.join(STEP_ROWS)})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs; default 1)")
    parser.add_argument(
        "--length-grouping",
        metavar="PREF_JSONL",
        help="instead: measure length-grouped vs random DPO batches on this preference file (needs --tokenizer)",
    )
    parser.add_argument("--tokenizer", help="tokenizer folder or name for --length-grouping")
    args = parser.parse_args(argv)
    if args.threads or not args.gpu:
        torch.set_num_threads(args.threads or 1)
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
