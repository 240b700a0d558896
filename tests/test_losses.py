"""Tests for :mod:`xright_pl.losses`.

Each test derives its expected value in its docstring, with the tolerance it uses.
"""

from __future__ import annotations

import math

import pytest
import torch

from xright_pl.losses import (
    dpo_loss,
    dpo_metrics,
    sequence_logps,
    sft_loss,
    sft_loss_from_token_logps,
    token_logps,
)
from xright_pl.types import IGNORE_INDEX

LN2 = math.log(2.0)


def _naive_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: full ``log_softmax`` in fp32 (fp64 stays fp64), then ``gather``."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    lp = torch.log_softmax(logits[:, :-1].to(dtype), dim=-1)
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    picked = lp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked)), mask


def _random_case(n=3, t=7, v=11, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, t, v, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[0, :3] = IGNORE_INDEX  # prompt
    labels[1, -2:] = IGNORE_INDEX  # padding
    if n > 2 and t > 4:
        labels[2, 4] = IGNORE_INDEX  # a hole in the middle
    return logits, labels


# ---------------------------------------------------------------------------------------------- token_logps


def test_token_logps_hand_built():
    """V = 3, N = 1, T = 4, labels = [IGNORE, 2, IGNORE, 1].

    Position t scores labels[t + 1]:
      * t = 0: logits [0, ln 2, ln 3] -> exp = [1, 2, 3], sum 6 -> logp(2) = ln(3/6) = -ln 2.
      * t = 1: label IGNORE -> 0.0, mask False (logits irrelevant).
      * t = 2: logits [ln 3, 0, 0] -> exp = [3, 1, 1], sum 5 -> logp(1) = ln(1/5) = -ln 5.
      * t = 3: last position, scores nothing; its huge logits must not leak in.
    labels[0] is never scored. Expected [[-ln 2, 0, -ln 5]], mask [[T, F, T]]; atol 1e-6 in fp32.
    """
    logits = torch.tensor([[[0.0, LN2, math.log(3)], [5.0, -5.0, 1.0], [math.log(3), 0.0, 0.0], [1e4, -1e4, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX, 1]])
    lp, mask = token_logps(logits, labels)
    assert lp.shape == (1, 3) and lp.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.tolist() == [[True, False, True]]
    torch.testing.assert_close(lp, torch.tensor([[-LN2, 0.0, -math.log(5)]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_token_logps_matches_reference_fp32(chunk_size):
    """Random fp32 logits (scale 3), N=3, T=7, V=11, with prompt, padding and hole masks.

    Expected: ``log_softmax(logits[:, :-1]).gather(labels[:, 1:])``, zero where ignored; the two compute
    the same fp32 quantities in a different order, so atol = rtol = 1e-5. Chunk sizes 1 and 4 (not dividing
    N*T = 21) check the chunk boundaries.
    """
    logits, labels = _random_case()
    lp, mask = token_logps(logits, labels, chunk_size=chunk_size)
    ref, ref_mask = _naive_token_logps(logits, labels)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)
    assert torch.all(lp[~mask] == 0)


def test_token_logps_matches_reference_bf16():
    """bf16 logits are upcast chunk-wise to fp32, so the output is fp32 and equals the fp32 reference
    computed on the same bf16 values (``logits.float()``) to atol = rtol = 1e-5.

    Against a reference computed entirely in bf16 the difference is bounded by bf16 resolution: log-probs
    here are of order 10, bf16 has 8 mantissa bits -> relative error ~ 2**-8 = 0.0039, so atol 0.1 is used.
    """
    logits, labels = _random_case(dtype=torch.bfloat16)
    lp, mask = token_logps(logits, labels, chunk_size=5)
    assert lp.dtype == torch.float32
    ref, _ = _naive_token_logps(logits, labels)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)
    lp_bf16 = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])
    lp_bf16 = torch.where(mask, lp_bf16.squeeze(-1).float(), 0.0)
    torch.testing.assert_close(lp, lp_bf16, atol=0.1, rtol=0)


def test_token_logps_gradcheck_fp64():
    """``torch.autograd.gradcheck`` in fp64 (default eps 1e-6, atol 1e-5, rtol 1e-3) on N=2, T=4, V=5 with
    masked positions, chunk size 3 so chunks straddle rows; fp64 stays fp64 inside, so the analytic
    ``g * (onehot - softmax)`` must match finite differences.
    """
    logits, labels = _random_case(n=2, t=4, v=5, dtype=torch.float64, seed=1)
    labels[0, 1:] = torch.tensor([IGNORE_INDEX, 3, 0])
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: token_logps(x, labels, chunk_size=3)[0], (logits,))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float64, 1e-12)])
def test_token_logps_grad_matches_naive(dtype, tol):
    """Gradient of ``sum(w * logps)`` (random weights w) vs autograd through the naive reference.

    Both compute ``w * (onehot - softmax)`` per position in fp32 (fp64 for fp64); the result is rounded to
    the logits' dtype, so the tolerance is that dtype's resolution on entries of magnitude <= ~3 (|w| ~ 1):
    fp32 1e-6, bf16 1e-2 (2**-8 * 3 ~ 0.012 worst case, rounding both sides the same way), fp64 1e-12.
    Masked positions and the last position get an exactly zero gradient.
    """
    logits, labels = _random_case(dtype=dtype, seed=2)
    w = torch.randn(labels.shape[0], labels.shape[1] - 1, generator=torch.Generator().manual_seed(3))
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    lp, mask = token_logps(x1, labels, chunk_size=4)
    (lp * w.to(lp.dtype)).sum().backward()
    ref, _ = _naive_token_logps(x2, labels)
    (ref * w.to(ref.dtype)).sum().backward()
    assert x1.grad.dtype == dtype
    torch.testing.assert_close(x1.grad, x2.grad, atol=tol, rtol=tol)
    assert torch.all(x1.grad[:, -1] == 0)
    assert torch.all(x1.grad[:, :-1][~mask] == 0)


