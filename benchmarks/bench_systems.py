"""The three systems the benchmarks measure, each on a job's rows (``bench_setup.py``), one repeat a call.

- :func:`plain_loop`: a hand-written PyTorch loop (collate, to device, forward, loss, backward, clip, AdamW step)
  doing the same math as xright_pl; step ``dpo_fp32_log_softmax`` is the textbook version that upcasts the whole
  logits tensor;
- :func:`xright_step`: the same steps through ``Trainer.fit`` with :class:`~xright_pl.XRightModule` (selectors
  ``Single``, ``Mix``, ``Maxright(eval_every=1)``; ``dpo_cached``: ``precompute_reference_logps=True``);
  :func:`lightning_trainer`, :func:`xright_module` and :func:`step_timer` also serve ``run_speed.py``'s whole runs;
- :func:`trl_step`: TRL's ``DPOTrainer`` / ``SFTTrainer`` (``dpo``, ``dpo_cached``, ``sft``), with activation
  checkpointing and bf16 autocast off (TRL 1.16 turns both on by default), as the other systems; TRL is a
  benchmark-only extra (``pip install trl``, see :func:`trl_available`).

Each returns :data:`Timed`: the step times (the median interval between consecutive step ends, the device
synchronised there, after ``warmup`` steps), the peak memory and the tokens of each measured step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import bench_setup
import torch
from bench_setup import RealSetup, Setup, data_module, job_rows, peak_mb, reset_memory, step_intervals, sync, to_device


# ------------------------------------------------------------------------------------------ plain loop
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
    sft_rows, pref_rows, pad_id = job_rows(setup)
    n_steps = setup.warmup + setup.steps

    def logps_of(model, b, textbook=False):
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
        return _fp32_log_softmax_logps(logits, b.labels) if textbook else sequence_logps(logits, b.labels).logps

    if step == "dpo_cached":  # cached once before training, as both libraries do
        with torch.no_grad():
            for i in range(0, len(pref_rows), setup.pairs):
                rows = pref_rows[i : i + setup.pairs]
                r = logps_of(ref, to_device(collate_preference(rows, pad_id), dev)).float().cpu()
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

    reset_memory(dev)
    ends, tokens = [], []
    for i in range(n_steps):
        pb = collate_preference(pref_rows[i * setup.pairs : (i + 1) * setup.pairs], pad_id)
        sb = collate_sft(sft_rows[2 * i * setup.pairs : 2 * (i + 1) * setup.pairs], pad_id)
        tokens.append(_tokens(sb) if step == "sft" else _tokens(pb) if step.startswith("dpo") else _tokens(pb, sb))
        pb, sb = to_device(pb, dev), to_device(sb, dev)
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
        sync(dev)
        ends.append(time.perf_counter())
    return step_intervals(ends, setup.warmup), peak_mb(dev), tokens[setup.warmup :]


# ------------------------------------------------------------------------------------------ xright_pl
def lightning_trainer(setup: Setup, max_steps: int, callbacks: list) -> Any:
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


def xright_module(setup: Setup, selector: Any, precompute: bool = False) -> Any:
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


def step_timer(device: str, objective: str | None = None):
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
            sync(device)
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(device)
            self.ends.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module) -> None:
            sync(device)
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
    """Steps through ``Trainer.fit``; ``best``: the length-grouped rows of :func:`bench_setup.real_rows`, padded to
    the longest row on a CPU (see :func:`bench_setup.data_module`)."""
    selector, precompute = _selector(step)
    objective = getattr(selector, "objective", None)
    timer = step_timer(setup.device, objective)
    trainer = lightning_trainer(setup, setup.warmup + setup.steps, [timer])
    module = xright_module(setup, selector, precompute)
    reset_memory(setup.device)
    trainer.fit(module, datamodule=data_module(setup, best))
    peak = peak_mb(setup.device)
    del trainer, module
    return step_intervals(timer.ends, setup.warmup), peak, timer.tokens[setup.warmup :]


# ------------------------------------------------------------------------------------------ TRL
def trl_available() -> bool:
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except Exception:
        return False
    return True


def use_trl(wanted: bool) -> bool:
    """Whether to measure the TRL rows: ``wanted`` and TRL importable (a note on stderr when wanted but not)."""
    if wanted and not trl_available():
        print("TRL rows skipped: `trl` (and `datasets`) are not importable here; pip install trl", file=sys.stderr)
        return False
    return wanted


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
    sft, pref, _ = job_rows(setup, best)
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

    Every job turns off TRL's defaults that differ from the other systems (gradient checkpointing, bf16 autocast).
    Real rows (:class:`RealSetup`) also take the same batches in the same order (sequential sampler), padded to a
    multiple of 8; ``best``: the length-grouped batches of :func:`bench_setup.real_rows` with TRL's own padding (to
    the longest row). TRL 1.16 has no other speed option on a CPU: DPO's
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
            sync(dev)
            self.ends.append(time.perf_counter())

    timer = Timer()
    model = _policy(setup)
    common = dict(
        output_dir=str(Path(bench_setup.setup_out_dir) / "trl_tmp"),
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
    reset_memory(dev)
    trainer.train()
    peak = peak_mb(dev)
    tokens = [(int(real), int(positions)) for real, positions in trainer.bench_tokens[setup.warmup :]]
    del trainer, model
    return step_intervals(timer.ends, setup.warmup), peak, tokens
