"""``python -m xright_pl generate``: answer a prompts file with a trained model, in AlpacaEval's format.

The model is an exported folder (anything written by ``save_pretrained``: model + tokenizer) or a Lightning
checkpoint of a run together with the ``config.yaml`` that LightningCLI saved in the run's log folder (found
in the checkpoint's folder or the one above, directly or two levels below: ``lightning_logs/version_N``).
With a checkpoint, the prompts are built exactly as in training: the run's tokenizer, its SFT
``prompt_template``, its ``chat_template`` and its ``max_prompt_length`` (the prompt is cut from the left, a
leading BOS kept).

Prompts come from a ``.jsonl``/``.json``/``.parquet`` file or a hub dataset in any format the data module
reads (alpaca, prompt_completion, messages, prompt_chosen_rejected, hh, conversational) or as prompt-only
rows (``instruction`` [+ ``input``], ``prompt``, or ``messages`` not ending with an assistant turn).
AlpacaEval's own evaluation set (``instruction``/``output``/``generator``/``dataset``) is read as alpaca.

The output is a JSON list of ``{"instruction", "output", "generator", "dataset", "prompt_id"}`` objects
(AlpacaEval's ``model_outputs`` format), rewritten atomically after every batch. Rerunning into the same
file resumes after the last answered prompt (answers are matched to prompts by position and instruction).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xright_pl.core.assets import resolve
from xright_pl.core.errors import DataError
from xright_pl.data.chat import ChatEncoder, text_to_messages
from xright_pl.data.encoding import _Encoder, load_tokenizer
from xright_pl.data.formats import (
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    _response_text,
    _split_preference_row,
    _validate,
    detect_preference_format,
    detect_sft_format,
    format_preference_row,
    format_sft_row,
)
from xright_pl.data.readers import _read_source
from xright_pl.models.build import _DTYPES, ModelError

log = logging.getLogger(__name__)
PROMPT_FORMATS = ("auto", *SFT_FORMATS[1:], *PREFERENCE_FORMATS[1:], "prompt")


# --------------------------------------------------------------------------------------------- prompts


@dataclass
class PromptItem:
    """One prompt to answer.

    Attributes:
        instruction: the text written to the output's ``instruction`` field (what a judge reads): the alpaca
            instruction (with ``input`` appended after a blank line), the prompt string, or a chat prompt as
            an HH-style transcript (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; a single user turn is its text).
        prompt: what the model is conditioned on: a string (the training prompt template already applied)
            or a list of ``{role, content}`` messages (rendered with the tokenizer's chat template).
        reference: the data set's answer (SFT output / completion, preference ``chosen``), None for
            prompt-only rows.
        prompt_id: the row's position in the source.
        dataset: the row's own ``dataset`` field (AlpacaEval's evaluation set has one), if a string.
    """

    instruction: str
    prompt: str | list[dict]
    reference: str | None
    prompt_id: int
    dataset: str | None = None


def messages_to_instruction(messages: list[dict]) -> str:
    """A chat prompt as text: a lone user turn is its content; longer prompts an HH-style transcript."""
    if len(messages) == 1 and messages[0].get("role") == "user":
        return messages[0]["content"]
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages)


def _fitting_template(template: str | None, kind: str, strict: bool) -> str | None:
    """``template`` if its placeholders fit rows of ``kind`` (``alpaca``: ``{instruction}``/``{input}``;
    ``prompt``: ``{prompt}``), else (not ``strict``: a template taken from the run's config) None."""
    if template is None or strict:
        return template
    fits = "{prompt}" in template if kind == "prompt" else "{prompt}" not in template
    if not fits:
        log.info(
            "the run's SFT prompt_template %r does not fit %s rows: their prompts are used as they are", template, kind
        )
    return template if fits else None


def _prompt_only(
    row: dict, name: str, i: int, template: str | None, strict: bool = True, chat: bool = False
) -> tuple[str, str | list, str | None]:
    """(instruction, prompt, answer if the row has one) of a prompt row (``chat``: text prompts as messages,
    as the data module's ``use_chat_template`` builds them)."""
    if isinstance(row.get("instruction"), str):
        template = _fitting_template(template, "alpaca", strict)
        inp = row.get("input") or ""
        if not isinstance(inp, str):
            raise DataError(f"{name}: row {i}: field 'input' must be a string, got {type(inp).__name__}.")
        prompt, _ = format_sft_row({**row, "input": inp, "output": ""}, "alpaca", template, chat)
        answer = row.get("output") if isinstance(row.get("output"), str) else None
        return (row["instruction"] + (f"\n\n{inp}" if inp.strip() else "")), prompt, answer
    if isinstance(row.get("prompt"), str):
        p = row["prompt"]
        template = _fitting_template(template, "prompt", strict)
        prompt = format_sft_row({"prompt": p, "completion": ""}, "prompt_completion", template, chat)[0]
        answer = row.get("completion") if isinstance(row.get("completion"), str) else None
        return p, prompt, answer
    msgs = row.get("messages", row.get("prompt"))
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs):
        msgs = [{k: v for k, v in m.items() if v is not None} for m in msgs]
        answer = None
        if msgs[-1].get("role") == "assistant":
            answer, msgs = msgs[-1].get("content"), msgs[:-1]
        if msgs and all(isinstance(m.get("content"), str) and isinstance(m.get("role"), str) for m in msgs):
            return messages_to_instruction(msgs), msgs, answer
    raise DataError(
        f"{name}: row {i} has keys {sorted(row)}, which hold no prompt. A prompt row needs 'instruction' "
        "(optional 'input'), 'prompt' (a string or a list of messages) or 'messages'; SFT and preference "
        "rows are read too. Fix the row or set `format`."
    )


