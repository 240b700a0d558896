"""Shared builders for the tests: a tiny model and the embedded data, all offline."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import pytest

from xright_pl import Batching, JointDataModule, PreferenceData, RunSummary, SFTData, XRightModule

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

#: Optional extras of pyproject.toml that tests use: module -> extra.
EXTRAS = {"peft": "lora", "matplotlib": "plot", "trl": "benchmarks"}


def has_extra(module: str) -> bool:
    """Whether the optional module (see :data:`EXTRAS`) is installed."""
    return importlib.util.find_spec(module) is not None


def need_extra(module: str):
    """Skip the calling test (or test module, at import) when an optional extra is not installed."""
    extra = EXTRAS[module]
    reason = f"needs {module}, from the optional extra {extra!r}: pip install 'xright_pl[{extra}]'"
    return pytest.importorskip(module, reason=reason)


def load_benchmark(name: str, monkeypatch: pytest.MonkeyPatch, path: str | None = None) -> ModuleType:
    """``benchmarks/<name>.py`` (or ``benchmarks/<path>``) loaded by path as module ``name``, in ``sys.modules`` for
    the calling test only (a dataclass needs its module there); the script puts ``benchmarks/`` on ``sys.path`` for
    its shared helpers."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / (path or f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def recording_forwards(module) -> list[tuple[str, bool, tuple | None]]:
    """Wrap ``module.objective`` to record ``(name, grad enabled, the SFT batch's token ids or None)`` of every
    forward, in order (the list is filled as the module runs)."""
    import torch

    calls = []
    objective = module.objective

    def recording(name, batch):
        ids = tuple(batch.input_ids.flatten().tolist()) if name == "sft" else None
        calls.append((name, torch.is_grad_enabled(), ids))
        return objective(name, batch)

    module.objective = recording
    return calls


TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 144,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def tiny_module(selector=None, lam=0.5, **kwargs) -> XRightModule:
    import torch

    kwargs.setdefault("optimizer", lambda p: torch.optim.AdamW(p, lr=3e-3))
    return XRightModule(model_config=dict(TINY_LLAMA), selector=selector, lam=lam, **kwargs)


def demo_data(
    limit: int | None = 256,
    sft_bs: int = 4,
    dpo_bs: int = 2,
    sft_path: str = "builtin:demo/sft_train.jsonl",
    held_in: int = 0,
    **batching,
) -> JointDataModule:
    return JointDataModule(
        held_in=held_in,
        sft=SFTData(
            path=sft_path,
            eval_path="builtin:demo/sft_eval.jsonl",
            limit=limit,
            max_length=64,
        ),
        preference=PreferenceData(
            path="builtin:demo/pref_train.jsonl",
            eval_path="builtin:demo/pref_eval.jsonl",
            limit=limit,
            max_length=64,
        ),
        batching=Batching(sft_batch_size=sft_bs, dpo_batch_size=dpo_bs, eval_batch_size=32, **batching),
    )


#: The terse data set's prompt template (as in configs/demo/three_objectives.yaml).
TERSE_TEMPLATE = "Human: {instruction} {input} Assistant:"


def three_datasets(limit: int = 32) -> JointDataModule:
    """The demo's three named data sets (as configs/demo/three_objectives.yaml): terse (SFT on short answers),
    polite (SFT on the preference rows' chosen answers), prefs (preference pairs, 2 per batch)."""
    from xright_pl.data.module import DataSet

    sft = {"path": "builtin:demo/sft_train.jsonl", "eval_path": "builtin:demo/sft_eval.jsonl"}
    pref = {"path": "builtin:demo/pref_train.jsonl", "eval_path": "builtin:demo/pref_eval.jsonl"}
    common = {"max_length": 64, "limit": limit}
    return JointDataModule(
        datasets=[
            DataSet("terse", 0.3, sft=SFTData(**sft, prompt_template=TERSE_TEMPLATE, **common)),
            DataSet("polite", 0.2, sft=SFTData(**pref, format="prompt_chosen", **common)),
            DataSet("prefs", 0.5, preference=PreferenceData(**pref, **common), batch_size=2),
        ],
        batching=Batching(sft_batch_size=4, eval_batch_size=32),
    )


def varied_sft_file(folder) -> str:
    """The first 16 demo SFT rows with answers of 1 to 8 words (the demo's own answers all have the same number
    of tokens), written to ``folder/sft_varied.jsonl``: for tests where the SFT token mean must weigh rows by
    their lengths."""
    import json

    from xright_pl.core.assets import resolve

    lines = Path(resolve("builtin:demo/sft_train.jsonl")).read_text().splitlines()[:16]
    rows = [json.loads(line) for line in lines]
    for i, row in enumerate(rows):
        row["output"] = " ".join(row["instruction"].split()[: 1 + i % 8])
    path = Path(folder) / "sft_varied.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def trainer(tmp_path, max_steps: int, callbacks=(), **kwargs) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("limit_val_batches", 2)
    kwargs.setdefault("val_check_interval", max_steps)
    kwargs.setdefault("num_sanity_val_steps", 0)
    kwargs.setdefault("enable_progress_bar", False)
    return pl.Trainer(
        default_root_dir=str(tmp_path),
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        check_val_every_n_epoch=None,
        callbacks=[RunSummary(print_table=False), *callbacks],
        **kwargs,
    )


class PauseAfterFirstCheckpoint(pl.Callback):
    """Holds a run at the first step after its first ``last.ckpt`` appeared, until the test kills it.

    For kill-and-resume tests in a subprocess (``--trainer.callbacks+=tests.helpers.PauseAfterFirstCheckpoint``):
    the process is killed at a known step whatever the machine's load, not in a race with the training loop.
    Writes ``<default_root_dir>/paused`` when it starts waiting.
    """

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import time

        root = Path(trainer.default_root_dir)
        if (root / "checkpoints" / "last.ckpt").exists():
            (root / "paused").write_text(str(trainer.global_step))
            while True:  # until SIGKILL
                time.sleep(0.05)


def small_fit_args(
    method: str,
    root: Path | str,
    steps: int,
    *extra: str,
    val_every: int,
    val_batches: int,
    checkpoint_every: int,
    eval_batch_size: int,
) -> list[str]:
    """``fit`` arguments for a small, fast CLI run of ``configs/demo/<method>.yaml`` in ``root`` (48 rows of each
    data set, a narrower model with attention dropout so that the training RNG stream matters), then ``extra``."""
    return [
        "fit", "--config", f"configs/demo/{method}.yaml", "--trainer.default_root_dir", str(root),
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(val_every),
        "--trainer.limit_val_batches", str(val_batches), "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "false", "--trainer.callbacks.every_n_train_steps", str(checkpoint_every),
        "--data.sft.limit", "48", "--data.preference.limit", "48",
        "--data.batching.sft_batch_size", "4", "--data.batching.dpo_batch_size", "2",
        "--data.batching.eval_batch_size", str(eval_batch_size),
        "--model.model_config.hidden_size", "32", "--model.model_config.intermediate_size", "64",
        "--model.model_config.attention_dropout", "0.1",  # dropout draws: the training RNG stream must be restored
        "--summary.print_table", "false",
        *extra,
    ]  # fmt: skip
