"""Export a trained policy as a Hugging Face folder: ``save_pretrained`` safetensors plus the tokenizer.

``python -m xright_pl export --checkpoint runs/x/version_0/checkpoints/last.ckpt --out_dir hf/`` reads the
policy from a Lightning checkpoint (the tokenizer from the run's ``config.yaml``, which LightningCLI saves in
the log directory) and writes a folder that ``AutoModelForCausalLM.from_pretrained`` loads. The
:class:`ExportOnFitEnd` callback does the same at the end of ``fit``.

LoRA policies are merged into plain weights by default (``--merge_lora true``). With ``--merge_lora false``
the folder holds the base model (including any update folded in at a Sequential switch, so stage one's
changes are never lost) and ``adapter/`` holds the adapters: ``PeftModel.from_pretrained(base, out/adapter)``.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from torch import nn

from xright_pl.errors import ConfigError
from xright_pl.lora import is_lora
from xright_pl.models import _DTYPES

log = logging.getLogger(__name__)


def save_policy(
    policy: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    merge_lora: bool = True,
    dtype: str | None = None,
) -> Path:
    """Write ``policy`` (a ``transformers`` or ``peft`` model) and ``tokenizer`` to ``out_dir`` with
    ``save_pretrained`` (safetensors). ``policy`` is modified when it carries LoRA adapters (pass a copy to
    keep it). Returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(k for k in _DTYPES if k)} or null, got {dtype!r}")
    model = policy
    if is_lora(policy):
        if merge_lora:
            model = policy.merge_and_unload()
        else:
            policy.save_pretrained(str(out / "adapter"))
            model = policy.unload()  # the base weights, with any update folded in at a stage switch
    if dtype is not None:
        model = model.to(_DTYPES[dtype])
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _run_config(checkpoint: str | None, config: str | None) -> dict[str, Any]:
    """The run's config: ``config`` if given, else ``config.yaml`` of the checkpoint's log directory."""
    if config is None and checkpoint is not None:
        # LightningCLI saves config.yaml in the logger's folder (e.g. <root>/lightning_logs/version_0) and the
        # checkpoints usually sit in <root>/checkpoints or <log_dir>/checkpoints: look up to two levels up.
        ckpt = Path(checkpoint).resolve()
        for folder in ckpt.parents[:2]:
            found = sorted(folder.glob("config.yaml")) or sorted(folder.glob("*/*/config.yaml"))
            if found:
                config = str(max(found, key=lambda p: p.stat().st_mtime))
                log.info("using the run config %s", config)
                break
    if config is None:
        return {}
    if not Path(config).is_file():
        raise ConfigError(f"config {config!r} does not exist; give the config.yaml that LightningCLI saved for the run")
    return yaml.safe_load(Path(config).read_text()) or {}


def load_policy(checkpoint: str | None = None, config: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The trained policy of a Lightning checkpoint (or the initial policy of a config) and the run config."""
    from xright_pl.generate import _load_part, build_module, load_checkpoint_state
    from xright_pl.module import XRightModule

    cfg = _run_config(checkpoint, config)
    if checkpoint is None:
        if not cfg:
            raise ConfigError(
                "give --checkpoint (a Lightning .ckpt) or --run_config (a run config with a model section)"
            )
        return build_module(cfg, with_reference=False).policy, cfg
    if not Path(checkpoint).is_file():
        raise ConfigError(
            f"checkpoint {checkpoint!r} is not a file. Export needs a single-file checkpoint; with"
            " ModelParallelStrategy set save_distributed_checkpoint: false (configs/fsdp.yaml does)."
        )
    if cfg.get("model"):
        # The policy alone (no reference copy: half the memory of an 8B export), from weights-only tensors.
        module = build_module(cfg, with_reference=False)
        _load_part(module.policy, load_checkpoint_state(checkpoint), "policy.", checkpoint)
        return module.policy, cfg
    # No run config: the checkpoint's own hyperparameters (e.g. LoraSettings) need a full unpickle of our file.
    module = XRightModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False)
    return module.policy, cfg


def export(
    checkpoint: str | None = None,
    out_dir: str = "exported",
    run_config: str | None = None,
    tokenizer: str | None = None,
    merge_lora: bool = True,
    dtype: str | None = None,
) -> str:
    """Write a trained policy as a Hugging Face folder (safetensors + tokenizer) for from_pretrained.

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads the result.

    Args:
        checkpoint: Lightning checkpoint of a run (``.ckpt``). None: export the initial policy of ``run_config``.
        out_dir: folder to write.
        run_config: the run's config (default: the ``config.yaml`` LightningCLI saved in the run's log directory,
            found next to the checkpoint); its ``data.tokenizer`` is the tokenizer written alongside.
        tokenizer: tokenizer name or folder, overriding the config's (``builtin:demo/tokenizer`` for the demo).
        merge_lora: merge LoRA adapters into the weights (a plain model). False: the base model in ``out_dir``
            and the adapters in ``out_dir/adapter``.
        dtype: cast the weights before saving (``bfloat16``, ``float16``, ``float32``); None keeps them.
    """
    from xright_pl.data.sources import load_tokenizer

    policy, cfg = load_policy(checkpoint, run_config)
    tok_name = tokenizer or (cfg.get("data") or {}).get("tokenizer")
    tok = None
    if tok_name:
        tok = load_tokenizer(tok_name)
    else:
        log.warning("no tokenizer given or found in the run config: writing the model only")
    out = save_policy(policy, out_dir, tok, merge_lora=merge_lora, dtype=dtype)
    print(f"exported to {out}", flush=True)
    return str(out)


class ExportOnFitEnd(Callback):
    """At the end of ``fit``, write the policy as a Hugging Face folder (rank 0; a copy is merged, so the
    trained module is unchanged).

    Args:
        dirpath: folder to write; None: ``hf`` inside the run's log directory.
        merge_lora: merge LoRA adapters into the weights.
        dtype: cast the weights before saving; None keeps them.
    """

    def __init__(self, dirpath: str | None = None, merge_lora: bool = True, dtype: str | None = None) -> None:
        self.dirpath = dirpath
        self.merge_lora = merge_lora
        self.dtype = dtype
        self.path: Path | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        policy = pl_module.policy
        if pl_module.device_mesh is not None:
            raise ConfigError(
                "ExportOnFitEnd does not gather FSDP shards: save a single-file checkpoint"
                " (save_distributed_checkpoint: false) and run `python -m xright_pl export --checkpoint ...`"
            )
        if not trainer.is_global_zero:
            return
        out = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf")
        with torch.no_grad():
            keep = is_lora(policy) or self.dtype is not None  # merging and casting modify the model
            copy_ = copy.deepcopy(policy).cpu() if keep else policy
        tok = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        self.path = save_policy(copy_, out, tok, merge_lora=self.merge_lora, dtype=self.dtype)
        log.info("exported the policy to %s", self.path)
