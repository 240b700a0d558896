"""LoRA: one base model in memory, the reference is the adapter-free policy, only adapters train."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TINY_LLAMA, demo_data, need_extra, tiny_module, trainer

from xright_pl import Maxright, Sequential, Single
from xright_pl.callbacks.summary import weights_sha256
from xright_pl.core.errors import ConfigError
from xright_pl.models.build import build_causal_lm
from xright_pl.models.lora import LoraSettings, parameter_counts

QV = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


class RecMaxright(Maxright):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen = []

    def decide(self, step, losses):
        self.seen.append(dict(losses))
        return super().decide(step, losses)


def _adapter_params(hidden: int, q_out: int, v_out: int, layers: int, r: int) -> int:
    """LoRA on a linear ``in -> out`` adds A ``[r, in]`` and B ``[out, r]``: ``r * (in + out)`` weights."""
    return layers * (r * (hidden + q_out) + r * (hidden + v_out))


def test_one_base_model_and_adapter_count():
    """Tiny Llama: hidden 32, 4 heads of 8, 2 KV heads -> q_proj 32->32, v_proj 32->16; 2 layers, r=4:
    2 * (4*(32+32) + 4*(32+16)) = 2 * (256 + 192) = 896 adapter weights."""
    need_extra("peft")
    module = tiny_module(lora=QV)
    module.configure_model()
    base_total = parameter_counts(build_causal_lm(None, dict(TINY_LLAMA)))["total"]
    counts = parameter_counts(module)  # everything the LightningModule holds
    head_dim = TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"]
    expected = _adapter_params(32, 32, TINY_LLAMA["num_key_value_heads"] * head_dim, 2, 4)
    assert expected == 896
    assert module.reference is None
    assert counts["trainable"] == expected
    assert counts["total"] == base_total + expected  # one base model, not two
    # Every trainable parameter is an adapter weight.
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    # The optimizer gets only those.
    opt = module.configure_optimizers()
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == expected


def _fit(tmp_path, selector, steps, **kwargs):
    need_extra("peft")  # the tests that train adapters skip without the lora extra
    module = tiny_module(selector, lora=kwargs.pop("lora", QV), **kwargs)
    module.configure_model()
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    t = trainer(tmp_path, steps)
    t.fit(module, datamodule=demo_data())
    return module, before


def test_dpo_loss_at_step_zero_is_ln2_and_only_adapters_change(tmp_path):
    """B = 0 at initialisation, so policy == adapter-free reference and every pair's loss is ln 2."""
    sel = RecMaxright(f_sft_star=0.0, f_dpo_star=0.0, eval_every=1)
    module, before = _fit(tmp_path, sel, 6)
    assert sel.seen[0]["dpo"] == pytest.approx(math.log(2), abs=1e-6)
    after = module.policy.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapters = {k for k in before if ".lora_A." in k or ".lora_B." in k}
    assert changed == adapters  # every adapter weight moved; no base weight did
    assert module.steps["sft"] + module.steps["dpo"] == 6


def test_reference_is_the_untouched_base_model(tmp_path):
    """After training, reference log-probs (adapters disabled) equal a freshly built base model's."""
    module, _ = _fit(tmp_path, Single("dpo"), 4)
    data = demo_data()
    data.setup()
    batch = next(iter(data.val_dataloader()[1]))
    base = build_causal_lm(None, dict(TINY_LLAMA)).eval()
    from xright_pl.objectives.losses import sequence_logps

    with torch.no_grad():
        expected = sequence_logps(
            base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels
        )
        policy = sequence_logps(module.forward_logits(batch.input_ids, batch.attention_mask), batch.labels)
    ref = module.reference_logps(batch)
    torch.testing.assert_close(ref, expected.logps, rtol=0, atol=1e-5)
    assert not torch.allclose(policy.logps, expected.logps, atol=1e-4)  # the policy did move
    assert module.policy.training  # reference_mode restored the training mode


def test_sequential_stage_start_folds_stage_one_into_the_base(tmp_path):
    """At the switch the adapters' update moves into the base weights: the stage-two reference (adapters
    disabled) is the stage-one result, and stage two trains on top of it."""
    switch = 3
    snap = {}

    class Spy(Sequential):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == switch:  # before the switch step runs: the stage-one policy
                snap["policy"] = {k: v.clone() for k, v in pl_module.policy.state_dict().items()}
                snap["hash"] = weights_sha256(pl_module.policy)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == switch + 1:
                snap["after_switch"] = pl_module.policy.state_dict()

    module, before = _fit(tmp_path, Spy(first="sft", switch_step=switch, reference="stage_start"), switch + 2)
    assert module.steps == {"sft": switch, "dpo": 2}
    assert not module.reference_is_initial
    stage1 = snap["policy"]
    # The stage-one update is in the base weights now (q_proj/v_proj base weights differ from the start) ...
    bases = [k for k in before if k.endswith(("q_proj.base_layer.weight", "v_proj.base_layer.weight"))]
    assert bases and all(not torch.equal(module.policy.state_dict()[k], before[k]) for k in bases)
    # ... and it equals base + (alpha/r) B A of the stage-one adapters.
    k = bases[0]
    prefix = k.removesuffix("base_layer.weight")
    delta = stage1[prefix + "lora_B.default.weight"] @ stage1[prefix + "lora_A.default.weight"] * (QV.alpha / QV.r)
    torch.testing.assert_close(module.policy.state_dict()[k], stage1[k] + delta, rtol=0, atol=1e-6)


def test_bad_target_modules_name_the_model_layers():
    need_extra("peft")
    module = tiny_module(lora=LoraSettings(r=4, target_modules=["query_key_value"]))
    with pytest.raises(ConfigError, match=r"q_proj"):
        module.configure_model()


def test_invalid_settings_are_collected():
    with pytest.raises(ConfigError, match=r"lora.r must be .*\n.*lora.dropout"):
        tiny_module(lora=LoraSettings(r=0, dropout=1.5))
