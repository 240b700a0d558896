"""Loss functions for joint SFT + DPO training: pure functions, no state.

Shapes: ``N`` rows (sequences), ``T`` padded length, ``V`` vocabulary size, ``B`` preference pairs.
Labels are aligned with ``input_ids`` (see :mod:`xright_pl.core.types`); the next-token shift happens in
:func:`token_logps`: position ``t`` of the logits scores ``labels[:, t + 1]``.

Memory: :func:`token_logps` never materialises a full-vocabulary fp32 copy of the batch's logits. It runs
a custom :class:`torch.autograd.Function` that upcasts one chunk of rows at a time, saves the caller's
logits tensor itself (no copy, original dtype) plus a ``[N*T]`` fp32 log-sum-exp, and recomputes the
softmax chunk by chunk in backward. The only full-size tensor it allocates is the gradient of the logits,
in the logits' dtype, which autograd needs anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from xright_pl.core.types import IGNORE_INDEX, DPOOutput, SequenceLogps

__all__ = [
    "token_logps",
    "label_logps",
    "sequence_logps",
    "sequence_logps_from_token_logps",
    "sft_loss",
    "sft_loss_from_token_logps",
    "dpo_loss",
    "dpo_metrics",
    "sigmoid_loss",
    "ipo_loss",
    "hinge_loss",
    "robust_loss",
    "simpo_loss",
    "PreferenceLoss",
    "PREFERENCE_LOSSES",
]

#: Largest number of flattened positions upcast at once.
MAX_CHUNK_ROWS = 4096
#: Budget, in elements, of one upcast chunk (``rows * V``): 2**26 fp32 elements = 256 MiB.
CHUNK_ELEMENTS = 2**26


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32, fp64 for fp64 (so ``gradcheck`` in fp64 is exact)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_rows(vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, min(MAX_CHUNK_ROWS, CHUNK_ELEMENTS // max(vocab, 1)))


class _ChunkedTokenLogps(torch.autograd.Function):
    """``out[i] = x[i, y[i]] - logsumexp(x[i])`` on flat ``x: [M, V]``, ``y: [M]``; 0 where ``y`` is ignored.

    Forward saves ``x`` itself (no copy), ``y`` and the ``[M]`` log-sum-exp in the compute dtype. Backward
    writes ``grad_x[i] = g[i] * (onehot(y[i]) - softmax(x[i]))`` chunk by chunk in ``x.dtype``; rows with an
    ignored label get a zero gradient.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, chunk_rows: int) -> Tensor:  # type: ignore[override]
        m = logits.shape[0]
        cdtype = _compute_dtype(logits.dtype)
        mask = labels != IGNORE_INDEX
        safe = torch.where(mask, labels, torch.zeros_like(labels))
        lse = torch.empty(m, dtype=cdtype, device=logits.device)
        out = torch.empty(m, dtype=cdtype, device=logits.device)
        for start in range(0, m, chunk_rows):
            stop = min(start + chunk_rows, m)
            x = logits[start:stop].to(cdtype)
            chunk_lse = torch.logsumexp(x, dim=-1)
            picked = x.gather(1, safe[start:stop, None]).squeeze(1)
            lse[start:stop] = chunk_lse
            out[start:stop] = picked - chunk_lse
            del x
        out = torch.where(mask, out, torch.zeros_like(out))
        ctx.save_for_backward(logits, safe, mask, lse)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        logits, safe, mask, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        cdtype = lse.dtype
        m = logits.shape[0]
        g = torch.where(mask, grad_out.to(cdtype), torch.zeros((), dtype=cdtype, device=grad_out.device))
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        ones = torch.ones(min(ctx.chunk_rows, m), 1, dtype=cdtype, device=logits.device)
        for start in range(0, m, ctx.chunk_rows):
            stop = min(start + ctx.chunk_rows, m)
            # copy=True: for fp32/fp64 logits ``.to`` would alias the saved logits, edited in place below.
            x = logits[start:stop].to(cdtype, copy=True)
            # -softmax(x), in place on the upcast chunk.
            x.sub_(lse[start:stop, None]).exp_().neg_()
            x.scatter_add_(1, safe[start:stop, None], ones[: stop - start])
            x.mul_(g[start:stop, None])
            grad[start:stop] = x.to(grad.dtype)
            del x
        return grad, None, None