def read_prompts(
    path: str,
    format: str = "auto",
    prompt_template: str | None = None,
    limit: int | None = None,
    split: str | None = None,
    strict_template: bool = True,
    chat: bool = False,
) -> list[PromptItem]:
    """Read the prompts (and the data set's answers, when there are any) of a prompts file.

    Args:
        path: a local ``.jsonl``/``.json``/``.parquet`` file, a ``builtin:`` asset or a hub dataset name.
        format: ``auto`` (from the first row's keys), an SFT or preference format of the data module, or
            ``prompt`` (prompt-only rows).
        prompt_template: the SFT prompt template of training (``{instruction}``/``{input}`` or ``{prompt}``);
            None: the standard Alpaca template for alpaca rows, the prompt as-is otherwise.
        limit: read only the first N rows.
        split: split of a hub dataset (default ``train``).
        strict_template: a template whose placeholders do not fit the rows is an error (False: prompt-only rows
            it does not fit are used as they are; for a template taken from the run's config).
        chat: text prompts become chat messages, as the data module's ``use_chat_template`` makes them (an
            alpaca row one user message, an HH dialogue its turns); ``prompt_template`` applies to preference
            rows' prompts too (``{prompt}``), as ``PreferenceData.prompt_template`` does.
    """
    if format not in PROMPT_FORMATS:
        raise DataError(f"{path}: unknown format {format!r}. Valid formats: {', '.join(PROMPT_FORMATS)}.")
    raw = _read_source(path, split, limit)
    rows = raw.rows if raw.rows is not None else [dict(r) for r in raw.dataset]
    fmt = format
    if fmt == "auto":
        first = rows[0]
        if "chosen" in first and "rejected" in first:
            fmt = detect_preference_format(first, raw.name)
        else:
            try:
                fmt = detect_sft_format(first, raw.name)
            except DataError:
                fmt = "prompt"
            if fmt == "messages" and (first["messages"] or [{}])[-1].get("role") != "assistant":
                fmt = "prompt"
    if fmt != "prompt":
        _validate(raw, fmt)
    items: list[PromptItem] = []
    for i, row in enumerate(rows):
        reference: Any = None
        if fmt == "prompt":
            instruction, prompt, reference = _prompt_only(row, raw.name, i, prompt_template, strict_template, chat)
        elif fmt in PREFERENCE_FORMATS:
            text_prompt = _split_preference_row(row, fmt)
            parts = format_preference_row(row, fmt, prompt_template if fmt != "conversational" else None, chat)
            if parts is None:
                raise DataError(
                    f"{raw.name}: {raw.where(i)}: chosen and rejected share no prompt (no common "
                    "'\\n\\nAssistant:' / message prefix), so there is nothing to answer. Fix or drop the row."
                )
            prompt, reference, _ = parts
            shown = text_prompt[0] if text_prompt is not None else prompt
            instruction = shown if isinstance(shown, str) else messages_to_instruction(shown)
        else:
            prompt, reference = format_sft_row(row, fmt, prompt_template if fmt != "messages" else None, chat)
            if fmt == "alpaca":
                inp = row.get("input") or ""
                instruction = row["instruction"] + (f"\n\n{inp}" if inp.strip() else "")
            elif isinstance(prompt, str):
                instruction = row["prompt"] if isinstance(row.get("prompt"), str) else prompt
            else:
                instruction = messages_to_instruction(prompt)
        if reference is not None:
            reference = _response_text(reference).strip()
        source = row.get("dataset") if isinstance(row.get("dataset"), str) else None
        items.append(PromptItem(instruction, prompt, reference, i, source))
    return items