def test_token_logps_non_contiguous_logits():
    """A transposed (non-contiguous) logits tensor gives the same values as its contiguous copy
    (the flatten copies once); atol 1e-6 in fp32.
    """
    logits, labels = _random_case()
    nc = logits.transpose(0, 1).contiguous().transpose(0, 1)
    assert not nc.is_contiguous()
    torch.testing.assert_close(token_logps(nc, labels)[0], token_logps(logits, labels)[0], atol=1e-6, rtol=0)


def test_token_logps_saves_no_fp32_copy_of_logits():
    """With bf16 logits [N, T, V] = [4, 9, 13], record every tensor autograd saves during the forward.

    None may be a float32 tensor with >= N*(T-1)*V elements (an upcast copy of the logits): the saved
    tensors must be the bf16 logits themselves (same storage, no copy), int64 labels, a bool mask and the
    [N*T] fp32 log-sum-exp.
    """
    n, t, v = 4, 9, 13
    logits, labels = _random_case(n=n, t=t, v=v, dtype=torch.bfloat16)
    logits.requires_grad_(True)
    saved: list[torch.Tensor] = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        lp, _ = token_logps(logits, labels, chunk_size=8)
    assert saved, "saved_tensors_hooks saw nothing"
    big_fp32 = [x for x in saved if x.dtype == torch.float32 and x.numel() >= n * (t - 1) * v]
    assert big_fp32 == []
    full = [x for x in saved if x.numel() == n * t * v]
    assert len(full) == 1 and full[0].dtype == torch.bfloat16
    assert full[0].untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    lp.sum().backward()  # still differentiable after the hooks
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


# ------------------------------------------------------------------------------------------- sequence_logps


def test_sequence_logps_sums_and_all_masked_row():
    """Row sums of the reference token log-probs (atol 1e-5), ``num_tokens`` = count of
    ``labels[:, 1:] != IGNORE``; row 1 is fully masked -> logps exactly 0, num_tokens 0, no NaN, and its
    logits' gradient is exactly 0.
    """
    logits, labels = _random_case()
    labels[1] = IGNORE_INDEX
    logits.requires_grad_(True)
    out = sequence_logps(logits, labels)
    ref, ref_mask = _naive_token_logps(logits.detach(), labels)
    torch.testing.assert_close(out.logps.detach(), ref.sum(-1), atol=1e-5, rtol=1e-5)
    assert out.num_tokens.dtype == torch.long
    assert out.num_tokens.tolist() == ref_mask.sum(-1).tolist()
    assert out.logps[1].item() == 0.0 and out.num_tokens[1].item() == 0
    assert torch.isfinite(out.logps).all()
    out.logps.sum().backward()
    assert torch.all(logits.grad[1] == 0)


# ------------------------------------------------------------------------------------------------ sft_loss


