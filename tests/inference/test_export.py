"""Export: Hugging Face folders that AutoModelForCausalLM loads, with identical logits; LoRA merged or not;
chained LoRA stages keep stage one's changes."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO, TINY_LLAMA, demo_data, need_extra, tiny_module, trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from xright_pl import ExportOnFitEnd, Sequential, Single
from xright_pl.commands.cli import run
from xright_pl.inference.export import save_policy
from xright_pl.models.lora import LoraSettings

QV = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
IDS = torch.tensor([[1, 5, 9, 33, 70, 12, 3, 100], [2, 8, 8, 41, 7, 90, 130, 4]])


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


def _weights_only_load(real):
    def load(*args, **kwargs):
        assert kwargs.get("weights_only", True) is True, "a full unpickle"
        return real(*args, **kwargs)

    return load


def test_cli_export_round_trip_from_checkpoint(tmp_path, capsys, monkeypatch):
    """fit through the CLI with a checkpoint, export it, reload with transformers: same logits. The export
    builds the policy alone (no reference copy) and reads the checkpoint's tensors weights-only."""
    run(
        [
            "fit", "--config", str(REPO / "configs/demo.yaml"), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--data.sft.limit", "64", "--data.preference.limit", "64",
        ]
    )  # fmt: skip
    ckpt = sorted(tmp_path.rglob("*.ckpt"))
    assert ckpt, "the demo config writes a checkpoint"
    out = tmp_path / "hf"

    def no_reference(_):
        raise AssertionError("export built a reference model")

    with monkeypatch.context() as m:
        m.setattr("xright_pl.training.module.frozen_copy", no_reference)
        m.setattr("torch.load", _weights_only_load(torch.load))
        run(["export", "--checkpoint", str(ckpt[-1]), "--out_dir", str(out)])  # tokenizer from the saved config.yaml
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    from xright_pl import XRightModule

    module = XRightModule.load_from_checkpoint(ckpt[-1], map_location="cpu", weights_only=False)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(loaded), _logits(module.policy), rtol=0, atol=1e-6)
    # The policy was trained (the export is not the initial model).
    init = XRightModule(model_config=module.hparams.model_config, seed=module.hparams.seed)
    init.configure_model()
    assert not torch.allclose(_logits(init.policy), _logits(loaded), atol=1e-4)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token is not None and len(tok) == 140


def _trained_lora(tmp_path, selector, steps, model=None, **kw):
    if model is None:
        module = tiny_module(selector, lora=QV, **kw)
    else:
        module = tiny_module(selector, lora=QV, **kw)
        module.hparams.model_config, module.hparams.model = None, str(model)
    module.configure_model()
    trainer(tmp_path, steps).fit(module, datamodule=demo_data())
    return module


@pytest.mark.parametrize("merge", [True, False])
def test_lora_export_merged_and_unmerged(tmp_path, merge):
    need_extra("peft")
    module = _trained_lora(tmp_path, Single("sft"), 3)
    expected = _logits(module.policy)
    out = save_policy(module.policy, tmp_path / "hf", merge_lora=merge)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    if merge:
        assert not (out / "adapter").exists()
        assert not any("lora" in k for k in loaded.state_dict())
        torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=1e-5)
    else:
        from peft import PeftModel

        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
        torch.testing.assert_close(
            _logits(PeftModel.from_pretrained(loaded, out / "adapter")), expected, rtol=0, atol=1e-5
        )


