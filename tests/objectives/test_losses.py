"""Tests for :mod:`xright_pl.objectives.losses`.

Each test derives its expected value in its docstring, with the tolerance it uses.
"""

from __future__ import annotations

import math

import pytest
import torch

from xright_pl.core.types import IGNORE_INDEX
from xright_pl.objectives.losses import (
    dpo_loss,
    dpo_metrics,
    sequence_logps,
    sft_loss,
    sft_loss_from_token_logps,
    token_logps,
)

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
    from xright_pl.core.types import PreferenceBatch, SFTBatch

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


# -------------------------------------------------------------------------------------------- preference losses
#
# Notation of the docstrings: pc, pr / rc, rr the summed response log-probs of the chosen / rejected answer under
# the policy / reference, nc, nr their token counts, h = (pc - rc) - (pr - rr), z = beta * h, sp(x) = ln(1 + e^x)
# (so -log sigmoid(z) = sp(-z) and sp(z) - sp(-z) = z).

from xright_pl.objectives.losses import PREFERENCE_LOSSES, hinge_loss, ipo_loss, robust_loss, sigmoid_loss, simpo_loss  # noqa: E402


def _n(*xs):
    return torch.tensor(xs, dtype=torch.long)


def test_registry_names_and_uniform_signature():
    """The registry holds exactly the five losses; each takes the same arguments (reference-free ones accept None
    for ``rc``/``rr``) and returns per-pair ``losses`` [B] with detached [B] rewards."""
    assert list(PREFERENCE_LOSSES) == ["sigmoid", "ipo", "hinge", "robust", "simpo"]
    assert [k for k, v in PREFERENCE_LOSSES.items() if not v.needs_reference] == ["simpo"]
    pc = _t(-1.0, -4.0).requires_grad_(True)
    for name, spec in PREFERENCE_LOSSES.items():
        ref = (None, None) if not spec.needs_reference else (_t(-2.0, -3.0), _t(-2.0, -5.0))
        out = spec(pc, _t(-3.0, -2.0), *ref, 0.1, chosen_tokens=_n(2, 3), rejected_tokens=_n(4, 1),
                   label_smoothing=0.0, simpo_gamma=0.5)  # fmt: skip
        assert out.losses.shape == (2,) and out.losses.requires_grad, name
        assert out.chosen_rewards.shape == (2,) and not out.chosen_rewards.requires_grad, name
        assert not out.rejected_rewards.requires_grad, name


def test_sigmoid_without_smoothing_is_dpo_loss_bit_for_bit():
    """``sigmoid`` with eps = 0 (the default) returns exactly :func:`dpo_loss` (``torch.equal``, fp32 random log-probs,
    gradients too): the default training run cannot change."""
    g = torch.Generator().manual_seed(5)
    xs = [(-20 * torch.rand(16, generator=g)).requires_grad_(True) for _ in range(2)]
    rc, rr = -20 * torch.rand(16, generator=g), -20 * torch.rand(16, generator=g)
    a = dpo_loss(xs[0], xs[1], rc, rr, 0.1)
    ys = [x.detach().clone().requires_grad_(True) for x in xs]
    b = sigmoid_loss(ys[0], ys[1], rc, rr, 0.1, chosen_tokens=_n(*[3] * 16), rejected_tokens=_n(*[5] * 16))
    assert torch.equal(a.losses, b.losses)
    assert torch.equal(a.chosen_rewards, b.chosen_rewards) and torch.equal(a.rejected_rewards, b.rejected_rewards)
    a.losses.sum().backward()
    b.losses.sum().backward()
    assert torch.equal(xs[0].grad, ys[0].grad) and torch.equal(xs[1].grad, ys[1].grad)