def token_logps(logits: Tensor, labels: Tensor, *, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Next-token log-probabilities of the labels, with the shift by one done here.

    ``out[n, t] = log softmax(logits[n, t])[labels[n, t + 1]]`` for ``t < T - 1``.

    Implementation (lowest memory): rather than slicing ``logits[:, :-1]`` (a non-contiguous view whose
    flattening would copy ``N*(T-1)*V`` elements), the full ``logits`` are flattened to ``[N*T, V]`` (a
    view when contiguous, no copy) and scored against ``labels[:, 1:]`` padded with an
    :data:`~xright_pl.core.types.IGNORE_INDEX` column at the end; the last column of the result is dropped.
    The gradient of the last position is therefore exactly zero. Non-contiguous ``logits`` are copied
    once, in their own dtype.

    Args:
        logits: ``[N, T, V]`` float (fp32, bf16, fp16 or fp64), may require grad.
        labels: ``[N, T]`` long, aligned with the inputs; :data:`~xright_pl.core.types.IGNORE_INDEX` marks
            positions not scored. ``labels[:, 0]`` is never scored.
        chunk_size: flattened positions upcast at once; default ``min(4096, 2**26 // V)`` (at least 1).

    Returns:
        ``(logps, mask)``: ``logps`` ``[N, T-1]`` in fp32 (fp64 when ``logits`` are fp64), 0.0 where the
        label is ignored; ``mask`` ``[N, T-1]`` bool, True on scored positions.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [N, T, V], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels shape {tuple(labels.shape)} != logits[:2] {tuple(logits.shape[:2])}")
    n, t, v = logits.shape
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    flat_logits = logits.reshape(n * t, v)
    flat = _ChunkedTokenLogps.apply(flat_logits, shifted.reshape(-1), _chunk_rows(v, chunk_size))
    logps = flat.view(n, t)[:, :-1]
    mask = shifted[:, :-1] != IGNORE_INDEX
    return logps, mask


def label_logps(logits: Tensor, targets: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Log-probabilities of aligned targets, no shift: ``out[i] = log softmax(logits[i])[targets[i]]``.

    The kernel of :func:`token_logps` (same memory: no fp32 copy of ``logits`` is saved), for logits of the
    scored positions only (:mod:`xright_pl.objectives.fused`).

    Args:
        logits: ``[M, V]`` float, may require grad.
        targets: ``[M]`` long; :data:`~xright_pl.core.types.IGNORE_INDEX` gives 0.0 and no gradient.
        chunk_size: rows upcast at once (see :func:`token_logps`).

    Returns:
        ``[M]`` fp32 log-probs (fp64 for fp64 logits).
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"label_logps needs logits [M, V] and targets [M], got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    return _ChunkedTokenLogps.apply(logits, targets, _chunk_rows(logits.shape[1], chunk_size))


def sequence_logps_from_token_logps(token_logps: Tensor, mask: Tensor) -> SequenceLogps:
    """Per-row sums of ``token_logps`` (``[N, T']``, 0 where not scored) and per-row counts of ``mask``."""
    return SequenceLogps(logps=token_logps.sum(dim=-1), num_tokens=mask.sum(dim=-1, dtype=torch.long))


def sequence_logps(logits: Tensor, labels: Tensor, *, chunk_size: int | None = None) -> SequenceLogps:
    """Sum of next-token log-probabilities over each row's response tokens.

    Args:
        logits: ``[N, T, V]``.
        labels: ``[N, T]`` aligned labels (see :func:`token_logps`).
        chunk_size: forwarded to :func:`token_logps`.

    Returns:
        :class:`~xright_pl.core.types.SequenceLogps` with ``logps`` ``[N]`` (fp32, fp64 for fp64 logits) and
        ``num_tokens`` ``[N]`` long; an all-masked row gives ``logps == 0`` and ``num_tokens == 0``.
    """
    return sequence_logps_from_token_logps(*token_logps(logits, labels, chunk_size=chunk_size))


def sft_loss_from_token_logps(token_logps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Token-mean negative log-likelihood over all scored tokens of the batch.

    ``loss = -sum(token_logps[mask]) / max(count, 1)``, ``count = mask.sum()``. With no scored token the
    loss is 0.0, still connected to the graph (its gradient is zero), never NaN.

    Args:
        token_logps: ``[N, T']`` float log-probabilities (entries outside ``mask`` are ignored).
        mask: ``[N, T']`` bool.

    Returns:
        ``(loss, count)``: 0-dim float loss and 0-dim long token count.
    """
    count = mask.sum(dtype=torch.long)
    zero = torch.zeros((), dtype=token_logps.dtype, device=token_logps.device)
    picked = torch.where(mask, token_logps, zero)
    loss = -picked.sum() / count.clamp(min=1).to(token_logps.dtype)
    return loss, count


def sft_loss(logits: Tensor, labels: Tensor, *, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """SFT loss: token-mean NLL over all response tokens of the batch (not a mean of per-row means).

    Args:
        logits: ``[N, T, V]``.
        labels: ``[N, T]`` aligned labels (see :func:`token_logps`).
        chunk_size: forwarded to :func:`token_logps`.

    Returns:
        ``(loss, count)``: 0-dim float loss (0.0 when ``count == 0``) and 0-dim long count of scored tokens.
    """
    tok, mask = token_logps(logits, labels, chunk_size=chunk_size)
    return sft_loss_from_token_logps(tok, mask)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> DPOOutput:
    """Sigmoid DPO loss per pair (Rafailov et al., 2023).

    ``losses = -log sigmoid(beta * ((pc - rc) - (pr - rr)))``, computed with ``F.logsigmoid`` so it stays
    finite for large margins of either sign.

    Args:
        policy_chosen_logps: ``[B]`` ``s_pi(y_w)``, summed response log-probs under the policy.
        policy_rejected_logps: ``[B]`` ``s_pi(y_l)``.
        ref_chosen_logps: ``[B]`` ``s_ref(y_w)`` (no grad expected).
        ref_rejected_logps: ``[B]`` ``s_ref(y_l)``.
        beta: KL strength, must be a finite number > 0.

    Returns:
        :class:`~xright_pl.core.types.DPOOutput`: ``losses`` ``[B]`` (take ``.mean()`` for the batch loss),
        ``chosen_rewards = beta * (pc - rc)`` and ``rejected_rewards = beta * (pr - rr)``, both detached.

    Raises:
        ValueError: if ``beta`` is not a finite number > 0, or the four shapes differ.
    """
    beta = float(beta)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    shapes = {
        tuple(x.shape) for x in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    }
    if len(shapes) != 1:
        raise ValueError(f"dpo_loss inputs must share one shape, got {sorted(shapes)}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return DPOOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_ratio).detach(),
        rejected_rewards=(beta * rejected_ratio).detach(),
    )


def dpo_metrics(out: DPOOutput, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor) -> dict[str, Tensor]:
    """Detached batch means with TRL's metric names.

    Args:
        out: result of :func:`dpo_loss`.
        policy_chosen_logps: ``[B]`` policy ``s_pi(y_w)``.
        policy_rejected_logps: ``[B]`` policy ``s_pi(y_l)``.

    Returns:
        0-dim float tensors: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies`` (fraction of
        pairs with chosen reward strictly greater than rejected), ``rewards/margins`` (mean of chosen minus
        rejected reward), ``logps/chosen``, ``logps/rejected``. Means of an empty batch are NaN.
    """
    chosen = out.chosen_rewards.detach()
    rejected = out.rejected_rewards.detach()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }


# ------------------------------------------------------------------------------------------------------------
# Preference losses selectable by name (``XRightModule(loss_type=...)``).
#
# Every loss has the same call signature (see :class:`PreferenceLoss`), so adding one is one function, one line in
# :data:`PREFERENCE_LOSSES` and its test. Notation: ``pc, pr`` summed response log-probs of the chosen and rejected
# answers under the policy, ``rc, rr`` the same under the reference, ``nc, nr`` their response token counts,
# ``h = (pc - rc) - (pr - rr)`` the DPO log-ratio difference.


def _check_common(beta: float, label_smoothing: float, *tensors: Tensor | None) -> float:
    beta = float(beta)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    if not (0.0 <= float(label_smoothing) < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    shapes = {tuple(x.shape) for x in tensors if x is not None}
    if len(shapes) > 1:
        raise ValueError(f"preference loss inputs must share one shape, got {sorted(shapes)}")
    return beta


def _need(name: str, **tensors: Tensor | None) -> None:
    missing = [k for k, v in tensors.items() if v is None]
    if missing:
        raise ValueError(f"the {name!r} preference loss needs {', '.join(missing)}")


def _smoothed_sigmoid(z: Tensor, eps: float) -> Tensor:
    """``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)`` (conservative DPO, Mitchell 2023)."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float,
    *,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> DPOOutput:
    """Sigmoid DPO, optionally with label smoothing ``eps``: conservative DPO (cDPO, Mitchell 2023).

    ``losses = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``. With ``eps == 0`` this *is*
    :func:`dpo_loss` (the same call, bit-identical) and equals TRL's ``DPOTrainer`` ``loss_type="sigmoid"``.
    With ``eps > 0`` it is the conservative-DPO formula, as TRL's ``CPOTrainer`` computes it (``cpo_loss``,
    ``loss_type="sigmoid"``); TRL 1.16's ``DPOTrainer`` sigmoid loss ignores ``label_smoothing`` (its config
    applies it to ``robust`` and ``exo_pair`` only), so there is no ``DPOTrainer`` setting equal to ``eps > 0``.
    Rewards ``beta * (pc - rc)``, ``beta * (pr - rr)``.
    ``chosen_tokens``, ``rejected_tokens`` and ``simpo_gamma`` are not used.
    """
    _need("sigmoid", ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    _check_common(beta, label_smoothing)
    out = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    if label_smoothing == 0:
        return out
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = _smoothed_sigmoid(float(beta) * h, float(label_smoothing))
    return DPOOutput(losses, out.chosen_rewards, out.rejected_rewards)


def robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float,
    *,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> DPOOutput:
    """Robust DPO (Chowdhury et al., 2024; TRL ``loss_type="robust"``): the unbiased loss under label flips
    with probability ``eps``:

    ``losses = (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)``.

    ``eps == 0`` gives sigmoid DPO. Unlike the conservative loss it can be negative (a flipped pair's term is
    subtracted). Rewards as in :func:`dpo_loss`.
    """
    _need("robust", ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    _check_common(beta, label_smoothing)
    out = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    eps = float(label_smoothing)
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    z = float(beta) * h
    losses = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return DPOOutput(losses, out.chosen_rewards, out.rejected_rewards)


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float,
    *,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> DPOOutput:
    """Hinge loss of RSO/SLiC (Liu et al., 2023; TRL ``loss_type="hinge"``): ``losses = relu(1 - beta h)``.

    Zero (and no gradient) once ``beta h >= 1``. Rewards as in :func:`dpo_loss`.
    """
    _need("hinge", ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    _check_common(beta, label_smoothing)
    out = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return DPOOutput(torch.relu(1.0 - float(beta) * h), out.chosen_rewards, out.rejected_rewards)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float,
    *,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> DPOOutput:
    """IPO (Azar et al., 2023, eq. 17, ``beta`` = the paper's ``tau``), with per-token log-ratios as TRL does:

    ``h_avg = (pc - rc) / nc - (pr - rr) / nr``, ``losses = (h_avg - 1 / (2 beta))**2``.

    Convention: the paper writes the loss on sequence log-ratios; TRL's ``DPOTrainer`` (``loss_type="ipo"``)
    divides each log-ratio by its response's token count (older TRL averaged the log-probs of both models
    before the ratio, the same number), and its source notes the IPO authors confirmed the paper's results use
    this normalised form. It is followed here because with summed log-probs the squared loss and its target
    ``1 / (2 beta)`` scale with the answer length, so one ``beta`` would mean different things for short and
    long answers. Token counts are clamped to >= 1 (an empty response gives its summed log-ratio, 0).

    ``nc``/``nr`` are the **scored** token counts: the positions whose log-probs make ``pc``/``pr``
    (:func:`sequence_logps`' ``num_tokens``), so ``h_avg`` is the mean log-ratio of exactly the tokens summed.
    TRL divides by the completion's length before the shift; the two differ by one when a response starts at
    position 0 (an empty prompt without BOS: that first token has no context and is never scored).
    Rewards stay ``beta * (pc - rc)``, ``beta * (pr - rr)`` (summed, as for every reference loss).
    """
    _need(
        "ipo",
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
    )
    _check_common(beta, label_smoothing, policy_chosen_logps, chosen_tokens, rejected_tokens)
    out = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    dtype = policy_chosen_logps.dtype
    nc = chosen_tokens.to(dtype).clamp(min=1)
    nr = rejected_tokens.to(dtype).clamp(min=1)
    h_avg = (policy_chosen_logps - ref_chosen_logps) / nc - (policy_rejected_logps - ref_rejected_logps) / nr
    return DPOOutput((h_avg - 1.0 / (2.0 * float(beta))) ** 2, out.chosen_rewards, out.rejected_rewards)


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float,
    *,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> DPOOutput:
    """SimPO (Meng et al., 2024): reference-free, length-normalised, with a target margin ``gamma``.

    ``z = beta * (pc / nc - pr / nr) - gamma``; ``losses = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``
    (``eps = label_smoothing``, 0 in the paper; TRL's ``CPOTrainer`` with ``loss_type="simpo"``, ``cpo_alpha=0``
    computes the same, as ``beta * ((pc/nc - pr/nr) - gamma / beta)``). ``ref_*`` are ignored (may be None).
    Rewards are the length-normalised, beta-scaled log-probs ``beta * pc / nc`` and ``beta * pr / nr`` (what
    TRL's CPO trainer reports as ``rewards/*``). Token counts are clamped to >= 1.
    """
    _need("simpo", chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
    beta = _check_common(beta, label_smoothing, policy_chosen_logps, policy_rejected_logps, chosen_tokens)
    gamma = float(simpo_gamma)
    if not math.isfinite(gamma):
        raise ValueError(f"simpo_gamma must be a finite number, got {simpo_gamma}")
    dtype = policy_chosen_logps.dtype
    chosen = policy_chosen_logps / chosen_tokens.to(dtype).clamp(min=1)
    rejected = policy_rejected_logps / rejected_tokens.to(dtype).clamp(min=1)
    losses = _smoothed_sigmoid(beta * (chosen - rejected) - gamma, float(label_smoothing))
    return DPOOutput(losses, (beta * chosen).detach(), (beta * rejected).detach())


@dataclass(frozen=True)
class PreferenceLoss:
    """A preference loss of the registry, with what the module needs to know about it.

    Calling it calls ``fn(pc, pr, rc, rr, beta, *, chosen_tokens, rejected_tokens, label_smoothing,
    simpo_gamma) -> DPOOutput`` (per-pair ``losses`` and detached rewards). Every loss takes every argument and
    ignores those it does not use.

    Attributes:
        fn: the loss function.
        needs_reference: False for reference-free losses: no reference model is built, ``rc``/``rr`` are None.
        uses_label_smoothing: whether ``label_smoothing`` changes the loss (else it must be 0).
        formula: one-line formula, shown in ``--help`` and errors.
        trl_name: the matching TRL setting.
    """

    fn: Callable[..., DPOOutput]
    needs_reference: bool
    uses_label_smoothing: bool
    formula: str
    trl_name: str

    def __call__(self, *args, **kwargs) -> DPOOutput:
        return self.fn(*args, **kwargs)


#: The preference losses by name (``XRightModule(loss_type=...)``); "sigmoid" (DPO) is the default.
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": PreferenceLoss(
        sigmoid_loss, True, True, "-(1-eps) logsig(b h) - eps logsig(-b h)", 'DPO "sigmoid" (eps 0); CPO "sigmoid"'
    ),
    "ipo": PreferenceLoss(ipo_loss, True, False, "(h_avg - 1/(2b))^2, per-token log-ratios", 'DPO "ipo"'),
    "hinge": PreferenceLoss(hinge_loss, True, False, "relu(1 - b h)", 'DPO "hinge"'),
    "robust": PreferenceLoss(
        robust_loss, True, True, "(-(1-eps) logsig(b h) + eps logsig(-b h)) / (1-2eps)", 'DPO "robust"'
    ),
    "simpo": PreferenceLoss(simpo_loss, False, True, "-logsig(b (pc/nc - pr/nr) - gamma), no reference", 'CPO "simpo"'),
}
