"""The fused, response-only log-prob path (:mod:`xright_pl.objectives.fused`) against the full logits: the same losses
and parameter gradients (1e-5 relative in fp32) on tiny Llama (tied), GPT-NeoX (untied), a head with a bias and LoRA;
bf16 within its precision; the head runs on scored positions only and autograd keeps no vocabulary-sized
activation; models without a separable head fall back, with a note; training through the module is unchanged."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import TINY_LLAMA, demo_data, need_extra, tiny_module, trainer
from torch import nn

from xright_pl import Mix
from xright_pl.core.types import IGNORE_INDEX
from xright_pl.models.build import build_causal_lm
from xright_pl.objectives.fused import default_chunk_size, fused_head_problem, head_token_logps, model_token_logps
from xright_pl.objectives.losses import sequence_logps_from_token_logps, sft_loss_from_token_logps

V = 144  # a vocabulary size no other dimension of the tiny models has
LLAMA_TIED = {**TINY_LLAMA, "vocab_size": V, "tie_word_embeddings": True}
NEOX = {
    "model_type": "gpt_neox",
    "vocab_size": V,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def batch(n: int = 4, t: int = 14, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows with prompts of 3..6 tokens (not scored), right padding on two rows, one row with no scored token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, t), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for i in range(n):
        labels[i, : 3 + i % 4] = IGNORE_INDEX
    mask[1, 10:] = 0
    labels[1, 10:] = IGNORE_INDEX
    mask[2, 12:] = 0
    labels[2, 12:] = IGNORE_INDEX
    labels[3] = IGNORE_INDEX
    return ids, mask, labels


def losses_and_grads(model: nn.Module, fused: bool, chunk_size: int | None = None, dtype=torch.float32):
    """SFT token-mean NLL + summed sequence log-probs (the DPO input), backpropagated together."""
    ids, mask, labels = batch()
    model.zero_grad(set_to_none=True)
    tok, scored = model_token_logps(model, ids, mask, labels, fused=fused, chunk_size=chunk_size)
    sft, count = sft_loss_from_token_logps(tok, scored)
    seq = sequence_logps_from_token_logps(tok, scored)
    (sft + 0.1 * seq.logps.sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return tok.detach(), sft.detach(), seq.logps.detach(), grads


def assert_same(a, b, rtol: float) -> None:
    """Every tensor of ``a`` equals ``b`` within ``rtol`` of ``b``'s largest magnitude (1 for an all-zero tensor)."""
    tok_a, sft_a, seq_a, grads_a = a
    tok_b, sft_b, seq_b, grads_b = b
    assert set(grads_a) == set(grads_b)
    pairs = [("token_logps", tok_a, tok_b), ("sft", sft_a, sft_b), ("seq", seq_a, seq_b)]
    pairs += [(n, grads_a[n], grads_b[n]) for n in grads_b]
    for name, x, y in pairs:
        assert x is not None and y is not None, name
        scale = float(y.abs().max().clamp(min=1e-30)) if y.abs().max() > 0 else 1.0
        err = float((x.float() - y.float()).abs().max())
        assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol:g} x {scale:.3g}"