class PromptEncoder:
    """Token ids of prompts, built like the prompt part of a training sequence.

    Text prompts are the tokenizer's leading special tokens (e.g. BOS) + the prompt's tokens, cut from the left
    (keeping the leading BOS) when longer than ``max_prompt_length``. Chat prompts are the chat template's
    rendering with ``add_generation_prompt=True``, fitted to ``max_prompt_length`` as in training (whole earlier
    turns dropped first, the system turn and the assistant header kept; see :mod:`xright_pl.data.chat`). With
    ``use_chat_template`` text prompts are turned into messages first.
    """

    def __init__(self, tokenizer, max_prompt_length: int | None = None, use_chat_template: bool = False) -> None:
        self.tok = tokenizer
        self.max_prompt_length = max_prompt_length
        self.use_chat_template = use_chat_template
        enc = _Encoder(tokenizer, 2**31, 2**31, "prompts")
        self.prefix = list(enc.prefix)
        self.bos_id = enc.bos_id
        self.chat = ChatEncoder(tokenizer, max_prompt_length or 2**31, "prompts")

    def __call__(self, prompt: str | list[dict]) -> list[int]:
        if isinstance(prompt, str) and self.use_chat_template:
            prompt = text_to_messages(prompt)[0]
        if isinstance(prompt, list):
            if not getattr(self.tok, "chat_template", None):
                raise DataError(
                    "chat prompts need a chat template, but the tokenizer has none. Use a chat (instruct) "
                    "tokenizer or pass `chat_template`."
                )
            fitted = self.chat.prompt_ids(prompt)
            if fitted is None:
                raise DataError(
                    f"a chat prompt does not fit max_prompt_length={self.max_prompt_length}: not one token of the"
                    " user's text fits beside the system turn and the headers (training skips such rows as"
                    " prompt_too_long). Raise --max_prompt_length."
                )
            return fitted[1]
        ids = self.prefix + self.tok(prompt, add_special_tokens=False)["input_ids"]
        n = self.max_prompt_length
        if n is not None and len(ids) > n:
            head = self.prefix
            keep = len(head) if head else int(bool(ids) and self.bos_id is not None and ids[0] == self.bos_id)
            tail = n - keep
            ids = (ids[:keep] + (ids[len(ids) - tail :] if tail > 0 else []))[:n]
        return ids


# ------------------------------------------------------------------------------------------- generation


