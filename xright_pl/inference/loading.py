"""A trained model to generate with: an exported folder (anything ``save_pretrained`` wrote), or a run's
checkpoint with the ``config.yaml`` LightningCLI saved in its log folder (see :mod:`xright_pl.inference.generate`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xright_pl.data.encoding import load_tokenizer
from xright_pl.models.build import _DTYPES, ModelError

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ loading


@dataclass
class LoadedGenerator:
    """A model ready to generate, with its tokenizer and (for checkpoints) the run's config."""

    model: torch.nn.Module
    tokenizer: Any
    run_config: dict | None
    name: str


def recorded_run(checkpoint: str) -> dict[str, str] | None:
    """The run folders a checkpoint recorded when it was written (``{"log_dir", "root"}``, see
    :func:`xright_pl.training.distributed.run_folders`); None for a file without them (older checkpoints, other files).
    The file is memory-mapped, so its tensors are not read."""
    from xright_pl.models.lora import LoraSettings

    try:
        with torch.serialization.safe_globals([LoraSettings]):
            ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not readable as a checkpoint here: fall back to the folder layout
        return None
    run = (ckpt.get("xright_pl") or {}).get("run") if isinstance(ckpt, dict) else None
    return run if isinstance(run, dict) and isinstance(run.get("log_dir"), str) else None


def find_run_config(checkpoint: str) -> str | None:
    """The ``config.yaml`` LightningCLI saved for the run of ``checkpoint``.

    Looked for in the checkpoint's folder and the one above, each directly or in a logger folder below it
    (``<root>/lightning_logs/version_N/config.yaml``): checkpoints sit in ``<root>/checkpoints`` or
    ``<log dir>/checkpoints``. When several runs share the root, the checkpoint's own run is taken: the log
    folder it recorded when it was written (also after the root was moved: the same folder relative to the
    root); for a checkpoint without that record (older files), the run that was running when the file was
    written (the newest config not newer than the checkpoint file).
    """
    ckpt = Path(checkpoint).resolve()
    folder = ckpt.parent
    run = None
    for d in (folder, folder.parent):
        direct, nested = sorted(d.glob("config.yaml")), sorted(d.glob("*/*/config.yaml"))
        if not direct and not nested:
            continue
        run = run or recorded_run(str(ckpt)) or {}
        if run:
            own = [Path(run["log_dir"])]
            if isinstance(run.get("root"), str):
                rel = os.path.relpath(run["log_dir"], run["root"])
                if not rel.startswith(".."):
                    own.append(d / rel)
            for p in direct + nested:
                if any(p.parent.resolve() == o.resolve() for o in own):
                    return str(p)
        found = direct or nested
        if len(found) > 1:
            log.warning(
                "%s: %d runs share its folder and the checkpoint records none of them: using the config of the run"
                " that was running when it was written (pass --config to choose)",
                checkpoint,
                len(found),
            )
        written = ckpt.stat().st_mtime_ns
        before = [p for p in found if p.stat().st_mtime_ns <= written]
        return str(max(before or found, key=lambda p: p.stat().st_mtime_ns))
    return None


def _read_run_config(path: str) -> dict:
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ModelError(f"run config {path!r} could not be read: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise ModelError(
            f"run config {path!r} has no 'model' section. Give the config.yaml that `python -m xright_pl fit`"
            " saved in the run's log folder (next to the checkpoints folder)."
        )
    return cfg


def build_module(run_config: dict, reference: str | None = "unchanged", with_reference: bool = True):
    """An :class:`~xright_pl.XRightModule` from a run config's ``model`` section, with ``configure_model``
    done. Training-only settings (selector, optimizer, scheduler) are left out. ``reference`` replaces the
    config's reference source when not ``"unchanged"``; ``with_reference=False`` builds the policy alone."""
    from jsonargparse import ArgumentParser

    import xright_pl.training.module as module_lib

    skip = {"selector", "optimizer", "lr_scheduler"}
    section = {k: v for k, v in run_config["model"].items() if k not in skip}
    if reference != "unchanged":
        section["reference"] = reference
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(module_lib.XRightModule, "model", skip=skip, instantiate=True)
    try:
        ns = parser.parse_object({"model": section})
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        module = instantiate(ns).model
    except Exception as e:  # noqa: BLE001 - jsonargparse errors become one clear message
        raise ModelError(f"the run config's model section could not be read: {e}") from None
    module.configure_model(with_reference=with_reference)
    return module


