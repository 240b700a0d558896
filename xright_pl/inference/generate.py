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

import logging
import os
from pathlib import Path
from typing import Any

import torch

from xright_pl.core.assets import resolve
from xright_pl.core.errors import DataError
from xright_pl.data.readers import _read_source
from xright_pl.inference.answers import _check_resume, _check_settings, model_version, read_answers, write_json_atomic
from xright_pl.inference.loading import load_generator
from xright_pl.inference.prompts import PromptEncoder, read_prompts

log = logging.getLogger(__name__)


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