def test_sft_loss_hand_worked():
    """Same hand-built logits as ``test_token_logps_hand_built`` plus a second row.

    Row 0 scored tokens: -ln 2 and -ln 5 (2 tokens). Row 1: V = 3, uniform logits (all 0) at every
    position, labels [IGNORE, 0, 1, 2] -> three scored tokens of logp ln(1/3) = -ln 3 each.
    Token-mean NLL = (ln 2 + ln 5 + 3 ln 3) / 5 = ln(270) / 5 = 5.598421958998375 / 5 = 1.119684391799675.
    A mean of per-row means would instead give (ln 10 / 2 + ln 3) / 2 = 1.1249524175825663, 5e-3 away,
    so atol 1e-6 tells them apart. Count = 5.
    """
    row0 = [[0.0, LN2, math.log(3)], [5.0, -5.0, 1.0], [math.log(3), 0.0, 0.0], [1e4, -1e4, 0.0]]
    row1 = [[0.0, 0.0, 0.0]] * 4
    logits = torch.tensor([row0, row1])
    labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX, 1], [IGNORE_INDEX, 0, 1, 2]])
    loss, count = sft_loss(logits, labels)
    expected = (LN2 + math.log(5) + 3 * math.log(3)) / 5
    assert math.isclose(expected, 1.119684391799675, rel_tol=1e-12)
    assert count.dtype == torch.long and count.item() == 5
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_batch_loss_units_count_what_the_losses_average_over():
    """``SFTBatch.loss_units`` (counted on the host to weigh micro-batches) equals ``sft_loss``'s count: the
    first label of a row is never scored (nothing predicts it). ``PreferenceBatch.loss_units`` = pairs."""
    from xright_pl.types import PreferenceBatch, SFTBatch

    labels = torch.tensor([[5, 2, IGNORE_INDEX, 1], [IGNORE_INDEX, 0, 1, 2]])
    batch = SFTBatch(input_ids=labels.clamp(min=0), attention_mask=torch.ones_like(labels), labels=labels)
    _, count = sft_loss(torch.zeros(2, 4, 6), labels)
    assert batch.loss_units().item() == count.item() == 5
    pairs = PreferenceBatch(input_ids=torch.zeros(6, 3, dtype=torch.long), attention_mask=None, labels=None)
    assert pairs.loss_units().item() == 3


def test_sft_loss_all_masked_is_zero_with_zero_grad():
    """All labels IGNORE -> count 0, loss = 0 / max(0, 1) = 0.0 exactly (not NaN), still attached to the
    graph so ``backward`` runs, and every gradient entry is exactly 0.
    """
    logits, labels = _random_case()
    labels[:] = IGNORE_INDEX
    logits.requires_grad_(True)
    loss, count = sft_loss(logits, labels)
    assert count.item() == 0
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad == 0)


def test_sft_loss_from_token_logps_ignores_unmasked_garbage():
    """token logps [[-1, 999], [-3, 5]] with mask [[T, F], [T, F]]: only -1 and -3 count,
    loss = (1 + 3) / 2 = 2.0 exactly, count 2.
    """
    tok = torch.tensor([[-1.0, 999.0], [-3.0, 5.0]])
    mask = torch.tensor([[True, False], [True, False]])
    loss, count = sft_loss_from_token_logps(tok, mask)
    assert loss.item() == 2.0 and count.item() == 2


# ------------------------------------------------------------------------------------------------ dpo_loss


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_dpo_loss_hand_worked():
    """beta = 0.1, pc = -1, pr = -3, rc = -2, rr = -2.

    chosen log-ratio pc - rc = -1 - (-2) = 1; rejected log-ratio pr - rr = -3 - (-2) = -1.
    z = beta * (1 - (-1)) = 0.2; sigmoid(0.2) = 1 / (1 + e^-0.2) = 1 / 1.8187307530779818.
    loss = -ln sigmoid(0.2) = ln(1.8187307530779818) = 0.5981388693815918.
    chosen reward = 0.1 * 1 = 0.1, rejected reward = 0.1 * -1 = -0.1.
    In fp64, atol 1e-12.
    """
    out = dpo_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), beta=0.1)
    assert out.losses.shape == (1,)
    assert out.losses.item() == pytest.approx(0.5981388693815918, abs=1e-12)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.1, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-0.1, abs=1e-12)


def test_dpo_loss_ln2_cases():
    """-ln sigmoid(0) = ln 2 = 0.6931471805599453 whenever the margin z is 0 (atol 1e-12 in fp64):

    * policy == reference: both log-ratios 0 -> z = 0;
    * chosen == rejected logps (for both models): log-ratios equal -> z = 0;
    * beta = 1e-12 with a margin of 2: z = 2e-12, loss = ln 2 - z/2 + O(z^2) = ln 2 - 1e-12, within 1e-11.
    """
    pc, pr = _t(-5.0, -2.0, -7.5), _t(-4.0, -9.0, -1.0)
    out = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.5)
    torch.testing.assert_close(out.losses, torch.full((3,), LN2, dtype=torch.float64), atol=1e-12, rtol=0)
    same = _t(-3.0, -6.0)
    out = dpo_loss(same, same.clone(), _t(-1.0, -2.0), _t(-1.0, -2.0), beta=2.0)
    torch.testing.assert_close(out.losses, torch.full((2,), LN2, dtype=torch.float64), atol=1e-12, rtol=0)
    out = dpo_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), beta=1e-12)
    assert out.losses.item() == pytest.approx(LN2, abs=1e-11)


