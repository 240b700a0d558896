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

from xright_pl.core.errors import ConfigError
from xright_pl.models.build import _DTYPES
from xright_pl.models.lora import is_lora
from xright_pl.training.distributed import agree_run_dir, run_dir

log = logging.getLogger(__name__)


def special_token_ids(policy: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """The special-token ids an exported folder must carry so that ``transformers`` generates (and stops) as
    ``python -m xright_pl generate`` does: the tokenizer's BOS and PAD, and as EOS the ids generation stops on
    (:func:`xright_pl.inference.generate.eos_token_ids`: the tokenizer's EOS plus the end-of-turn ids of a chat model's
    own generation config, e.g. ``<|im_end|>``). ``eos_token_id`` is a list when there are several."""
    from xright_pl.inference.generate import eos_token_ids

    eos = eos_token_ids(policy, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
        "pad_token_id": pad,
    }


def write_special_tokens(out: Path, ids: dict[str, Any]) -> None:
    """Write ``ids`` (see :func:`special_token_ids`) into ``config.json`` and ``generation_config.json`` of an
    exported folder. ``config.json`` gets the tokenizer's single EOS (the model config's usual form), the
    generation config every id generation stops on; ids the tokenizer lacks (None) keep the model's value.
    The generation config is marked as the model's own (not derived from the model config), so ``generate``
    uses it as it is."""
    import json

    from transformers import GenerationConfig

    cfg_path = out / "config.json"
    ids = {k: v for k, v in ids.items() if v is not None}  # a tokenizer without BOS keeps the model's
    cfg = json.loads(cfg_path.read_text())
    single = {k: v[0] if isinstance(v, list) else v for k, v in ids.items()}
    cfg.update(single)
    # Nested text configs (multimodal models) carry their own copies.
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"].update(single)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    try:
        gen = GenerationConfig.from_pretrained(str(out))
    except OSError:  # the model saved none
        gen = GenerationConfig()
    for key, value in ids.items():
        setattr(gen, key, value)
    gen._from_model_config = False
    gen.save_pretrained(str(out))


def save_policy(
    policy: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    merge_lora: bool = True,
    dtype: str | None = None,
) -> Path:
    """Write ``policy`` (a ``transformers`` or ``peft`` model) and ``tokenizer`` to ``out_dir`` with
    ``save_pretrained`` (safetensors). ``policy`` is modified when it carries LoRA adapters (pass a copy to
    keep it). With a tokenizer, ``config.json`` and ``generation_config.json`` get its special-token ids (see
    :func:`special_token_ids`), so ``model.generate`` stops where ``python -m xright_pl generate`` does.
    Returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(k for k in _DTYPES if k)} or null, got {dtype!r}")
    ids = special_token_ids(policy, tokenizer) if tokenizer is not None else None
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
        write_special_tokens(out, ids)
    return out


def _run_config(checkpoint: str | None, config: str | None) -> dict[str, Any]:
    """The run's config: ``config`` if given, else the ``config.yaml`` of the run that wrote the checkpoint
    (see :func:`xright_pl.inference.loading.find_run_config`)."""
    if config is None and checkpoint is not None:
        from xright_pl.inference.loading import find_run_config

        # The config of the run that wrote the checkpoint (recorded in it; else found next to it).
        config = find_run_config(checkpoint)
        if config is not None:
            log.info("using the run config %s", config)
    if config is None:
        return {}
    if not Path(config).is_file():
        raise ConfigError(f"config {config!r} does not exist; give the config.yaml that LightningCLI saved for the run")
    return yaml.safe_load(Path(config).read_text()) or {}


def load_policy(checkpoint: str | None = None, config: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The trained policy of a Lightning checkpoint (or the initial policy of a config) and the run config."""
    from xright_pl.inference.loading import _load_part, build_module, load_checkpoint_state
    from xright_pl.training.module import XRightModule

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
    from xright_pl.data.encoding import load_tokenizer

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

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        agree_run_dir(trainer)  # every process: on_fit_end writes on rank 0 only, which must not broadcast

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        policy = pl_module.policy
        if pl_module.device_mesh is not None:
            raise ConfigError(
                "ExportOnFitEnd does not gather FSDP shards: save a single-file checkpoint"
                " (save_distributed_checkpoint: false) and run `python -m xright_pl export --checkpoint ...`"
            )
        if not trainer.is_global_zero:
            return
        out = self.dirpath or os.path.join(run_dir(trainer), "hf")  # rank 0 only here: no collective
        with torch.no_grad():
            keep = is_lora(policy) or self.dtype is not None  # merging and casting modify the model
            copy_ = copy.deepcopy(policy).cpu() if keep else policy
        tok = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        self.path = save_policy(copy_, out, tok, merge_lora=self.merge_lora, dtype=self.dtype)
        log.info("exported the policy to %s", self.path)