def test_sigmoid_label_smoothing_hand_worked():
    """beta = 0.1, pc = -1, pr = -3, rc = rr = -2 -> h = 1 - (-1) = 2, z = 0.2 (as in ``test_dpo_loss_hand_worked``).

    Conservative DPO: L = (1 - eps) sp(-z) + eps sp(z) = sp(-z) + eps z.
    sp(-0.2) = ln(1 + e^-0.2) = 0.5981388693815918; eps = 0.1: L = 0.5981388693815918 + 0.02 = 0.6181388693815918.
    chosen == rejected log-ratios (z = 0): L = ln 2 whatever eps. eps = 0: plain sigmoid 0.5981388693815918.
    fp64, atol 1e-12. Rewards: 0.1 and -0.1 as for DPO.
    """
    out = sigmoid_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), 0.1, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.6181388693815918, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.1, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-0.1, abs=1e-12)
    out = sigmoid_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), 0.1, label_smoothing=0.0)
    assert out.losses.item() == pytest.approx(0.5981388693815918, abs=1e-12)
    out = sigmoid_loss(_t(-5.0), _t(-5.0), _t(-1.0), _t(-1.0), 3.0, label_smoothing=0.3)
    assert out.losses.item() == pytest.approx(LN2, abs=1e-12)


def test_robust_hand_worked():
    """Robust DPO: L = ((1 - eps) sp(-z) - eps sp(z)) / (1 - 2 eps) = sp(-z) - eps z / (1 - 2 eps).

    * z = 0.2 (beta 0.1, h 2), eps = 0.1: 0.5981388693815918 - 0.02 / 0.8 = 0.5731388693815918.
    * z = 10 (beta 1, h 10), eps = 0.25: sp(-10) - 2.5 / 0.5 = 4.5398899216870535e-05 - 5 = -4.999954601100783:
      unlike the conservative loss it goes below zero (the flipped-label term is subtracted).
    * eps = 0: plain sigmoid, 0.5981388693815918; z = 0: ln 2.
    fp64, atol 1e-12.
    """
    out = robust_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), 0.1, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.5731388693815918, abs=1e-12)
    out = robust_loss(_t(0.0), _t(-10.0), _t(0.0), _t(0.0), 1.0, label_smoothing=0.25)
    assert out.losses.item() == pytest.approx(-4.999954601100783, abs=1e-12)
    out = robust_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), 0.1, label_smoothing=0.0)
    assert out.losses.item() == pytest.approx(0.5981388693815918, abs=1e-12)
    out = robust_loss(_t(-7.0), _t(-7.0), _t(-2.0), _t(-2.0), 0.5, label_smoothing=0.4)
    assert out.losses.item() == pytest.approx(LN2, abs=1e-12)


def test_hinge_hand_worked():
    """Hinge: L = relu(1 - beta h).

    * beta = 0.1, h = 2: 1 - 0.2 = 0.8; d L / d pc = -beta = -0.1, d L / d pr = +0.1.
    * beta = 1, h = 2: relu(-1) = 0, gradient exactly 0 (the pair is past the margin).
    * chosen == rejected (h = 0): 1. beta = 1e-12, h = 2: 1 - 2e-12 (atol 1e-11).
    fp64, atol 1e-12.
    """
    pc, pr = _t(-1.0).requires_grad_(True), _t(-3.0).requires_grad_(True)
    out = hinge_loss(pc, pr, _t(-2.0), _t(-2.0), 0.1)
    assert out.losses.item() == pytest.approx(0.8, abs=1e-12)
    out.losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.1, abs=1e-12) and pr.grad.item() == pytest.approx(0.1, abs=1e-12)
    pc.grad = None
    out = hinge_loss(pc, pr, _t(-2.0), _t(-2.0), 1.0)
    assert out.losses.item() == 0.0
    out.losses.sum().backward()
    assert pc.grad.item() == 0.0
    assert hinge_loss(_t(-4.0), _t(-4.0), _t(-1.0), _t(-1.0), 0.1).losses.item() == pytest.approx(1.0, abs=1e-12)
    assert hinge_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), 1e-12).losses.item() == pytest.approx(1.0, abs=1e-11)