def llama_with_bias_head() -> nn.Module:
    model = build_causal_lm(None, dict(TINY_LLAMA))
    head = nn.Linear(32, TINY_LLAMA["vocab_size"], bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_(0, 1.0)
    model.lm_head = head
    return model


MODELS = {
    "llama_tied": lambda: build_causal_lm(None, LLAMA_TIED),
    "gpt_neox_untied": lambda: build_causal_lm(None, NEOX),
    "llama_bias_head": llama_with_bias_head,
}


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_equals_full_logits_fp32(name, chunk_size):
    """Losses, token log-probs and every parameter gradient within 1e-5 relative, one chunk or many."""
    model = MODELS[name]()
    assert fused_head_problem(model) is None
    assert_same(losses_and_grads(model, True, chunk_size), losses_and_grads(model, False), rtol=1e-5)


def test_tied_head_gets_both_gradients():
    """Tied embeddings: the one weight's gradient holds the head's and the embedding's parts, as unfused."""
    model = build_causal_lm(None, LLAMA_TIED)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    grads = losses_and_grads(model, True, 5)[3]
    full = losses_and_grads(model, False)[3]
    assert "model.embed_tokens.weight" in grads and "lm_head.weight" not in grads  # one shared parameter
    torch.testing.assert_close(
        grads["model.embed_tokens.weight"], full["model.embed_tokens.weight"], rtol=1e-5, atol=1e-7
    )


def test_fused_equals_full_logits_lora_with_adapters_on_and_off():
    """LoRA (adapters with a non-zero update, the head trained in full): the policy's gradients match; with the
    adapters disabled (the reference) the log-probs match the base model's."""
    need_extra("peft")
    from xright_pl.models.lora import LoraSettings, apply_lora, reference_mode

    model = apply_lora(build_causal_lm(None, dict(TINY_LLAMA)), LoraSettings(r=4, modules_to_save=["lm_head"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    assert fused_head_problem(model) is None
    assert_same(losses_and_grads(model, True, 4), losses_and_grads(model, False), rtol=1e-5)
    ids, mask, labels = batch()
    with reference_mode(model) as base:
        off = model_token_logps(base, ids, mask, labels, fused=True, chunk_size=4)[0]
        full = model_token_logps(base, ids, mask, labels, fused=False)[0]
    with torch.no_grad():
        on = model_token_logps(model, ids, mask, labels, fused=True)[0]
    torch.testing.assert_close(off, full, rtol=1e-5, atol=1e-6)
    plain = build_causal_lm(None, dict(TINY_LLAMA)).eval()
    with torch.no_grad():
        expected = model_token_logps(plain, ids, mask, labels, fused=False)[0]
    torch.testing.assert_close(off, expected, rtol=1e-5, atol=1e-6)  # adapters off: the base model
    assert not torch.allclose(on, expected, atol=1e-3)


def test_bf16_weights_and_bf16_autocast_within_bf16_precision():
    """bf16 weights, and fp32 weights under bf16 autocast (bf16-mixed): the fused log-probs and gradients agree
    with the full logits to bf16's precision (logits rounded to 8 bits of mantissa either way)."""
    model = build_causal_lm(None, NEOX).to(torch.bfloat16)
    assert fused_head_problem(model) is None
    assert_same(losses_and_grads(model, True, 4), losses_and_grads(model, False), rtol=3e-2)
    model = build_causal_lm(None, LLAMA_TIED)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, full = losses_and_grads(model, True, 4), losses_and_grads(model, False)
    assert_same(fused, full, rtol=3e-2)
    assert fused[0].dtype == torch.float32  # log-probs in fp32 from bf16 logits


def test_head_runs_on_scored_positions_only():
    """The head sees one position per row (the model's own ``logits_to_keep=1``), then exactly the scored
    positions, in chunks; with the option off it sees every position."""
    model = build_causal_lm(None, NEOX)
    ids, mask, labels = batch()
    scored = int((labels[:, 1:] != IGNORE_INDEX).sum())
    rows: list[int] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: rows.append(a[0].shape[:-1].numel()))
    with torch.no_grad():
        model_token_logps(model, ids, mask, labels, fused=True, chunk_size=7)
        assert rows == [ids.shape[0]] + [7] * (scored // 7) + ([scored % 7] if scored % 7 else [])
        rows.clear()
        model_token_logps(model, ids, mask, labels, fused=False)
    handle.remove()
    assert rows == [ids.numel()]
    assert scored < ids.numel() // 2 + 10  # the batch has prompts and padding to skip


@pytest.mark.parametrize("module_path", [False, True])
def test_autograd_keeps_no_vocabulary_sized_activation(module_path):
    """No activation autograd saves for the backward has a dimension of size V, on the one-buffer path of a plain
    ``nn.Linear`` head and on the module path (checkpointed chunks; forced by a hook on the head); the full path
    saves the ``[N, T, V]`` logits (the control). Weights (and views of them) are not counted."""
    model = build_causal_lm(None, NEOX)
    if module_path:
        model.get_output_embeddings().register_forward_hook(lambda m, a, out: None)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids, mask, labels = batch()

    def saved_shapes(fused: bool) -> list[tuple[int, ...]]:
        shapes = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            tok, _ = model_token_logps(model, ids, mask, labels, fused=fused, chunk_size=5)
        tok.sum().backward()
        return shapes

    assert any(V in s for s in saved_shapes(False))
    assert not [s for s in saved_shapes(True) if V in s]


def test_plain_linear_heads_take_the_one_buffer_path_and_others_the_module_path():
    """Which path a head takes, and that both give the same gradients (1e-5 relative): GPT-NeoX's untied
    ``embed_out`` and the head with a bias, each with and without a hook on the head (the module path)."""
    need_extra("peft")
    from xright_pl.models.lora import LoraSettings, apply_lora
    from xright_pl.objectives.fused import _plain_linear

    assert _plain_linear(nn.Linear(4, 6)) and _plain_linear(nn.Linear(4, 6, bias=False))
    hooked = nn.Linear(4, 6)
    hooked.register_forward_pre_hook(lambda m, a: None)
    assert not _plain_linear(hooked) and not _plain_linear(type("Sub", (nn.Linear,), {})(4, 6))
    lora = apply_lora(build_causal_lm(None, dict(TINY_LLAMA)), LoraSettings(r=2, modules_to_save=["lm_head"]))
    assert not _plain_linear(lora.get_output_embeddings())
    for build in (lambda: build_causal_lm(None, NEOX), llama_with_bias_head):
        model = build()
        fast = losses_and_grads(model, True, 5)
        model.get_output_embeddings().register_forward_hook(lambda m, a, out: None)
        assert_same(fast, losses_and_grads(model, True, 5), rtol=1e-5)


def test_no_scored_token_gives_zero_loss_and_zero_gradients():
    """A batch without a scored token: loss 0, every parameter in the graph with a zero gradient (as unfused)."""
    model = build_causal_lm(None, NEOX)
    ids, mask, labels = batch()
    labels[:] = IGNORE_INDEX
    tok, scored = model_token_logps(model, ids, mask, labels, fused=True)
    loss, count = sft_loss_from_token_logps(tok, scored)
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(count) == 0 and tok.shape == (4, 13)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and all(float(g.abs().max()) == 0.0 for g in grads)
    assert head_token_logps(
        model.get_output_embeddings(), torch.zeros(0, 32), torch.zeros(0, dtype=torch.long)
    ).shape == (0,)


def test_default_chunk_size():
    assert default_chunk_size(49_152) == 341 and default_chunk_size(128_256) == 130
    assert default_chunk_size(144) == 4096 and default_chunk_size(10**9) == 1


class ScaledLogits(nn.Module):
    """A causal LM whose logits are twice the head's output: not separable, the fused path must not be used."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = build_causal_lm(None, dict(TINY_LLAMA))
        self.config = self.inner.config

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=0):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep)
        out.logits = out.logits * 2
        return out


class NoLogitsToKeep(ScaledLogits):
    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_models_without_a_separable_head_are_found():
    assert "soft-capping" in fused_head_problem(ScaledLogits())
    assert "logits_to_keep" in fused_head_problem(NoLogitsToKeep())
    assert "get_decoder" in fused_head_problem(nn.Linear(2, 2))


def test_module_falls_back_with_a_note_and_keeps_its_numbers(caplog):
    """The module probes its policy once: a non-separable head logs one line and uses the full logits."""
    module = tiny_module()
    module.configure_model()
    module.policy = ScaledLogits()
    ids, mask, labels = batch()
    labels = labels.clamp(max=TINY_LLAMA["vocab_size"] - 1)
    with caplog.at_level(logging.WARNING, logger="xright_pl.training.module"):
        tok, _ = module.policy_token_logps(ids, mask, labels)
        module.policy_token_logps(ids, mask, labels)
    notes = [r.getMessage() for r in caplog.records if "fused log-probs off" in r.getMessage()]
    assert len(notes) == 1 and "policy" in notes[0]
    expected, _ = model_token_logps(module.policy, ids, mask, labels, fused=False)
    torch.testing.assert_close(tok, expected)


def test_training_with_and_without_fusion_gives_the_same_weights(tmp_path):
    """Through the Trainer: Mix (an SFT and a DPO backward each step, live reference), 2 micro-batches per step,
    3 steps of SGD: the fused default and ``fused_logps=False`` end with the same weights (1e-5 relative), and the
    fused run probed its policy and reference once each."""
    weights = {}
    for fused in (True, False):
        module = tiny_module(
            Mix(), fused_logps=fused, accumulate_grad_batches=2, optimizer=lambda p: torch.optim.SGD(p, lr=0.05)
        )
        trainer(tmp_path / str(fused), 3, limit_val_batches=0).fit(module, datamodule=demo_data(limit=32))
        weights[fused] = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
        assert module._fused == ({"policy": True, "reference": True} if fused else {})
    for name, w in weights[False].items():
        torch.testing.assert_close(weights[True][name], w, rtol=1e-5, atol=1e-6)
    start = build_causal_lm(None, dict(TINY_LLAMA))
    assert not torch.equal(start.lm_head.weight, weights[True]["lm_head.weight"])  # training moved the head