def load_checkpoint_state(path: str, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint (``torch.load`` on CPU, ``weights_only`` by default)."""
    import pickle

    from xright_pl.models.lora import LoraSettings

    try:
        # The module's hyperparameters may hold the library's own settings dataclasses: allowed by name.
        with torch.serialization.safe_globals([LoraSettings]):
            ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        raise ModelError(
            f"checkpoint {path!r} holds objects other than tensors and plain values, which torch.load refuses "
            f"with weights_only=True ({str(e).splitlines()[0]}). If you trust the file, pass "
            "--weights_only false."
        ) from None
    except (OSError, RuntimeError) as e:
        raise ModelError(f"checkpoint {path!r} could not be read: {e}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ModelError(f"{path!r} is not a Lightning checkpoint (no 'state_dict').")
    return ckpt["state_dict"]


def _load_part(target: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str, path: str) -> None:
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        result = target.load_state_dict(sub, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ModelError(
            f"checkpoint {path!r} does not fit the model built from the run config ({str(e).splitlines()[1].strip()}"
            " ...). Use the config.yaml of the run that wrote the checkpoint (--config)."
        ) from None
    if result.unexpected_keys or result.missing_keys:
        raise ModelError(
            f"checkpoint {path!r} does not match the model built from the run config: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]} (under {prefix!r}). Use the "
            "config.yaml of the run that wrote the checkpoint (--config)."
        )


def load_generator(
    model: str,
    config: str | None = None,
    tokenizer: str | None = None,
    reference: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    weights_only: bool = True,
    trust_remote_code: bool = False,
) -> LoadedGenerator:
    """Load an exported folder or a Lightning checkpoint (+ its run config) for generation (see :func:`generate`)."""
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ModelError(f"dtype must be one of {sorted(k for k in _DTYPES if k)}, got {dtype!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = os.path.expanduser(model)
    run_config = _read_run_config(config) if config else None
    if os.path.isfile(path):
        config = config or find_run_config(path)
        if config is None:
            raise ModelError(
                f"{model!r} is a file (a Lightning checkpoint?) but no config.yaml was found in its folder or the "
                "folder above (directly or in lightning_logs/version_N). Pass the run's config with --config "
                "(LightningCLI writes it to the log folder), or export the run to a folder with "
                "`python -m xright_pl export`."
            )
        run_config = run_config or _read_run_config(config)
        state = load_checkpoint_state(path, weights_only)
        if reference:
            module = build_module(run_config)  # the reference as training built it (its source, or the initial policy)
            if module.reference is not None:
                if any(k.startswith("reference.") for k in state):  # a reference reset during training was saved
                    _load_part(module.reference, state, "reference.", path)
                net = module.reference
            else:  # LoRA: the reference is the policy's base model (adapters off; folded in at a reference reset)
                _load_part(module.policy, state, "policy.", path)
                net = module.policy.unload()
        else:
            module = build_module(run_config, with_reference=False)
            _load_part(module.policy, state, "policy.", path)
            net = module.policy
            if hasattr(net, "merge_and_unload"):  # LoRA: fold the adapters in, generate with a plain model
                net = net.merge_and_unload()
        ckpt_path = Path(path).resolve()
        run_dir = Path(config).resolve().parent
        run_name = run_dir.name
        if run_name.startswith("version_") and run_dir.parent.parent != run_dir.parent:  # <root>/<logger>/version_N
            run_name = f"{run_dir.parent.parent.name}-{run_name}"
        name = f"{run_name}-{ckpt_path.stem}" + ("-reference" if reference else "")
        data = run_config.get("data") or {}
        tok_name = tokenizer or data.get("tokenizer") or run_config["model"].get("model")
        if not tok_name:
            raise ModelError(f"the run config {config!r} names no tokenizer (data.tokenizer): pass --tokenizer.")
        tok = load_tokenizer(tok_name, chat_template=data.get("chat_template"), trust_remote_code=trust_remote_code)
    else:
        if reference:
            raise ModelError("--reference true needs a Lightning checkpoint (the run's reference is not exported).")
        if not os.path.isdir(path):
            raise ModelError(
                f"model {model!r} is neither a folder written by save_pretrained / `python -m xright_pl export` "
                "nor a Lightning checkpoint file. Check the path."
            )
        kwargs = {"dtype": _DTYPES[dtype]} if dtype else {}
        try:
            net = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelError(f"could not load the model in {model!r}: {e}") from None
        chat_template = ((run_config or {}).get("data") or {}).get("chat_template")
        tok = load_tokenizer(tokenizer or path, chat_template=chat_template, trust_remote_code=trust_remote_code)
        name = Path(path).resolve().name
    if dtype:
        net = net.to(_DTYPES[dtype])
    net = net.to(device).eval()
    return LoadedGenerator(model=net, tokenizer=tok, run_config=run_config, name=name)