def test_ipo_hand_worked_length_normalised():
    """IPO with per-token log-ratios (TRL's convention): L = (h_avg - 1 / (2 beta))^2,
    h_avg = (pc - rc) / nc - (pr - rr) / nr.

    * beta = 0.1 (target 1 / 0.2 = 5), pc = -1, rc = -2 (ratio 1), nc = 2; pr = -3, rr = -2 (ratio -1), nr = 4:
      h_avg = 1/2 - (-1/4) = 0.75; L = (0.75 - 5)^2 = 4.25^2 = 18.0625 (exact in fp64).
      d L / d pc = 2 (h_avg - 5) / nc = 2 * (-4.25) / 2 = -4.25; d L / d pr = -2 (h_avg - 5) / nr = 8.5 / 4 = 2.125.
    * The same pair with summed log-ratios would give h = 2, L = (2 - 5)^2 = 9: the two conventions differ.
    * beta = 0.5 (target 1), ratios 0.5 and -0.5 with nc = nr = 1: h_avg = 1 -> L = 0 exactly.
    * chosen == rejected (h_avg = 0): L = 1 / (4 beta^2) = 25 at beta 0.1. IPO does not tend to ln 2 as beta -> 0:
      beta = 1e-3 gives 1 / (4e-6) = 250000 (rel 1e-12).
    * An empty response (0 tokens) is counted as 1 token: no division by zero.
    fp64, atol 1e-12.
    """
    pc, pr = _t(-1.0).requires_grad_(True), _t(-3.0).requires_grad_(True)
    out = ipo_loss(pc, pr, _t(-2.0), _t(-2.0), 0.1, chosen_tokens=_n(2), rejected_tokens=_n(4))
    assert out.losses.item() == pytest.approx(18.0625, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.1, abs=1e-12)  # summed log-ratio * beta, as DPO
    out.losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-4.25, abs=1e-12) and pr.grad.item() == pytest.approx(2.125, abs=1e-12)
    out = ipo_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), 0.1, chosen_tokens=_n(1), rejected_tokens=_n(1))
    assert out.losses.item() == pytest.approx(9.0, abs=1e-12)
    out = ipo_loss(_t(-1.5), _t(-2.5), _t(-2.0), _t(-2.0), 0.5, chosen_tokens=_n(1), rejected_tokens=_n(1))
    assert out.losses.item() == pytest.approx(0.0, abs=1e-12)
    same = dict(chosen_tokens=_n(3), rejected_tokens=_n(3))
    assert ipo_loss(_t(-4.0), _t(-4.0), _t(-1.0), _t(-1.0), 0.1, **same).losses.item() == pytest.approx(25.0, abs=1e-9)
    assert ipo_loss(_t(-4.0), _t(-4.0), _t(-1.0), _t(-1.0), 1e-3, **same).losses.item() == pytest.approx(
        250000.0, rel=1e-12
    )
    out = ipo_loss(_t(0.0), _t(-3.0), _t(0.0), _t(-2.0), 0.1, chosen_tokens=_n(0), rejected_tokens=_n(0))
    assert out.losses.item() == pytest.approx((0.0 - (-1.0) - 5.0) ** 2, abs=1e-12)  # (1 - 5)^2 = 16


def test_simpo_hand_worked():
    """SimPO: z = beta (pc / nc - pr / nr) - gamma, L = (1 - eps) sp(-z) + eps sp(z) = sp(-z) + eps z; no reference.

    * beta = 2, gamma = 0.5, pc = -2 over nc = 4 (mean -0.5), pr = -6 over nr = 3 (mean -2):
      z = 2 * 1.5 - 0.5 = 2.5, L = ln(1 + e^-2.5) = 0.07888973429254956;
      rewards = beta * means = -1 and -4 (TRL CPO's rewards); d L / d pc = -sigmoid(-2.5) * beta / nc
      = -0.07585818002124355 * 0.5 = -0.037929090010621775.
      eps = 0.2: L = 0.07888973429254956 + 0.2 * 2.5 = 0.5788897342925496.
    * Length normalisation: pc = pr = -4 with nc = 2, nr = 4 is not a tie: means -2 vs -1, z = 2 * (-1) - 0.5.
    * chosen == rejected means: z = -gamma, L = sp(gamma) = ln(1 + e^0.5) = 0.9740769841801067; gamma = 0: ln 2.
    * beta -> 0 (1e-12): z -> -gamma, L -> 0.9740769841801067 (atol 1e-11).
    fp64, atol 1e-12.
    """
    pc = _t(-2.0).requires_grad_(True)
    kw = dict(chosen_tokens=_n(4), rejected_tokens=_n(3), simpo_gamma=0.5)
    out = simpo_loss(pc, _t(-6.0), None, None, 2.0, **kw)
    assert out.losses.item() == pytest.approx(0.07888973429254956, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(-1.0, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-4.0, abs=1e-12)
    out.losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.037929090010621775, abs=1e-12)
    out = simpo_loss(_t(-2.0), _t(-6.0), None, None, 2.0, label_smoothing=0.2, **kw)
    assert out.losses.item() == pytest.approx(0.5788897342925496, abs=1e-12)
    out = simpo_loss(_t(-4.0), _t(-4.0), None, None, 2.0, chosen_tokens=_n(2), rejected_tokens=_n(4))
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(2.5)), abs=1e-12)
    out = simpo_loss(_t(-3.0), _t(-6.0), None, None, 2.0, chosen_tokens=_n(1), rejected_tokens=_n(2))
    assert out.losses.item() == pytest.approx(0.9740769841801067, abs=1e-12)
    out = simpo_loss(_t(-3.0), _t(-6.0), None, None, 2.0, chosen_tokens=_n(1), rejected_tokens=_n(2), simpo_gamma=0)
    assert out.losses.item() == pytest.approx(LN2, abs=1e-12)
    out = simpo_loss(_t(-1.0), _t(-9.0), None, None, 1e-12, **kw)
    assert out.losses.item() == pytest.approx(0.9740769841801067, abs=1e-11)


