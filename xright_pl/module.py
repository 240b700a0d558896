"""The LightningModule: a policy, a frozen reference, two objectives and a selector that picks between them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric

from xright_pl.data.streams import StreamTicket
from xright_pl.errors import ConfigError
from xright_pl.losses import dpo_loss, dpo_metrics, sequence_logps, sft_loss
from xright_pl.models import build_causal_lm, frozen_copy, setup_reference_model
from xright_pl.selectors import OBJECTIVES, Decision, Selector, StepContext, check_lam
from xright_pl.types import PreferenceBatch, SFTBatch

log = logging.getLogger(__name__)


@dataclass
class ObjectiveOutput:
    """One objective's forward pass on one micro-batch.

    Attributes:
        loss: scalar loss with its graph (SFT: token-mean NLL; DPO: pair-mean sigmoid loss).
        num_tokens: 0-dim count of non-padding tokens processed.
        num_examples: SFT rows or preference pairs in the batch.
        metrics: detached scalars to log (``rewards/...``, ``logps/...``).
    """

    loss: Tensor
    num_tokens: Tensor
    num_examples: int
    metrics: dict[str, Tensor] = field(default_factory=dict)


class XRightModule(pl.LightningModule):
    """Joint SFT + DPO training of one policy against a frozen reference.

    Each optimizer step the selector (ALRIGHT, MAXRIGHT, Sequential, Mix, ... see :mod:`xright_pl.selectors`)
    says which objective(s) to train; the module runs them, backpropagates, clips, steps and logs.

    Args:
        model: hub name or local folder of the policy (``AutoModelForCausalLM.from_pretrained``).
        model_config: instead of ``model``: keyword arguments of ``AutoConfig.for_model`` (with
            ``model_type``) for a randomly initialised policy (tests, the demo, benchmarks at real shapes).
        reference: hub name or local folder of the DPO reference; None: a frozen copy of the initial policy.
        selector: the algorithm choosing each step's objective. None: use the ``Selector`` callback given to
            the Trainer.
        lam: weight of the DPO objective in the target ``lam * f_dpo + (1 - lam) * f_sft`` (ALRIGHT's DPO
            probability, Mix's weight, MAXRIGHT's gap weight, Sequential's stage split).
        beta: DPO inverse temperature.
        optimizer: optimizer factory (one optimizer shared by both objectives).
        lr_scheduler: LR scheduler factory, stepped once per optimizer step.
        accumulate_grad_batches: micro-batches (of the chosen objective) per optimizer step.
        gradient_clip_val: clip the global gradient norm to this value (None: no clipping).
        seed: seed of the random initialisation when ``model_config`` is used.
        dtype: weight dtype when loading (``float32``, ``bfloat16``); mixed precision comes from the Trainer.
        attn_implementation: attention kernel (``sdpa``, ``eager``, ``flash_attention_2``).
        trust_remote_code: allow custom model code from the hub.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
    """

    def __init__(
        self,
        model: str | None = None,
        model_config: dict[str, Any] | None = None,
        reference: str | None = None,
        selector: Selector | None = None,
        lam: float = 0.5,
        beta: float = 0.1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = 1.0,
        seed: int = 0,
        dtype: str | None = None,
        attn_implementation: str | None = "sdpa",
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        problems = []
        try:
            check_lam(lam)
        except ConfigError as e:
            problems.append(str(e))
        if not (isinstance(beta, (int, float)) and beta > 0):
            problems.append(f"beta must be > 0, got {beta!r}")
        if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
            problems.append(f"accumulate_grad_batches must be an integer >= 1, got {accumulate_grad_batches!r}")
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            problems.append(f"gradient_clip_val must be > 0 or null, got {gradient_clip_val!r}")
        if (model is None) == (model_config is None):
            problems.append("give exactly one of --model.model (hub name or path) and --model.model_config")
        if selector is not None and not isinstance(selector, Selector):
            problems.append(f"selector must be an xright_pl Selector, got {type(selector).__name__}")
        if problems:
            raise ConfigError("Invalid XRightModule settings:\n  - " + "\n  - ".join(problems))
        self.save_hyperparameters(ignore=["selector", "optimizer", "lr_scheduler"])
        self.automatic_optimization = False
        self.lam = float(lam)
        self.beta = float(beta)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self._selector = selector
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.reference_is_initial = reference is None
        self.val_sft_loss = MeanMetric()
        self.val_dpo_loss = MeanMetric()
        self.val_dpo_accuracy = MeanMetric()
        self.steps = {"sft": 0, "dpo": 0}
        self.tokens = {"sft": 0, "dpo": 0}
        self._micro = 0
        self._decision: Decision | None = None
        self._pre: dict[str, ObjectiveOutput] = {}
        self._step_outputs: dict[str, list[ObjectiveOutput]] = {}
        self._device_batches: dict[str, Any] = {}

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Build the policy and the frozen reference (once)."""
        if self.policy is not None:
            return
        hp = self.hparams
        self.policy = build_causal_lm(
            hp.model, hp.model_config, hp.seed, hp.dtype, hp.attn_implementation, hp.trust_remote_code
        )
        if hp.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        if hp.reference is None:
            self.reference = frozen_copy(self.policy)
        else:
            self.reference = setup_reference_model(
                build_causal_lm(hp.reference, None, hp.seed, hp.dtype, hp.attn_implementation, hp.trust_remote_code)
            )

    def train(self, mode: bool = True) -> XRightModule:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # the reference never leaves eval mode (no dropout)
        return self

    @property
    def selector(self) -> Selector:
        if self._selector is None and self._trainer is not None:
            found = [c for c in self.trainer.callbacks if isinstance(c, Selector)]
            if len(found) != 1:
                raise ConfigError(
                    f"expected exactly one Selector callback (Alright, Maxright, Sequential, Mix, Single),"
                    f" found {len(found)}: set --model.selector or pass one in Trainer(callbacks=[...])"
                )
            self._selector = found[0]
        if self._selector is None:
            raise ConfigError("no selector: set XRightModule(selector=...) or pass one to the Trainer")
        return self._selector

    def configure_callbacks(self) -> list[pl.Callback]:
        return [self._selector] if self._selector is not None else []

    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": self.lr_scheduler_factory(opt), "interval": "step"},
        }

    def on_fit_start(self) -> None:
        self.selector.bind(self.lam, self._step_context())

    def _step_context(self) -> StepContext:
        dm = getattr(self.trainer, "datamodule", None)
        per_epoch = {}
        if dm is not None and getattr(dm, "streams", None):
            acc = self.hparams.accumulate_grad_batches
            per_epoch = {k: max(1, -(-len(s) // acc)) for k, s in dm.streams.items()}
        return StepContext(max_steps=self.trainer.max_steps, steps_per_epoch=per_epoch)

    # ------------------------------------------------------------------ objectives
    def forward_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def sft_objective(self, batch: SFTBatch) -> ObjectiveOutput:
        logits = self.forward_logits(batch.input_ids, batch.attention_mask)
        loss, _ = sft_loss(logits, batch.labels)
        return ObjectiveOutput(loss, batch.num_tokens(), batch.num_examples)

    @torch.no_grad()
    def reference_logps(self, batch: PreferenceBatch) -> Tensor:
        """``s_ref(y)`` for the ``[2B]`` sequences of ``batch`` (cached values when the batch carries them)."""
        if batch.ref_logps is not None:
            return batch.ref_logps
        logits = self.reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return sequence_logps(logits.logits, batch.labels).logps

    def dpo_objective(self, batch: PreferenceBatch) -> ObjectiveOutput:
        ref = self.reference_logps(batch)
        logps = sequence_logps(self.forward_logits(batch.input_ids, batch.attention_mask), batch.labels).logps
        b = batch.num_examples
        out = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], self.beta)
        metrics = dpo_metrics(out, logps[:b].detach(), logps[b:].detach())
        return ObjectiveOutput(out.losses.mean(), batch.num_tokens(), b, metrics)

    def objective(self, name: str, batch: Any) -> ObjectiveOutput:
        if name == "sft":
            return self.sft_objective(batch)
        if name == "dpo":
            return self.dpo_objective(batch)
        raise ConfigError(f"unknown objective {name!r}; expected one of {OBJECTIVES}")

    # ------------------------------------------------------------------ training
    def _batch(self, batch: Mapping[str, Any], name: str) -> Any:
        """The micro-batch of objective ``name`` for this micro-step, on the device."""
        if name not in self._device_batches:
            item = batch[name]
            if isinstance(item, StreamTicket):
                item = self.trainer.strategy.batch_to_device(item.stream.peek())
            self._device_batches[name] = item
        return self._device_batches[name]

    def _consume(self, batch: Mapping[str, Any], name: str, out: ObjectiveOutput) -> None:
        item = batch[name]
        if isinstance(item, StreamTicket):
            item.stream.consume(out.num_examples)

    def _reduce(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Average losses over processes, so that every process's selector sees the same values."""
        if self.trainer.world_size > 1 and losses:
            names = sorted(losses)
            stacked = self.trainer.strategy.reduce(torch.stack([losses[k].float() for k in names]), "mean")
            return {k: stacked[i] for i, k in enumerate(names)}
        return {k: v.float() for k, v in losses.items()}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        accumulate = self.hparams.accumulate_grad_batches
        step = self.global_step
        self._device_batches = {}
        if self._micro == 0:
            self._begin_step(step, batch)
        last_micro = self._micro == accumulate - 1
        weights = self._decision.weights
        for i, (name, weight) in enumerate(weights.items()):
            out = self._pre.pop(name, None) or self.objective(name, self._batch(batch, name))
            sync = last_micro and i == len(weights) - 1
            with nullcontext() if sync else self._no_grad_sync():
                self.manual_backward(out.loss * (weight / accumulate))
            self._consume(batch, name, out)
            out.loss = out.loss.detach()
            self._step_outputs.setdefault(name, []).append(out)
        self._pre.clear()  # an evaluated objective that was not chosen keeps its batch for its next step
        self._micro += 1
        if last_micro:
            self._finish_step(step)

    def _no_grad_sync(self):
        """No gradient all-reduce for this backward (all but the last backward of an optimizer step)."""
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return block() if block is not None else nullcontext()

    def _begin_step(self, step: int, batch: Mapping[str, Any]) -> None:
        selector = self.selector
        self._pre = {name: self.objective(name, self._batch(batch, name)) for name in selector.needs(step)}
        values = self._reduce({k: o.loss.detach() for k, o in self._pre.items()})
        self._decision = selector.decide(step, values)
        if self._decision.reset_optimizer:
            self.reset_optimizer()
        if self._decision.reset_reference:
            self.reset_reference()
        self._step_outputs = {}

    def _finish_step(self, step: int) -> None:
        opt = self.optimizers()
        if self.hparams.gradient_clip_val is not None:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.gradient_clip_val, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self._micro = 0
        logs: dict[str, Tensor | float] = {}
        trained: dict[str, Tensor] = {}
        for name, outs in self._step_outputs.items():
            trained[name] = torch.stack([o.loss for o in outs]).mean()
            self.steps[name] += 1
            self.tokens[name] += int(sum(int(o.num_tokens) for o in outs))
            logs[f"train/{name}_loss"] = trained[name]
            for key in outs[0].metrics:
                logs[key] = torch.stack([o.metrics[key] for o in outs]).mean()
        self.selector.observe(step, self._decision, self._reduce(trained))
        logs["train/lr"] = opt.param_groups[0]["lr"]
        for name in OBJECTIVES:
            logs[f"tokens/{name}"] = float(self.tokens[name])
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=1)
        self.log_dict(
            {f"steps/{k}": float(v) for k, v in self.steps.items()}, on_step=True, prog_bar=True, batch_size=1
        )
        self._step_outputs = {}
        max_steps = self.trainer.max_steps
        if max_steps is not None and max_steps > 0 and self.global_step >= max_steps:
            self.trainer.should_stop = True  # validate once more at the very last step

    def reset_optimizer(self) -> None:
        """Re-create the optimizer and LR scheduler (fresh state), e.g. at Sequential's switch."""
        strategy = self.trainer.strategy
        old = strategy._lightning_optimizers
        strategy.setup_optimizers(self.trainer)
        # The manual-optimization loop counts optimizer steps through hooks it put on the old wrappers.
        for new, prev in zip(strategy._lightning_optimizers, old):
            new._on_before_step, new._on_after_step = prev._on_before_step, prev._on_after_step

    def reset_reference(self) -> None:
        """Make the reference a frozen copy of the policy as it stands now."""
        self.reference.load_state_dict(self.policy.state_dict())
        setup_reference_model(self.reference)
        self.reference_is_initial = False

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if isinstance(batch, SFTBatch):
            logits = self.forward_logits(batch.input_ids, batch.attention_mask)
            loss, n_tokens = sft_loss(logits, batch.labels)
            self.val_sft_loss.update(loss, n_tokens.to(loss.dtype))
            self.log("val/sft_loss", self.val_sft_loss, on_epoch=True, add_dataloader_idx=False, prog_bar=True)
        else:
            out = self.dpo_objective(batch)
            self.val_dpo_loss.update(out.loss, out.num_examples)
            self.val_dpo_accuracy.update(out.metrics["rewards/accuracies"], out.num_examples)
            self.log("val/dpo_loss", self.val_dpo_loss, on_epoch=True, add_dataloader_idx=False, prog_bar=True)
            self.log("val/rewards_accuracies", self.val_dpo_accuracy, on_epoch=True, add_dataloader_idx=False)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["xright_pl"] = {
            "steps": dict(self.steps),
            "tokens": dict(self.tokens),
            "reference_is_initial": self.reference_is_initial,
        }
        if self.reference_is_initial or self.hparams.reference is not None:
            # The reference is rebuilt from its source (the seeded config or the checkpoint path): not stored.
            sd = checkpoint["state_dict"]
            for key in [k for k in sd if k.startswith("reference.")]:
                del sd[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("xright_pl", {})
        self.steps = dict(state.get("steps", self.steps))
        self.tokens = dict(state.get("tokens", self.tokens))
        self.reference_is_initial = state.get("reference_is_initial", self.reference_is_initial)
        sd = checkpoint["state_dict"]
        if self.reference is not None and not any(k.startswith("reference.") for k in sd):
            sd.update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})