def eos_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS, plus the EOS ids of a ``generation_config.json`` shipped with the model (chat
    models often end turns with a token other than the tokenizer's EOS). A generation config derived from
    the model config (random init) carries architecture defaults, not the tokenizer's ids, and is ignored."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gc = getattr(model, "generation_config", None)
    if gc is not None and not getattr(gc, "_from_model_config", True) and gc.eos_token_id is not None:
        extra = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
        ids += [int(i) for i in extra if int(i) not in ids]
    return ids


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_ids: list[int] | None = None,
) -> list[str]:
    """Answer a batch of tokenized prompts (left-padded) and return the decoded new text of each.

    Generation stops at any of ``eos_ids`` (default :func:`eos_token_ids`); special tokens are dropped from
    the text and surrounding whitespace stripped. The model's mode (train/eval) is restored afterwards.
    """
    from transformers import GenerationConfig

    if not prompts:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            input_ids[i, width - len(p) :] = torch.as_tensor(p)
            mask[i, width - len(p) :] = 1
    eos_ids = eos_ids if eos_ids is not None else eos_token_ids(model, tokenizer)
    settings: dict[str, Any] = {"do_sample": do_sample}
    if do_sample:
        settings.update(temperature=temperature, top_p=top_p, top_k=0)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_ids or None, use_cache=True, **settings
    )
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config)
    finally:
        model.train(was_training)
    return [t.strip() for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]


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


# ------------------------------------------------------------------------------------------ output


def read_answers(path: str) -> list[dict]:
    """The entries of an answers file written by :func:`generate` (a JSON list; missing file: empty)."""
    if not os.path.exists(path):
        return []
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8") or "[]")
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}); it cannot be resumed. Delete it or pass "
            "--overwrite true."
        ) from None
    if not isinstance(data, list) or not all(isinstance(r, dict) and "output" in r for r in data):
        raise DataError(f"{path}: not an answers file (a JSON list of objects with 'output'). Use another --output.")
    return data


def write_json_atomic(path: str, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename (never half-written)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _check_resume(done: list[dict], items: list[PromptItem], generator: str, output: str) -> None:
    if len(done) > len(items):
        raise DataError(
            f"{output}: holds {len(done)} answers but there are only {len(items)} prompts: it was written for "
            "other prompts. Use another --output or pass --overwrite true."
        )
    for i, (entry, item) in enumerate(zip(done, items)):
        if entry.get("instruction") != item.instruction:
            raise DataError(
                f"{output}: answer {i} is for the instruction {str(entry.get('instruction'))[:60]!r}, but prompt "
                f"{i} is {item.instruction[:60]!r}: the file was written for other prompts. Use another --output "
                "or pass --overwrite true."
            )
        if entry.get("generator") != generator:
            raise DataError(
                f"{output}: answer {i} was written by generator {entry.get('generator')!r}, not {generator!r}. "
                "Use another --output, the same --generator, or pass --overwrite true."
            )


def model_version(model: str) -> dict[str, Any]:
    """Cheap identity of the weights behind ``model`` (a .ckpt or an exported folder): size and modification
    time of its weight files, so a resumed answers file is not continued with other weights (e.g. a newer
    ``last.ckpt``)."""
    path = Path(resolve(model))
    files = [path] if path.is_file() else sorted(p for p in path.glob("*") if p.suffix in (".safetensors", ".bin"))
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.exists()}