@pytest.mark.parametrize("name", list(PREFERENCE_LOSSES))
def test_preference_losses_reject_bad_arguments(name):
    """beta <= 0, label_smoothing outside [0, 0.5), missing token counts (ipo, simpo) or missing reference
    log-probs (all but simpo) are ValueErrors naming the argument."""
    spec = PREFERENCE_LOSSES[name]
    args = (_t(-1.0), _t(-2.0), _t(-1.0), _t(-1.0))
    kw = dict(chosen_tokens=_n(1), rejected_tokens=_n(1))
    with pytest.raises(ValueError, match="beta"):
        spec(*args, 0.0, **kw)
    with pytest.raises(ValueError, match="label_smoothing"):
        spec(*args, 0.1, label_smoothing=0.5, **kw)
    if name in ("ipo", "simpo"):
        with pytest.raises(ValueError, match="chosen_tokens"):
            spec(*args, 0.1)
    if spec.needs_reference:
        with pytest.raises(ValueError, match="ref_chosen_logps"):
            spec(args[0], args[1], None, None, 0.1, **kw)


# ---- parity with TRL's formulas
#
# Transcribed from TRL 1.16.0 (``pip download trl==1.16.0``, the version the ``benchmarks`` extra pins), so the
# test runs offline without TRL:
#   trl/trainer/dpo_trainer.py, ``DPOTrainer._compute_loss`` (lines 1383-1431), with ``delta_score = chosen_scores -
#   rejected_scores`` and ``chosen_scores = chosen_logps - ref_chosen_logps`` (f_divergence_type "reverse_kl"):
#       "sigmoid": per_sequence_loss = -F.logsigmoid(self.beta * delta_score)
#       "hinge":   per_sequence_loss = torch.relu(1 - self.beta * delta_score)
#       "ipo":     chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
#                  rejected_avg_score = rejected_scores / rejected_mask.sum(dim=1).clamp(min=1.0)
#                  ipo_delta = chosen_avg_score - rejected_avg_score
#                  per_sequence_loss = (ipo_delta - 1 / (2 * self.beta)) ** 2
#       "robust":  clean_loss_term = -(1 - self.label_smoothing) * F.logsigmoid(self.beta * delta_score)
#                  flipped_loss_term = -self.label_smoothing * F.logsigmoid(-self.beta * delta_score)
#                  per_sequence_loss = (clean_loss_term - flipped_loss_term) / (1 - 2 * self.label_smoothing)
#   trl/experimental/cpo/cpo_trainer.py, ``CPOTrainer.cpo_loss`` (lines 715-728, 746) and ``concatenated_forward``
#   (line 850: ``average_log_prob=self.loss_type in ["ipo", "simpo"]``, i.e. per-token mean log-probs):
#       "simpo":   gamma_logratios = self.simpo_gamma / self.beta; logits = logits - gamma_logratios
#                  losses = (-F.logsigmoid(self.beta * logits) * (1 - self.label_smoothing)
#                            - F.logsigmoid(-self.beta * logits) * self.label_smoothing)
#                  chosen_rewards = self.beta * (policy_chosen_logps...).detach()
#       "sigmoid": the same smoothed expression on ``logits`` (CPO's logits are policy-only; applied to the DPO
#                  log-ratio difference it is conservative DPO, which TRL 1.16's DPOTrainer no longer offers under
#                  "sigmoid": there ``label_smoothing`` only feeds "robust", "exo_pair" and "aot*").
import torch.nn.functional as F  # noqa: E402