def test_dpo_loss_large_margins_finite():
    """beta = 1, margins z = +1e4 and -1e4 in fp32.

    z = +1e4: loss = ln(1 + e^-1e4) ~ e^-1e4 -> 0 (finite, |loss| < 1e-6).
    z = -1e4: loss = ln(1 + e^1e4) ~ 1e4 (finite, rel tol 1e-6); a naive -log(sigmoid(z)) would give inf.
    Gradient w.r.t. pc: -sigmoid(-z) -> 0 and -1 respectively, finite.
    """
    pc = torch.tensor([1e4, -1e4], requires_grad=True)
    zeros = torch.zeros(2)
    out = dpo_loss(pc, zeros, zeros, zeros, beta=1.0)
    assert torch.isfinite(out.losses).all()
    assert abs(out.losses[0].item()) < 1e-6
    assert out.losses[1].item() == pytest.approx(1e4, rel=1e-6)
    out.losses.sum().backward()
    torch.testing.assert_close(pc.grad, torch.tensor([0.0, -1.0]), atol=1e-6, rtol=0)


def test_dpo_rewards_detached_and_loss_differentiable():
    """Rewards must be detached (``requires_grad`` False); the loss keeps the graph. d loss / d pc at z = 0.2
    is -beta * sigmoid(-0.2) = -0.1 * (1 - 1/1.8187307530779818) = -0.1 * 0.45016600268752216
    = -0.045016600268752216 (fp64, atol 1e-12); d loss / d pr = +0.045016600268752216.
    """
    pc, pr = _t(-1.0).requires_grad_(True), _t(-3.0).requires_grad_(True)
    out = dpo_loss(pc, pr, _t(-2.0), _t(-2.0), beta=0.1)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.045016600268752216, abs=1e-12)
    assert pr.grad.item() == pytest.approx(0.045016600268752216, abs=1e-12)


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf")])
def test_dpo_loss_rejects_bad_beta(beta):
    """beta must be a finite number > 0."""
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(_t(-1.0), _t(-1.0), _t(-1.0), _t(-1.0), beta=beta)


def test_dpo_metrics_by_hand():
    """beta = 0.5, two pairs.

    pair 0: pc = -1, pr = -4, rc = -2, rr = -3 -> r_w = 0.5 * 1 = 0.5, r_l = 0.5 * -1 = -0.5 (correct).
    pair 1: pc = -6, pr = -2, rc = -5, rr = -3 -> r_w = 0.5 * -1 = -0.5, r_l = 0.5 * 1 = 0.5 (wrong).
    rewards/chosen = (0.5 - 0.5) / 2 = 0; rewards/rejected = (-0.5 + 0.5) / 2 = 0;
    rewards/accuracies = 1/2 = 0.5; rewards/margins = ((0.5 + 0.5) + (-0.5 - 0.5)) / 2 = 0.
    Change pair 1's rc to -7: r_w = 0.5 * 1 = 0.5 -> accuracies: r_w 0.5 vs r_l 0.5 is a tie, not counted
    -> still 0.5; rewards/chosen = 0.5; margins = (1 + 0) / 2 = 0.5.
    logps/chosen = (-1 - 6) / 2 = -3.5; logps/rejected = (-4 - 2) / 2 = -3. All exact in fp64 (atol 1e-12),
    all detached.
    """
    pc = _t(-1.0, -6.0).requires_grad_(True)
    pr = _t(-4.0, -2.0).requires_grad_(True)
    out = dpo_loss(pc, pr, _t(-2.0, -5.0), _t(-3.0, -3.0), beta=0.5)
    m = dpo_metrics(out, pc, pr)
    expected = {
        "rewards/chosen": 0.0,
        "rewards/rejected": 0.0,
        "rewards/accuracies": 0.5,
        "rewards/margins": 0.0,
        "logps/chosen": -3.5,
        "logps/rejected": -3.0,
    }
    assert set(m) == set(expected)
    for k, v in expected.items():
        assert m[k].dim() == 0 and not m[k].requires_grad, k
        assert m[k].item() == pytest.approx(v, abs=1e-12), k

    out = dpo_loss(pc, pr, _t(-2.0, -7.0), _t(-3.0, -3.0), beta=0.5)
    m = dpo_metrics(out, pc, pr)
    assert m["rewards/accuracies"].item() == pytest.approx(0.5, abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(0.5, abs=1e-12)
    assert m["rewards/margins"].item() == pytest.approx(0.5, abs=1e-12)