def _check_settings(output: str, settings: dict[str, Any], fresh: bool) -> None:
    """Refuse to resume ``output`` with other generation settings or other weights than it was started with
    (recorded in ``<output>.settings.json``); record them when starting afresh."""
    sidecar = f"{output}.settings.json"
    if fresh or not os.path.exists(sidecar):
        if not fresh:
            log.warning("%s has answers but no %s: cannot check that the settings are the same", output, sidecar)
        write_json_atomic(sidecar, settings)
        return
    try:
        before = json.loads(Path(sidecar).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{sidecar}: unreadable ({e}). Delete it, or pass --overwrite true.") from None
    changed = [k for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
    if changed:
        diff = "; ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in changed)
        raise DataError(
            f"{output}: its answers were generated with other settings or weights ({diff}); resuming would mix"
            " them in one file. Use another --output, the same settings, or pass --overwrite true."
        )


def _check_request(prompts: str, split: str | None, limit: int | None, max_new_tokens: int, batch_size: int) -> None:
    """Refuse, before the model is loaded, a request that would answer nothing: no new tokens, no prompts."""
    if max_new_tokens < 1:
        raise DataError(
            f"--max_new_tokens {max_new_tokens}: an answer needs at least 1 new token, so nothing would be generated."
            " Give --max_new_tokens 1 or more (default 256)."
        )
    if batch_size < 1:
        raise DataError(f"--batch_size {batch_size}: a batch holds at least 1 prompt. Give --batch_size 1 or more.")
    if limit is not None and limit < 1:
        raise DataError(
            f"--limit {limit}: there would be no prompts to answer. Give --limit 1 or more, or leave it out to answer"
            " every prompt."
        )
    try:
        _read_source(prompts, split, 1)
    except DataError as e:
        text = str(e)
        if "empty" not in text and "no rows" not in text:
            raise
        reason = text.split(". Point `path`")[0].split(": ", 1)[-1]
        raise DataError(
            f"--prompts {prompts}: there are no prompts to answer ({reason}). Give a prompts file with at least one"
            " row: .jsonl/.json/.parquet with `instruction` [+ `input`], `prompt` or `messages`, any SFT or"
            " preference format, or a hub dataset."
        ) from None


def generate(
    model: str,
    prompts: str,
    output: str,
    config: str | None = None,
    tokenizer: str | None = None,
    reference: bool = False,
    format: str = "auto",
    prompt_template: str | None = None,
    max_prompt_length: int | None = None,
    use_chat_template: bool | None = None,
    limit: int | None = None,
    split: str | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    generator: str | None = None,
    dataset: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    weights_only: bool = True,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer the prompts of a file with a model and write the answers in AlpacaEval's format.

    The output (a JSON list of ``instruction``/``output``/``generator``/``dataset``/``prompt_id`` objects) is
    rewritten after every batch; rerunning the same command resumes after the last answered prompt.

    Args:
        model: an exported folder (``save_pretrained`` model + tokenizer, e.g. from ``python -m xright_pl
            export``) or a Lightning checkpoint (``.ckpt``) of a ``fit`` run.
        prompts: prompts file (.jsonl/.json/.parquet, ``builtin:`` asset or hub dataset): prompt-only rows
            (``instruction`` [+ ``input``], ``prompt``, ``messages``) or any SFT / preference format.
        output: the answers file (JSON) to write or resume.
        config: the run's ``config.yaml`` (default for a checkpoint: the one of the run that wrote it, in its
            folder or the folder above, directly or two levels below them, e.g. ``lightning_logs/version_0``;
            see :func:`find_run_config`). It gives the model, tokenizer, prompt template, chat template and max
            prompt length.
        tokenizer: tokenizer to use instead of the folder's / the run's.
        reference: answer with the run's DPO reference model instead of the policy (checkpoints only):
            a baseline for ``python -m xright_pl judge``.
        format: prompts format: auto, alpaca, prompt_completion, messages, prompt_chosen_rejected, hh,
            conversational, or prompt (prompt-only rows).
        prompt_template: prompt template with ``{instruction}``/``{input}`` or ``{prompt}`` (default: the run's
            SFT ``prompt_template``; else the standard Alpaca template for alpaca rows, prompts as-is).
        max_prompt_length: fit longer prompts as training does (text: cut from the left, keeping BOS; chat:
            earlier turns dropped first) (default: the run's setting for the format's data; no limit for an
            exported folder).
        use_chat_template: send text prompts (alpaca, prompt, HH dialogues) through the tokenizer's chat template
            (default: the run's ``use_chat_template`` for the format's data; off for an exported folder).
        limit: answer only the first N prompts.
        split: split of a hub dataset of prompts (default ``train``).
        max_new_tokens: most tokens generated per answer (at least 1).
        batch_size: prompts per generation batch (left-padded).
        do_sample: sample instead of greedy decoding (greedy is the default and is deterministic).
        temperature: sampling temperature (with ``do_sample``).
        top_p: nucleus sampling mass (with ``do_sample``).
        seed: seed of sampling; batch ``i`` (starting at prompt ``s``) samples under ``seed + s``, so a
            resumed run draws the same as an uninterrupted one with the same ``batch_size``.
        generator: the ``generator`` name written in the file (AlpacaEval's model name); default: the folder
            name, or ``<run folder>-<checkpoint name>`` for the checkpoint's own run
            (``<root>-version_N-<checkpoint name>`` for a config in a logger's version folder), with
            ``-reference`` for ``--reference true``.
        dataset: the ``dataset`` field written in the file when the prompt row has none (default: the
            prompts file's name).
        device: ``cuda``, ``cpu``, ``cuda:1``, ... (default: cuda when available).
        dtype: weights dtype: float32, bfloat16, float16 (default: the model's own).
        overwrite: start the output afresh instead of resuming it.
        weights_only: load checkpoints with ``torch.load(weights_only=True)`` (only turn off for files you trust).
        trust_remote_code: allow custom model / tokenizer code from the hub.
        progress: show a progress bar.

    Returns:
        ``{"output", "generator", "prompts", "skipped" (already answered), "generated"}``.
    """
    from tqdm.auto import tqdm

    _check_request(prompts, split, limit, max_new_tokens, batch_size)
    loaded = load_generator(model, config, tokenizer, reference, device, dtype, weights_only, trust_remote_code)
    data_cfg = (loaded.run_config or {}).get("data") or {}
    first = _read_source(prompts, split, 1).first()
    kind = "preference" if "chosen" in first and "rejected" in first else "sft"
    run_data = data_cfg.get(kind) or {}  # the training settings of this kind of rows
    if data_cfg.get("datasets"):  # K data sets: the first of this kind (data.sft / data.preference were not used)
        run_data = next((d.get(kind) for d in data_cfg["datasets"] if d.get(kind)), None) or {}
    from_run = prompt_template is None
    if from_run:
        prompt_template = run_data.get("prompt_template")
    if use_chat_template is None:
        use_chat_template = bool(run_data.get("use_chat_template", False))
    items = read_prompts(prompts, format, prompt_template, limit, split, not from_run, use_chat_template)
    if max_prompt_length is None:
        max_prompt_length = run_data.get("max_prompt_length")
    name = generator or loaded.name
    dataset = dataset or Path(prompts).stem
    done = [] if overwrite else read_answers(output)
    _check_resume(done, items, name, output)
    settings = {
        "model": os.path.abspath(resolve(model)),
        "weights": model_version(model),
        "reference": reference,
        "prompt_template": prompt_template,
        "max_prompt_length": max_prompt_length,
        **({"use_chat_template": True} if use_chat_template else {}),
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        **({"temperature": temperature, "top_p": top_p, "seed": seed, "batch_size": batch_size} if do_sample else {}),
        "dtype": dtype,
    }
    _check_settings(output, settings, fresh=not done)
    encode = PromptEncoder(loaded.tokenizer, max_prompt_length, use_chat_template)
    eos_ids = eos_token_ids(loaded.model, loaded.tokenizer)
    results = list(done)
    start = len(done)
    bar = tqdm(total=len(items), initial=start, desc=f"generate ({name})", unit="prompt", disable=not progress)
    dev = next(loaded.model.parameters()).device
    for s in range(start, len(items), batch_size):
        chunk = items[s : s + batch_size]
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed + s)
            texts = generate_batch(
                loaded.model,
                loaded.tokenizer,
                [encode(it.prompt) for it in chunk],
                max_new_tokens,
                do_sample,
                temperature,
                top_p,
                eos_ids,
            )
        for it, text in zip(chunk, texts):
            results.append(
                {
                    "instruction": it.instruction,
                    "output": text,
                    "generator": name,
                    "dataset": it.dataset or dataset,
                    "prompt_id": it.prompt_id,
                }
            )
        write_json_atomic(output, results)
        bar.update(len(chunk))
    bar.close()
    if start == len(items) and not os.path.exists(output):
        write_json_atomic(output, results)
    summary = {
        "output": output,
        "generator": name,
        "prompts": len(items),
        "skipped": start,
        "generated": len(items) - start,
    }
    print(f"{summary['generated']} answers generated, {start} already present; {len(items)} in {output}", flush=True)
    return summary