def _trl_reference(loss_type, pc, pr, rc, rr, nc, nr, beta, eps, gamma):
    """TRL 1.16.0's per-pair losses, transcribed (see the comment above)."""
    if loss_type == "simpo":
        logits = pc / nc.clamp(min=1) - pr / nr.clamp(min=1)
        logits = logits - gamma / beta
        return -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    chosen_scores, rejected_scores = pc - rc, pr - rr
    delta_score = chosen_scores - rejected_scores
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta_score) * (1 - eps) - F.logsigmoid(-beta * delta_score) * eps
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta_score)
    if loss_type == "ipo":
        ipo_delta = chosen_scores / nc.clamp(min=1.0) - rejected_scores / nr.clamp(min=1.0)
        return (ipo_delta - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        clean = -(1 - eps) * F.logsigmoid(beta * delta_score)
        flipped = -eps * F.logsigmoid(-beta * delta_score)
        return (clean - flipped) / (1 - 2 * eps)
    raise AssertionError(loss_type)


def _random_pairs(seed=0, b=64, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(0, 40, (4, b), generator=g)
    logps = -(n.to(torch.float64) * 3 * torch.rand(4, b, generator=g, dtype=torch.float64))  # ~ -3 per token
    pc, pr, rc, rr = (x.to(dtype) for x in logps)
    return pc, pr, rc, rr, n[0], n[1]


@pytest.mark.parametrize("name", list(PREFERENCE_LOSSES))
@pytest.mark.parametrize(("beta", "eps"), [(0.1, 0.0), (0.5, 0.1), (2.0, 0.3)])
def test_parity_with_trl_formulas(name, beta, eps):
    """64 random pairs in fp32 (summed log-probs of up to 40 tokens, ~-3 per token, some empty responses), each
    loss vs the transcribed TRL 1.16.0 formula on the same inputs: atol 1e-6 (rtol 1e-6 for the squared IPO loss,
    whose values reach ~1e2). eps is not used by ipo/hinge (0 there, as the module enforces)."""
    pc, pr, rc, rr, nc, nr = _random_pairs(seed=int(beta * 10) + int(eps * 100))
    eps = eps if PREFERENCE_LOSSES[name].uses_label_smoothing else 0.0
    out = PREFERENCE_LOSSES[name](pc, pr, rc, rr, beta, chosen_tokens=nc, rejected_tokens=nr,
                                  label_smoothing=eps, simpo_gamma=0.7)  # fmt: skip
    ref = _trl_reference(name, pc, pr, rc, rr, nc.float(), nr.float(), beta, eps, 0.7)
    torch.testing.assert_close(out.losses, ref, atol=1e-6, rtol=1e-6)
    if name == "simpo":  # CPO: rewards = beta * mean log-probs
        torch.testing.assert_close(out.chosen_rewards, beta * pc / nc.clamp(min=1), atol=1e-6, rtol=1e-6)
    else:  # DPO (line 1582): chosen_rewards = self.beta * chosen_logratios.detach()
        torch.testing.assert_close(out.chosen_rewards, beta * (pc - rc), atol=1e-6, rtol=1e-6)


def _trl_or_skip():
    trl = pytest.importorskip("trl", reason="needs trl, from the optional extra 'benchmarks'")
    return trl


@pytest.mark.parametrize("name", ["sigmoid", "hinge", "ipo", "robust"])
def test_parity_with_trl_dpo_trainer_itself(name):
    """With TRL installed: TRL's own ``DPOTrainer._compute_loss`` on the same per-token log-probs.

    TRL >= 1.x has no standalone ``DPOTrainer.dpo_loss`` (the loss is computed inline in ``_compute_loss`` from
    the model's output), so the method is called unbound on a stand-in trainer (``beta``, ``loss_types``, an
    identity ``accelerator``, ...) with a stand-in model whose output carries the given per-token ``log_probs``
    and ``precompute_ref_logps`` on (reference log-probs from the inputs). Compared: TRL's batch loss (the mean)
    with ours, atol 1e-5 in fp32. Written against TRL 1.16.0's ``_compute_loss``; skipped when TRL is absent or
    its ``_compute_loss`` has another signature.
    """
    import inspect
    from collections import defaultdict
    from types import SimpleNamespace

    _trl_or_skip()
    from trl import DPOTrainer

    method = getattr(DPOTrainer, "_compute_loss", None)
    if method is None or list(inspect.signature(method).parameters) != ["self", "model", "inputs", "return_outputs"]:
        pytest.skip("this TRL's DPOTrainer has no _compute_loss(model, inputs, return_outputs) to call")
    g = torch.Generator().manual_seed(11)
    b, t = 8, 12
    completion = torch.zeros(2 * b, t, dtype=torch.long)
    for i in range(2 * b):
        start = int(torch.randint(2, 6, (1,), generator=g))
        stop = int(torch.randint(start, t + 1, (1,), generator=g))
        completion[i, start:stop] = 1
    shift = completion[:, 1:]
    per_token = torch.where(shift.bool(), -3 * torch.rand(2 * b, t - 1, generator=g), 0.0)
    ref_logps = -20 * torch.rand(2 * b, generator=g)

    class StandInModel:
        training = True

        def __call__(self, **kwargs):
            zeros = torch.zeros(2 * b, t - 1)
            return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    beta, eps = 0.2, (0.1 if name in ("robust",) else 0.0)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    stand_in = SimpleNamespace(
        model=StandInModel(), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[name], loss_weights=[1.0],
        beta=beta, label_smoothing=eps, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(2 * b, t, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, t, dtype=torch.long),
        "completion_mask": completion,
        "ref_chosen_logps": ref_logps[:b],
        "ref_rejected_logps": ref_logps[b:],
    }
    trl_loss = method(stand_in, stand_in.model, inputs, False)
    logps, n = per_token.sum(1), shift.sum(1)
    ours = PREFERENCE_LOSSES[name](logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], beta,
                                   chosen_tokens=n[:b], rejected_tokens=n[b:], label_smoothing=eps)  # fmt: skip
    assert float(trl_loss) == pytest.approx(float(ours.losses.mean()), abs=1e-5)
    assert stand_in._metrics["train"]["rewards/chosen"][0] == pytest.approx(float(ours.chosen_rewards.mean()), abs=1e-5)


@pytest.mark.parametrize(("name", "eps"), [("simpo", 0.0), ("simpo", 0.2), ("sigmoid", 0.15)])
def test_parity_with_trl_cpo_loss_itself(name, eps):
    """With TRL installed: TRL's own ``CPOTrainer.cpo_loss`` (``trl.experimental.cpo``), called unbound on a
    stand-in trainer. simpo: fed the per-token mean log-probs (what its ``concatenated_forward`` passes for
    simpo); sigmoid with label smoothing: fed the log-ratios ``pc - rc``, ``pr - rr``, which turns CPO's smoothed
    sigmoid into conservative DPO. Losses and (simpo) rewards agree to atol 1e-6 in fp32."""
    from types import SimpleNamespace

    _trl_or_skip()
    try:
        from trl.experimental.cpo import CPOTrainer
    except ImportError:
        pytest.skip("this TRL has no trl.experimental.cpo.CPOTrainer")
    pc, pr, rc, rr, nc, nr = _random_pairs(seed=3)
    beta, gamma = 0.7, 0.4
    stand_in = SimpleNamespace(alpha=0.0, loss_type=name, beta=beta, label_smoothing=eps, simpo_gamma=gamma,
                               accelerator=SimpleNamespace(device=torch.device("cpu")))  # fmt: skip
    ours = PREFERENCE_LOSSES[name](pc, pr, rc, rr, beta, chosen_tokens=nc, rejected_tokens=nr,
                                   label_smoothing=eps, simpo_gamma=gamma)  # fmt: skip
    if name == "simpo":
        losses, chosen_rewards, _ = CPOTrainer.cpo_loss(stand_in, pc / nc.clamp(min=1), pr / nr.clamp(min=1))
        torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, atol=1e-6, rtol=1e-6)
    else:
        losses, _, _ = CPOTrainer.cpo_loss(stand_in, pc - rc, pr - rr)
    torch.testing.assert_close(ours.losses, losses, atol=1e-6, rtol=1e-6)
