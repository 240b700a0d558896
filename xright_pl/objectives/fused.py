"""Response-only, fused LM-head log-probs: the scored tokens' log-probs from the final hidden states, without
ever holding the ``[N, T, V]`` logits or their gradient.

:func:`model_token_logps` is the one path every objective and evaluation takes (SFT's token-mean NLL, the
policy's and the live reference's summed preference log-probs, MAXRIGHT's evaluation forwards, validation):

1. The model runs as a whole (``model(..., logits_to_keep=1)``: its own head runs on one position per row), so
   every wrapper's hooks fire as usual (FSDP2's unshard, peft's adapters). A forward hook on the decoder
   (``model.get_decoder()``) keeps its output, the final hidden states ``[N, T, H]``.
2. A forward hook on the model, placed before its other hooks, replaces the model's output by the log-probs, so
   FSDP2 (whose post-forward hook comes next) sees them as the root unit's output and unshards the root's
   parameters again when their gradient arrives, before the chunks are recomputed. In that hook (the root's
   parameters still unsharded) the hidden states of the positions whose next token is scored
   (``labels[:, 1:] != IGNORE_INDEX``) are gathered, ``[M, H]``, and the output head
   (``model.get_output_embeddings()``) runs on chunks of ``chunk_size`` of them; each chunk's log-sum-exp and
   picked logit give its tokens' log-probs, and its logits are freed. Under grad the backward recomputes the
   chunks one by one: a plain ``nn.Linear`` head (Llama, GPT-NeoX; tied or not; with a bias or not) in one
   autograd Function that adds every chunk's weight gradient into one buffer; any other head (peft's wrappers, a
   head with hooks, a head that is its own FSDP unit) called as a module on each chunk under non-reentrant
   ``torch.utils.checkpoint`` (:func:`xright_pl.objectives.losses.label_logps` per chunk).
3. The ``[M]`` log-probs are scattered back to ``[N, T-1]`` (zeros elsewhere): the same tensor as
   :func:`xright_pl.objectives.losses.token_logps` on the full logits.

Memory: the loss part's peak is ``O(chunk_size * V)`` (a chunk's logits, their fp32 copy and their gradient),
not ``O(N * T * V)``; no head compute on prompt or padding positions. Cost: the head's matmul runs twice on the
scored positions in a training step (forward, and again in the backward: with the two backward matmuls,
4 head matmuls on the scored positions against 3 on every position for the full logits): less head compute
whenever more than a quarter of the positions are prompt or padding, 1/3 more when every position is scored.
Under FSDP2 the head lives in the root unit (see
:func:`xright_pl.training.distributed.fully_shard_model`), all-gathered once for the forward and once for the backward
(its pre-backward hook, before the first recomputed chunk), as with the full logits: the chunks add no
communication. A head sharded as its own FSDP unit would be all-gathered at every chunk call (forward and
recompute), which is why it is not.

A model whose logits are not ``head(decoder(...).last_hidden_state)`` (a custom ``forward``, logit scaling or
soft-capping, no ``logits_to_keep``) is found by :func:`fused_head_problem` (a probe on 8 tokens at the first
use) and takes the full-logits path (:func:`xright_pl.objectives.losses.token_logps`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from xright_pl.core.types import IGNORE_INDEX
from xright_pl.objectives.losses import label_logps, token_logps

__all__ = ["fused_head_problem", "model_token_logps", "head_token_logps", "default_chunk_size", "CHUNK_ELEMENTS"]

#: Budget, in elements, of one chunk's logits (``chunk_size * V``): 2**24 = 16 Mi (64 MiB in fp32).
CHUNK_ELEMENTS = 2**24
#: Most positions in one chunk (small vocabularies).
MAX_CHUNK = 4096


def default_chunk_size(vocab: int) -> int:
    """Positions per chunk: ``min(4096, 2**24 // V)``, at least 1 (341 at V = 49,152; 130 at V = 128,256)."""
    return max(1, min(MAX_CHUNK, CHUNK_ELEMENTS // max(vocab, 1)))


def _head_chunk(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    """``log softmax(head(hidden))[targets]`` for one chunk ``hidden: [c, H]``, ``targets: [c]``."""
    logits = head(hidden)
    return label_logps(logits, targets, chunk_size=logits.shape[0])


def _out_features(head: nn.Module) -> int:
    """The head's output size ``V`` (a ``Linear``, or a wrapper such as peft's around one)."""
    for module in (head, getattr(head, "original_module", None)):
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() == 2:
            return int(weight.shape[0])
    return 32768


class _LinearHeadLogps(torch.autograd.Function):
    """``out[i] = log softmax(hidden[i] @ weight.T + bias)[targets[i]]`` in chunks of ``chunk`` rows, for a plain
    ``nn.Linear`` head: the forward keeps ``hidden``, the weights and the ``[M]`` log-sum-exp; the backward
    recomputes each chunk's logits and adds its weight gradient into one buffer (fp32), so the head's weight
    gradient is materialised once, not once per chunk as autograd would (one ``[V, H]`` less at the peak).
    Under autocast the matmuls run as ``F.linear`` would (the autocast state is restored in the backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # type: ignore[override]
        device = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), device)
        m = hidden.shape[0]
        out = torch.empty(
            m, dtype=torch.float32 if weight.dtype != torch.float64 else torch.float64, device=hidden.device
        )
        lse = torch.empty_like(out)
        for start in range(0, m, chunk):
            x = F.linear(hidden[start : start + chunk], weight, bias).to(out.dtype)
            lse[start : start + chunk] = torch.logsumexp(x, dim=-1)
            out[start : start + chunk] = x.gather(1, targets[start : start + chunk, None]).squeeze(1)
            del x
        out -= lse
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        enabled, dtype, device = ctx.autocast
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=lse.dtype, device=bias.device) if need_b else None
        g = grad_out.to(lse.dtype)
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            for start in range(0, hidden.shape[0], ctx.chunk):
                stop = start + ctx.chunk
                h = hidden[start:stop]
                logits = F.linear(h, weight, bias)
                # d out / d logits = onehot(target) - softmax, times the incoming gradient; in the logits' dtype
                x = logits.to(lse.dtype).sub_(lse[start:stop, None]).exp_().neg_()
                x.scatter_add_(1, targets[start:stop, None], torch.ones_like(x[:, :1]))
                x.mul_(g[start:stop, None])
                d = x.to(logits.dtype)
                del x, logits
                if need_h:
                    grad_h[start:stop] = d @ weight.to(d.dtype)
                if need_w:
                    grad_w.addmm_(d.t().to(grad_w.dtype), h.to(grad_w.dtype))
                if need_b:
                    grad_b += d.sum(0, dtype=grad_b.dtype)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
        )


def _plain_linear(head: nn.Module) -> bool:
    """A ``torch.nn.Linear`` itself (not a subclass or wrapper: peft's, a quantised one), without hooks, whose
    weights are plain tensors (not FSDP2 shards: a head that is its own FSDP unit is unsharded by its hooks)."""
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return False
    return all(type(p) in (Tensor, nn.Parameter) for p in head.parameters())


def head_token_logps(head: nn.Module, hidden: Tensor, targets: Tensor, chunk_size: int | None = None) -> Tensor:
    """``out[i] = log softmax(head(hidden[i]))[targets[i]]`` in fp32 (fp64 for fp64 logits), chunk by chunk.

    Under grad, a plain ``nn.Linear`` head (Llama's ``lm_head``, GPT-NeoX's ``embed_out``, tied or not, with or
    without a bias) runs in :class:`_LinearHeadLogps`, whose backward accumulates the weight gradient in one
    buffer; any other head (peft's wrappers, a head with hooks or sharded by FSDP2 as its own unit) is called as a
    module on each chunk under ``torch.utils.checkpoint``.

    Args:
        head: the output head (a module mapping ``[c, H]`` to ``[c, V]`` logits), called once per chunk (and once
            more per chunk in the backward, when a gradient is needed).
        hidden: ``[M, H]`` final hidden states of the scored positions.
        targets: ``[M]`` long, the token each position scores (no :data:`IGNORE_INDEX`).
        chunk_size: positions per chunk; default :func:`default_chunk_size` of the head's output size.

    Returns:
        ``[M]`` log-probs. With ``M == 0`` an empty tensor, still connected to the head's parameters and to
        ``hidden`` (its gradient is zero), so a batch with no scored token backpropagates like any other.
    """
    m = hidden.shape[0]
    chunk_size = default_chunk_size(_out_features(head)) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if m == 0:  # no scored token: one zero position, dropped, keeps the head and the body in the graph
        probe = torch.cat([hidden, hidden.new_zeros(1, hidden.shape[-1])])
        return _head_chunk(head, probe, targets.new_zeros(1))[:0]
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    if grad and _plain_linear(head):
        return _LinearHeadLogps.apply(hidden, head.weight, head.bias, targets, chunk_size)
    out = []
    for start in range(0, m, chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if grad:  # the chunk's logits are freed now and recomputed in the backward
            out.append(checkpoint(_head_chunk, head, h, t, use_reentrant=False, preserve_rng_state=False))
        else:
            out.append(_head_chunk(head, h, t))
    return out[0] if len(out) == 1 else torch.cat(out)


def _last_hidden_state(output: Any) -> Tensor:
    """The final hidden states of a decoder's output (a ``ModelOutput`` or a tuple)."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, (tuple, list)):
        hidden = output[0]
    if not isinstance(hidden, Tensor):
        raise TypeError(f"the decoder returned no last_hidden_state ({type(output).__name__})")
    return hidden


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module):
        raise TypeError("no get_decoder() / get_output_embeddings() module")
    return decoder, head


def model_token_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    fused: bool = True,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Next-token log-probs of the labels under ``model``: what :func:`xright_pl.objectives.losses.token_logps` gives on
    ``model(input_ids, attention_mask).logits``, computed by the fused path (see the module docstring).

    Args:
        model: a causal LM (``transformers``, optionally wrapped by peft) whose :func:`fused_head_problem` is None;
            any causal LM when ``fused`` is False.
        input_ids: ``[N, T]`` long.
        attention_mask: ``[N, T]``.
        labels: ``[N, T]`` aligned labels, :data:`IGNORE_INDEX` on positions not scored.
        fused: False: today's path, the full ``[N, T, V]`` logits and :func:`~xright_pl.objectives.losses.token_logps`.
        chunk_size: positions per head chunk (see :func:`head_token_logps`).

    Returns:
        ``(logps, mask)``: ``[N, T-1]`` fp32 log-probs (0 where not scored) and the ``[N, T-1]`` bool mask.
    """
    if not fused:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return token_logps(logits, labels)
    decoder, head = _decoder_and_head(model)
    mask = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][mask]
    hidden: list[Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        hidden.append(_last_hidden_state(output))

    def score(module: nn.Module, args: Any, output: Any) -> Tensor:
        # The model's output becomes the [N, T-1] log-probs. This hook runs before the model's other forward
        # hooks (prepend): FSDP2's post-forward then sees the log-probs as the root unit's output and registers its
        # pre-backward hook on them, which unshards the head's parameters again for the chunks' recompute.
        if len(hidden) != 1:
            raise RuntimeError(f"the decoder ran {len(hidden)} times in one forward of the model, expected once")
        h = hidden.pop()[:, :-1]
        flat = head_token_logps(head, h[mask.to(h.device)], targets.to(h.device), chunk_size)
        return flat.new_zeros(mask.shape).masked_scatter(mask.to(flat.device), flat)

    handles = [decoder.register_forward_hook(keep), model.register_forward_hook(score, prepend=True)]
    try:
        logps = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return logps, mask


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the wrapped model's forward
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@torch.no_grad()
def fused_head_problem(model: nn.Module, tokens: int = 8) -> str | None:
    """Why :func:`model_token_logps` cannot take the fused path on ``model`` (None: it can).

    Checks that the model has a decoder and an output head module (``get_decoder()``,
    ``get_output_embeddings()``), that its ``forward`` takes ``logits_to_keep``, and, on ``tokens`` positions in
    eval mode, that its logits are the head applied to the decoder's final hidden states (no scaling,
    soft-capping or other step between them), within the weights' precision.
    """
    try:
        decoder, head = _decoder_and_head(model)
    except TypeError as e:
        return str(e)
    if decoder is model:
        return "get_decoder() is the model itself"
    if not _accepts_logits_to_keep(model):
        return "its forward takes no logits_to_keep"
    param = next(model.parameters(), None)
    if param is None:
        return "it has no parameters"
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", None) or 2)
    ids = (torch.arange(tokens, device=param.device) * 7919 % vocab)[None]
    # head(hidden) is computed inside the decoder's hook, as model_token_logps does: FSDP2 holds the root unit's
    # parameters (the head's) unsharded during the model's forward.
    mine: list[Tensor] = []
    handle = decoder.register_forward_hook(lambda m, a, out: mine.append(head(_last_hidden_state(out)).float()))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        theirs = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
    except Exception as e:  # noqa: BLE001 - any failure means: use the plain path
        return f"its forward failed on a probe ({type(e).__name__}: {e})"
    finally:
        handle.remove()
        for m, training in modes:
            m.training = training
    if len(mine) != 1:
        return f"the decoder ran {len(mine)} times in one forward"
    if mine[0].shape != theirs.shape:
        return f"head(decoder output) has shape {tuple(mine[0].shape)}, the logits {tuple(theirs.shape)}"
    tol = 1e-4 if param.dtype in (torch.float32, torch.float64) else 2e-2
    scale = theirs.abs().max().clamp(min=1.0)
    if not bool(((mine[0] - theirs).abs().max() <= tol * scale).item()):
        return "its logits are not head(decoder output) (a scaling or soft-capping step between them)"
    return None