def test_sequential_lora_export_keeps_stage_one(tmp_path):
    """In one run with a stage-start reference, stage one's adapters are folded into the base at the switch;
    the end-of-fit export equals the final policy (stage one + stage two), not stage two's adapters alone."""
    need_extra("peft")
    stage1 = {}

    class Spy(Sequential):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                stage1["logits"] = _logits(pl_module.policy)
                pl_module.policy.train()

    module = tiny_module(Spy(first="sft", switch_step=3, reference="stage_start"), lora=QV)
    cb = ExportOnFitEnd(dirpath=str(tmp_path / "hf"))
    t = trainer(tmp_path, 5, callbacks=[cb])
    t.fit(module, datamodule=demo_data())
    loaded = AutoModelForCausalLM.from_pretrained(cb.path)
    torch.testing.assert_close(_logits(loaded), _logits(module.policy), rtol=0, atol=1e-5)
    # The stage-two reference (adapters disabled) is the stage-one policy: its changes were kept.
    from xright_pl.models.lora import reference_mode

    with reference_mode(module.policy) as base:
        ref = base(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits
    torch.testing.assert_close(ref, stage1["logits"], rtol=0, atol=1e-5)
    # The export was made from a copy: the live module still has its adapters.
    assert any("lora_A" in n for n, _ in module.policy.named_parameters())
    # Unmerged export keeps the folded base: base + adapter == policy.
    from peft import PeftModel

    out = save_policy(__import__("copy").deepcopy(module.policy), tmp_path / "hf2", merge_lora=False)
    base = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(base), stage1["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        _logits(PeftModel.from_pretrained(base, out / "adapter")), _logits(module.policy), rtol=0, atol=1e-5
    )


def test_chained_runs_keep_stage_one(tmp_path):
    """Stage one (SFT, LoRA) exported merged; stage two starts from that folder with fresh adapters: its
    initial policy and reference are stage one's result, and its export contains both stages."""
    need_extra("peft")
    s1 = _trained_lora(tmp_path / "s1", Single("sft"), 3)
    s1_logits = _logits(s1.policy)
    out1 = save_policy(s1.policy, tmp_path / "hf1")
    s2 = tiny_module(Single("dpo"), lora=QV)
    s2.hparams.model_config, s2.hparams.model = None, str(out1)
    s2.configure_model()
    torch.testing.assert_close(_logits(s2.policy), s1_logits, rtol=0, atol=1e-5)  # B = 0: stage one exactly
    s2.policy.train()
    trainer(tmp_path / "s2", 3).fit(s2, datamodule=demo_data())
    final = _logits(s2.policy)
    out2 = save_policy(s2.policy, tmp_path / "hf2")
    loaded = _logits(AutoModelForCausalLM.from_pretrained(out2))
    torch.testing.assert_close(loaded, final, rtol=0, atol=1e-5)
    assert not torch.allclose(loaded, s1_logits, atol=1e-4)
    # The untouched random base is far from both: stage one is in the export.
    base = tiny_module(Single("dpo"))
    base.configure_model()
    assert (loaded - _logits(base.policy)).abs().max() > (loaded - s1_logits).abs().max()


def _demo_rows(n: int) -> list[dict]:
    lines = (REPO / "xright_pl/assets/demo/sft_eval.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines[:n]]


def test_exported_folder_generates_like_xright_pl_generate_in_plain_transformers(tmp_path):
    """Issue 11 (2): the export carries the tokenizer's special-token ids (demo: bos 2, eos 3, pad 0; the
    Llama config defaults are bos 1, eos 2), so greedy `model.generate` in plain transformers, on the folder
    alone, gives token for token what `xright_pl generate` gives on the checkpoint, and stops at EOS."""
    from xright_pl.inference.generate import generate

    root = tmp_path / "run"
    run(
        [
            "fit", "--config", str(REPO / "configs/demo/sft_only.yaml"), "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", "200", "--trainer.val_check_interval", "200", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--summary.print_table", "false",
            "--trajectory.enabled", "false", "--data.preference.limit", "64",
        ]
    )  # fmt: skip
    ckpt = root / "checkpoints" / "last.ckpt"
    out = tmp_path / "hf"
    run(["export", "--checkpoint", str(ckpt), "--out_dir", str(out)])
    tok = AutoTokenizer.from_pretrained(out)
    ids = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert ids == (2, 3, 0)
    for name in ("config.json", "generation_config.json"):
        written = json.loads((out / name).read_text())
        assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == ids, name

    rows = _demo_rows(8)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    generate(str(ckpt), str(prompts), str(tmp_path / "a.json"), max_new_tokens=16, progress=False)
    answers = [a["output"] for a in json.loads((tmp_path / "a.json").read_text())]
    assert len(set(answers)) > 1  # the trained model answers different prompts differently

    # Plain transformers, nothing but the folder: the run's prompt form, default generation settings (greedy).
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    template = "Human: {instruction} {input} Assistant:"
    for row, answer in zip(rows, answers):
        enc = tok(template.format(**row), return_tensors="pt")
        assert enc.input_ids[0, 0].item() == tok.bos_token_id
        with torch.no_grad():
            full = model.generate(**enc, max_new_tokens=16)
        new = full[0, enc.input_ids.shape[1] :].tolist()
        assert new[-1] == tok.eos_token_id and tok.eos_token_id not in new[:-1], tok.decode(new)  # stopped at EOS
        assert new[:-1] == tok(answer, add_special_tokens=False).input_ids, (tok.decode(new), answer)


def test_export_on_fit_end_writes_the_tokenizer_special_tokens(tmp_path):
    module = tiny_module(Single("sft"))
    cb = ExportOnFitEnd(dirpath=str(tmp_path / "hf"))
    data = demo_data(limit=32)
    trainer(tmp_path, 1, callbacks=[cb]).fit(module, datamodule=data)
    tok = data.tokenizer
    for name in ("config.json", "generation_config.json"):
        written = json.loads((cb.path / name).read_text())
        assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (2, 3, 0), name
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 3, 0)
    # The live policy's own configs are untouched (the callback exported without a copy).
    assert module.policy.config.eos_token_id != 3


def test_export_keeps_a_chat_models_end_of_turn_ids(tmp_path):
    """A chat model whose own generation config ends turns with another token than the tokenizer's EOS (e.g.
    `<|im_end|>`; here id 7): `xright_pl generate` stops on both, so the exported generation config lists both
    (config.json keeps the tokenizer's EOS) and a reload stops on the same ids."""
    from transformers import GenerationConfig

    from xright_pl.data.encoding import load_tokenizer
    from xright_pl.inference.generate import eos_token_ids
    from xright_pl.models.build import build_causal_lm

    tok = load_tokenizer("builtin:demo/tokenizer")
    model = build_causal_lm(config=dict(TINY_LLAMA), seed=0)
    model.generation_config = GenerationConfig(eos_token_id=[7, 3], bos_token_id=2)
    assert eos_token_ids(model, tok) == [3, 7]
    out = save_policy(model, tmp_path / "hf", tok)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [3, 7]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 3
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.generation_config.eos_token_id == [3, 7]
    assert eos_token_ids(loaded, AutoTokenizer.from_pretrained(out)) == [3, 7]
    # A tokenizer without BOS (Qwen's) leaves the model's BOS as it was.
    tok.bos_token = None
    assert tok.bos_token_id is None
    out = save_policy(build_causal_lm(config=dict(TINY_LLAMA), seed=0), tmp_path / "nobos", tok)
    written = json.loads((out / "config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (1, 3, 0)


def test_export_initial_model_from_config(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model:\n  model_config: "
        + json.dumps(TINY_LLAMA)
        + "\n  seed: 0\ndata:\n  tokenizer: builtin:demo/tokenizer\n"
    )
    out = run(["export", "--run_config", str(cfg), "--out_dir", str(tmp_path / "hf"), "--dtype", "bfloat16"])
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    module = tiny_module()
    module.configure_model()
    torch.testing.assert_close(loaded.model.embed_tokens.weight, module.policy.model.embed_tokens.weight.bfloat16())
