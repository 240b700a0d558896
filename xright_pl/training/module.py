"""The LightningModule: a policy, a frozen reference, two objectives and a selector that picks between them."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric

from xright_pl.core.errors import ConfigError
from xright_pl.core.lightning_private import replace_optimizers
from xright_pl.core.types import PreferenceBatch, SFTBatch
from xright_pl.data.streams import StreamTicket
from xright_pl.models.build import build_causal_lm, frozen_copy, setup_reference_model
from xright_pl.models.lora import LoraSettings, apply_lora
from xright_pl.objectives.fused import fused_head_problem, model_token_logps
from xright_pl.objectives.losses import token_logps
from xright_pl.objectives.plugins import OBJECTIVE_KINDS, Objective, ObjectiveOutput
from xright_pl.selectors import Selector, Single, StepContext, selector_of
from xright_pl.training.distributed import agree_run_dir, check_agreement, fully_shard_model, run_folders
from xright_pl.training.guards import NonFiniteGuard, TrainingError, check_finite_weights
from xright_pl.training.metrics import StepLogWindow
from xright_pl.training.reference import cache_reference_logps, reference_logps, reset_to_policy
from xright_pl.training.rng import RngStream
from xright_pl.training.settings import check_settings
from xright_pl.training.state import drop_rebuilt_reference, load_state, save_state
from xright_pl.training.steps import StepAccumulator, lookahead_units

log = logging.getLogger(__name__)

__all__ = ["XRightModule", "TrainingError", "run_folders"]


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
        lora: train low-rank adapters (``peft``) instead of all weights. Without ``reference``, the reference is
            the same model with its adapters disabled: one base model in memory, not two.
        max_consecutive_nonfinite: an optimizer step whose loss or gradient is NaN/inf is skipped (no update,
            logged with its step and branch); after this many such steps in a row training stops with an error.
        precompute_reference_logps: before training, compute the reference log-probs ``s_ref`` of every
            preference pair of the data module's train and val sets once (batched, no grad, the Trainer's
            precision), store them as dataset columns ``ref_chosen_logps``/``ref_rejected_logps``, and release
            the reference model: each DPO step then runs the policy only (about a quarter less compute) and
            the reference's memory is freed. Costs one no-grad pass over the preference data at each fit
            start (a resumed run recomputes it; checkpoints never hold the cache). Needs a
            :class:`~xright_pl.JointDataModule`; not with ``Sequential(reference="stage_start")``,
            whose reference changes mid-run. Not with ``loss_type: simpo`` (no reference: nothing to cache).
        loss_type: the preference loss of the DPO objective, one of ``sigmoid`` (DPO, the default), ``ipo``,
            ``hinge``, ``robust``, ``simpo`` (see :data:`xright_pl.objectives.losses.PREFERENCE_LOSSES`). ``ipo`` uses
            per-token log-ratios (as TRL). ``simpo`` is reference-free: no reference model is built or kept, and
            its ``rewards/*`` metrics are the length-normalised log-probs times ``beta``. Metric and validation
            names (``train/dpo_loss``, ``val/dpo_loss``, ``rewards/*``) stay the same for every loss.
        label_smoothing: probability ``eps`` in [0, 0.5) that a preference label is wrong: conservative DPO for
            ``sigmoid`` (and ``simpo``), the unbiased estimator for ``robust``; must be 0 for ``ipo``/``hinge``.
        simpo_gamma: SimPO's target reward margin ``gamma`` (used by ``simpo`` only).
        fused_logps: compute the scored tokens' log-probs from the final hidden states (see
            :mod:`xright_pl.objectives.fused`): the output head runs on the response positions only, in chunks of about
            ``2**24 / V`` positions that are recomputed in the backward, so neither the ``[N, T, V]`` logits nor
            their gradient is ever held (beyond the scored positions' hidden states and the head's own weight
            gradient, the loss part holds one chunk's logits: about 64 MiB in fp32 at any vocabulary). Costs a
            second head matmul on the scored positions in the backward (less head compute than the full logits
            when more than a quarter of the positions are prompt or padding). Same
            losses and gradients as ``false`` within float rounding. ``false``: the full logits of every position
            and their gradient (more memory; can be faster when nearly every position is scored). A model
            whose logits are not the head applied to the decoder's output falls back to the full logits, with a
            one-line note.
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
        lora: LoraSettings | None = None,
        max_consecutive_nonfinite: int = 10,
        precompute_reference_logps: bool = False,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        fused_logps: bool = True,
    ) -> None:
        super().__init__()
        check_settings(
            lam=lam,
            beta=beta,
            accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val,
            model=model,
            model_config=model_config,
            selector=selector,
            lora=lora,
            max_consecutive_nonfinite=max_consecutive_nonfinite,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
            simpo_gamma=simpo_gamma,
            precompute_reference_logps=precompute_reference_logps,
            optimizer=optimizer,
        )
        self.save_hyperparameters(ignore=["selector", "optimizer", "lr_scheduler"])
        self.automatic_optimization = False
        self.lam = float(lam)
        self.beta = float(beta)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self._selector = selector
        self._optimum = None  # optima given for the run (see ``optimum``)
        self.lora = lora
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.reference_is_initial = reference is None
        self.reference_released = False  # True once s_ref is cached in the data and the reference model freed
        self._reference_reset = False  # the reference was replaced by a copy of the policy (stored in checkpoints)
        self._use_objectives({"sft": "sft", "dpo": "preference"})
        #: The optimizer step in progress across its micro-batches (see :mod:`xright_pl.training.steps`).
        self.accumulator = StepAccumulator(accumulate_grad_batches)
        #: Steps skipped for a non-finite loss or gradient (see :mod:`xright_pl.training.guards`).
        self.nonfinite_guard = NonFiniteGuard(max_consecutive_nonfinite)
        #: The random stream of the training steps (dropout), checkpointed (see :mod:`xright_pl.training.rng`).
        self.training_rng = RngStream()
        self.reevaluated_forwards = 0  # evaluation steps whose chosen objective had been evaluated without graph
        #: Per objective, its evaluations in a row without a training step in between (checkpointed): its next
        #: evaluation looks that many batches ahead (see :meth:`_evaluation_batch`).
        self.evaluations_untrained: dict[str, int] = {}
        self._log_window = StepLogWindow()
        self._device_batches: dict[str, Any] = {}  # this micro-batch's batches on the device, by objective
        self._fused: dict[str, bool] = {}  # "policy"/"reference": whether the fused log-prob path applies (probed once)

    @property
    def nonfinite_skips(self) -> int:
        """Optimizer steps skipped for a non-finite loss or gradient."""
        return self.nonfinite_guard.skips

    @property
    def _micro(self) -> int:
        """Index of the next micro-batch of the optimizer step (0: at a step boundary); callbacks read it."""
        return self.accumulator.micro

    # ------------------------------------------------------------------ objectives
    def _use_objectives(self, kinds: Mapping[str, str]) -> None:
        """Build the objective plugins ``{name: kind}`` with their validation metrics and counters."""
        unknown = sorted({k for k in kinds.values() if k not in OBJECTIVE_KINDS})
        if unknown:
            raise ConfigError(
                f"unknown objective kind {', '.join(unknown)}; registered: {', '.join(OBJECTIVE_KINDS)}"
                " (xright_pl.objectives.plugins.register_objective adds one)"
            )
        #: The objectives by name, each a plugin (:mod:`xright_pl.objectives.plugins`) built from its registered kind:
        #: the module runs ``objectives[name].compute(self, batch)`` for whichever names the selector chooses.
        self.objectives: dict[str, Objective] = {
            name: OBJECTIVE_KINDS[kind].from_settings(name, self.hparams) for name, kind in kinds.items()
        }
        # One weighted mean per validation metric of every objective (keys: the metric names, "/" -> "__"), for
        # the held-out rows (``val/``) and the data module's held-in sample of training rows (``held_in/``).
        keys = [k for o in self.objectives.values() for k in o.validation_keys()]
        self.val_metrics = torch.nn.ModuleDict(
            {_metric_key(_with_prefix(k, p)): MeanMetric() for p in VALIDATION_PREFIXES for k in keys}
        )
        self.steps = dict.fromkeys(self.objectives, 0)
        self.tokens = dict.fromkeys(self.objectives, 0)

    def setup(self, stage: str) -> None:
        """Take the objectives from the data module when it names its own (``data.datasets``)."""
        agree_run_dir(self.trainer)  # every process, now: end-of-run hooks on rank 0 then need no collective
        dm = getattr(self.trainer, "datamodule", None)
        if getattr(dm, "objective_weights", None) is None:
            return
        kinds = dm.objective_kinds
        if [(k, o.kind) for k, o in self.objectives.items()] != list(kinds.items()):
            self._use_objectives(kinds)
        for name, objective in self.objectives.items():
            rows = SFTBatch if dm.data_kind(name) == "sft" else PreferenceBatch
            if not issubclass(rows, objective.batch_type):
                raise ConfigError(
                    f"data set {name!r}: objective kind {objective.kind!r} trains on {objective.batch_type.__name__}"
                    f" batches, but its data is {dm.data_kind(name)} rows"
                )
        selector = selector_of(self)
        if isinstance(selector, Single) and selector.objective not in self.objectives:
            raise ConfigError(
                f"Single(objective={selector.objective!r}): the run has no such objective; it has"
                f" {', '.join(self.objectives)}"
            )

    def target(self) -> float | dict[str, float]:
        """The weights of the trade-off this run trains: ``lam`` for the pair, or ``{name: lambda_k}`` from the
        data module's ``datasets``."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        weights = getattr(dm, "objective_weights", None)
        return self.lam if weights is None else dict(weights)

    # ------------------------------------------------------------------ model
    def configure_model(self, with_reference: bool = True) -> None:
        """Build the policy (with LoRA adapters if set) and the frozen reference (once).

        With LoRA and no ``reference`` path there is no reference module: the policy with its adapters disabled
        is the reference. Under ``ModelParallelStrategy`` (``self.device_mesh`` set) policy and reference are
        sharded with FSDP2 ``fully_shard``, each transformer block its own unit, in separate units.
        ``with_reference=False`` builds the policy alone (to generate or export from it; not for training).
        """
        if self.policy is not None:
            return
        hp = self.hparams
        policy = build_causal_lm(
            hp.model, hp.model_config, hp.seed, hp.dtype, hp.attn_implementation, hp.trust_remote_code
        )
        if hp.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        with_reference = with_reference and self.needs_reference  # simpo: no reference at all
        if with_reference and hp.reference is not None:
            self.reference = setup_reference_model(
                build_causal_lm(hp.reference, None, hp.seed, hp.dtype, hp.attn_implementation, hp.trust_remote_code)
            )
        elif with_reference and self.lora is None:
            self.reference = frozen_copy(policy)
        if self.lora is not None:
            policy = apply_lora(policy, self.lora)
            if hp.gradient_checkpointing:
                policy.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grads
        self.policy = policy
        if self.device_mesh is not None:
            self._fully_shard()

    def _fully_shard(self) -> None:
        """FSDP2: shard the policy and the reference (separate units) over the data-parallel mesh."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mesh = self.device_mesh
        if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names:
            if "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() > 1:
                raise ConfigError(
                    "tensor parallelism is not supported: set the strategy's tensor_parallel_size: 1 and"
                    " data_parallel_size: <number of processes> (see configs/fsdp.yaml)"
                )
            mesh = mesh["data_parallel"]
        mp = MixedPrecisionPolicy()
        if self._trainer is not None and str(self.trainer.precision) == "bf16-mixed":
            # bf16 compute and all-gathers, fp32 master weights and gradient reduction.
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        fully_shard_model(self.policy, mesh, mp)
        if self.reference is not None:
            fully_shard_model(self.reference, mesh, mp)

    @property
    def needs_reference(self) -> bool:
        """Whether any objective uses the frozen reference (a reference-free loss such as SimPO does not)."""
        return any(o.needs_reference for o in self.objectives.values())

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

    @property
    def optimum(self) -> Any:
        """The run's optima, their one owner (``Optimum`` of the pair or ``OptimumK`` by name, see
        :mod:`xright_pl.core.optimum`; None: unknown): those given to the run's ``TradeoffMetrics``, else the selector's
        (MAXRIGHT's ``optimum_file``/``f_star``). The metrics and the trajectory plot read it, nothing scans the
        callbacks for it."""
        if self._optimum is not None:
            return self._optimum
        selector = selector_of(self)
        return selector.given_optimum() if selector is not None else None

    @optimum.setter
    def optimum(self, value: Any) -> None:
        self._optimum = value

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
        self.selector.bind(self.target(), self._step_context())
        if self.hparams.get("precompute_reference_logps"):
            self.precompute_reference()
        self._enter_training_modes()

    def _enter_training_modes(self) -> None:
        """The policy trains in train mode (dropout on), the reference stays in eval mode.

        ``from_pretrained`` returns a model in eval mode, and Lightning keeps each submodule's mode as it finds
        it (validation restores the modes it captured), so the policy is switched here once, before the first
        (sanity) validation. Lightning then warns about modules in eval mode at the start of training; the
        frozen reference is in eval mode by design, so that warning is silenced when it counts exactly the
        reference's modules (any other module left in eval mode still warns).
        """
        self.train()
        if self.reference is not None:
            n_ref = sum(1 for _ in self.reference.modules())
            only_reference = rf"Found {n_ref} module\(s\) in eval mode at the start of training"
            warnings.filterwarnings("ignore", message=only_reference)

    def on_train_start(self) -> None:
        # Again, now that the training streams exist: epoch-based settings (Sequential's switch_epochs) need
        # their steps per epoch, which are known only once Lightning has asked for the training loader.
        self.selector.bind(self.target(), self._step_context())

    # ------------------------------------------------------------------ cached reference log-probs
    def precompute_reference(self) -> None:
        """Cache ``s_ref`` of every preference pair (train and val) in the data module, then release the
        reference model. Each process computes an equal share of the rows; the shares are all-gathered."""
        if cache_reference_logps(
            self.trainer, self.selector, self.reference_logps, self.reference_released, self.device
        ):
            self.reference = None  # every batch now carries s_ref: free the model (LoRA: there was none)
            self.reference_released = True

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

    def policy_token_logps(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(logps, mask)``, ``[N, T-1]``: the policy's next-token log-probs of ``labels`` (0 where not scored), by
        the fused path unless ``fused_logps`` is off, the model has no separable head, or a subclass overrides
        :meth:`forward_logits` (then from its logits)."""
        if type(self).forward_logits is not XRightModule.forward_logits:
            return token_logps(self.forward_logits(input_ids, attention_mask), labels)
        fused = self.uses_fused_logps("policy", self.policy)
        return model_token_logps(self.policy, input_ids, attention_mask, labels, fused=fused)

    def uses_fused_logps(self, role: str, model: torch.nn.Module) -> bool:
        """Whether ``model`` (the ``policy`` or the ``reference``) takes the fused log-prob path: ``fused_logps`` is
        on and :func:`~xright_pl.objectives.fused.fused_head_problem` finds nothing (probed once per role, with a
        one-line note when it finds something)."""
        if not self.hparams.get("fused_logps", True):
            return False
        if role not in self._fused:
            problem = fused_head_problem(model)
            if problem is not None:
                log.warning("fused log-probs off for the %s: %s; using its full logits", role, problem)
            self._fused[role] = problem is None
        return self._fused[role]

    def sft_objective(self, batch: SFTBatch) -> ObjectiveOutput:
        """The ``sft`` objective on ``batch`` (see :class:`~xright_pl.objectives.plugins.SFTObjective`). A subclass (or
        an instance attribute) that overrides it replaces the ``sft`` objective in training and validation, as
        before objectives were plugins."""
        return self._plugin("sft", batch)

    def reference_logps(self, batch: PreferenceBatch) -> Tensor:
        """``s_ref(y)`` for the ``[2B]`` sequences of ``batch`` (cached values when the batch carries them)."""
        if batch.ref_logps is not None or self.reference_released:
            return reference_logps(self.policy, self.reference, batch, self.reference_released)
        role, model = ("policy", self.policy) if self.reference is None else ("reference", self.reference)
        fused = self.uses_fused_logps(role, model)
        return reference_logps(self.policy, self.reference, batch, self.reference_released, fused=fused)

    def dpo_objective(self, batch: PreferenceBatch) -> ObjectiveOutput:
        """The ``dpo`` objective on ``batch`` (see :class:`~xright_pl.objectives.plugins.PreferenceObjective`);
        overridable like :meth:`sft_objective`."""
        return self._plugin("dpo", batch)

    def objective(self, name: str, batch: Any) -> ObjectiveOutput:
        """Objective ``name``'s loss on ``batch`` (with its graph), its counts and metrics."""
        hook = _OBJECTIVE_HOOKS.get(name)
        if hook is not None and (hook in self.__dict__ or getattr(type(self), hook) is not getattr(XRightModule, hook)):
            return getattr(self, hook)(batch)  # the two-objective hook, overridden by a subclass or an attribute
        return self._plugin(name, batch)

    @property
    def preference_loss(self) -> Any:
        """The ``dpo`` objective's loss (a :class:`~xright_pl.objectives.losses.PreferenceLoss`), or None without
        one."""
        dpo = self.objectives.get("dpo")
        return getattr(dpo, "loss", None)

    def _plugin(self, name: str, batch: Any) -> ObjectiveOutput:
        objective = self.objectives.get(name)
        if objective is None:
            raise ConfigError(f"unknown objective {name!r}; this module has {', '.join(self.objectives)}")
        return objective.compute(self, batch)

    # ------------------------------------------------------------------ training
    def _batch(self, batch: Mapping[str, Any], name: str) -> Any:
        """The micro-batch of objective ``name`` for this micro-step, on the device."""
        if name not in self._device_batches:
            item = batch[name]
            if isinstance(item, StreamTicket):
                item = self.trainer.strategy.batch_to_device(item.stream.peek())
            self._device_batches[name] = item
        return self._device_batches[name]

    def _evaluation_offset(self, batch: Mapping[str, Any], name: str) -> int:
        """How many batches ahead of its next training batch objective ``name``'s evaluation looks: 0 when it was
        trained since its last evaluation, else one batch further for every evaluation in a row without training,
        wrapping around after one epoch's batches (so the ``n``-th such evaluation reads the ``n mod L``-th untrained
        batch of a stream of ``L`` batches). Without a stream (a plain batch): 0."""
        item = batch[name]
        if not isinstance(item, StreamTicket):
            return 0
        return self.evaluations_untrained.get(name, 0) % len(item.stream)

    def _evaluation_batch(self, batch: Mapping[str, Any], name: str, offset: int) -> Any:
        """The batch that objective ``name``'s evaluation (MAXRIGHT's) looks at, on the device: ``offset`` (from
        :meth:`_evaluation_offset`) batches ahead of the one it would train on.

        An objective evaluated and then not trained keeps its batch for its next training step (nothing is
        skipped), so evaluating that same batch again would show the selector one fixed sample every time: one
        easy batch, below f*, would lock the decision for the rest of the run. Each further evaluation in a row
        therefore looks at the next batch of the stream (up to one epoch ahead: every batch of the epoch is looked
        at before one is looked at again); the batches in between are fetched once, kept on the host until they
        are trained (at most one epoch of collated token ids), and trained later in order.
        """
        if offset == 0:
            return self._batch(batch, name)
        return self.trainer.strategy.batch_to_device(batch[name].stream.peek(offset))

    def _consume(self, batch: Mapping[str, Any], name: str, out: ObjectiveOutput) -> None:
        item = batch[name]
        if isinstance(item, StreamTicket):
            out.num_tokens = item.stream.peek().num_tokens()  # counted on the host copy: no device sync
            item.stream.consume(out.num_examples)

    def _reduce(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Average losses over processes, so that every process's selector sees the same values."""
        if self.trainer.world_size > 1 and losses:
            names = sorted(losses)
            stacked = self.trainer.strategy.reduce(torch.stack([losses[k].float() for k in names]), reduce_op="mean")
            return {k: stacked[i] for i, k in enumerate(names)}
        return {k: v.float() for k, v in losses.items()}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """One micro-batch: at a step boundary the selector decides; the chosen objectives run and backpropagate;
        the step's last micro-batch updates the weights."""
        with self.training_rng.active(self.device):
            step = self.global_step
            self._device_batches = {}
            if self.accumulator.at_boundary:
                self._begin_step(step, batch)
            self._train_micro_batch(batch)
            if self.accumulator.end_micro_batch():
                self._finish_step(step)

    def _train_micro_batch(self, batch: Mapping[str, Any]) -> None:
        """Each chosen objective's loss on this micro-batch, scaled for accumulation and backpropagated."""
        acc = self.accumulator
        weights = acc.decision.weights
        for i, (name, weight) in enumerate(weights.items()):
            out = acc.take_evaluated(name) or self.objective(name, self._batch(batch, name))
            sync = acc.last_micro and i == len(weights) - 1
            scale = acc.loss_scale(name, weight, out)
            with nullcontext() if sync else self._no_grad_sync():
                self.manual_backward(out.loss * scale)
            self._consume(batch, name, out)
            acc.record(name, out)

    def _no_grad_sync(self):
        """No gradient all-reduce for this backward (all but the last backward of an optimizer step)."""
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return block() if block is not None else nullcontext()

    def _begin_step(self, step: int, batch: Mapping[str, Any]) -> None:
        """The selector sees the losses it needs and decides; every process checks that it decided the same."""
        selector, acc = self.selector, self.accumulator
        offsets = {k: self._evaluation_offset(batch, k) for k in selector.needs(step)}
        ahead = tuple(k for k, offset in offsets.items() if offset > 0)  # not the batch it would train on
        values = acc.evaluate(
            tuple(offsets), lambda name: self.objective(name, self._evaluation_batch(batch, name, offsets[name])), ahead
        )
        values = self._reduce(values)
        decision = selector.decide(step, values)
        # A chosen objective that was evaluated without a graph runs its forward again (with one).
        self.reevaluated_forwards += acc.choose(decision, values)
        for name in values:
            if name not in decision.weights:
                self.evaluations_untrained[name] = self.evaluations_untrained.get(name, 0) + 1
        for name in decision.weights:
            self.evaluations_untrained.pop(name, None)
        # Every process must train the same objective(s): checked before any backward pass (one tiny all-gather).
        check_agreement(self.trainer.strategy, step, decision, type(selector).__name__, tuple(self.objectives))
        if decision.reset_optimizer:
            self.reset_optimizer()
        if decision.reset_reference:
            self.reset_reference()
        world = self.trainer.world_size
        acc.start(lookahead_units(batch, decision.weights, acc.accumulate), world, self._sum_over_processes)

    def _sum_over_processes(self, values: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(values.to(self.device), reduce_op="sum")

    def _gradient_norm(self) -> Tensor | None:
        """The global L2 norm of the policy's gradient (all shards), or ``None`` with a gradient scaler (fp16),
        whose gradients are still scaled here."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return None
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        if not grads:
            return None
        norm = torch.nn.utils.get_total_norm(grads)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: reduced over the shards

    def _finish_step(self, step: int) -> None:
        """Clip, step the optimizer and the LR scheduler, count, give the selector the trained losses, log; or skip
        the update when a loss or the gradient is not finite."""
        opt = self.optimizers()
        grad_norm = self._gradient_norm()
        if not self._update_is_finite(step, grad_norm):
            opt.zero_grad(set_to_none=True)
            self.accumulator.skip()
            return
        clip = self.hparams.gradient_clip_val
        if clip is not None and grad_norm is not None:  # clip with the norm just computed: one pass, not two
            params = [p for p in self.policy.parameters() if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, clip, grad_norm)
        elif clip is not None:  # fp16: Lightning unscales the gradients first
            self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        lr = opt.param_groups[0]["lr"]  # the rate this step used (read before the scheduler moves it)
        opt.step()
        opt.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        logs: dict[str, Tensor | float] = {}
        trained: dict[str, Tensor] = {}
        for name, done in self.accumulator.finish().items():
            trained[name] = done.loss
            self.steps[name] += 1
            self.tokens[name] += done.tokens
            logs[f"train/{name}_loss"] = done.loss
            logs.update(done.metrics)
        self.selector.observe(step, self.accumulator.decision, self._reduce(trained))
        logs["train/lr"] = lr
        if grad_norm is not None:
            logs["train/grad_norm"] = grad_norm.detach()  # before clipping
        logs["train/nonfinite_skips"] = float(self.nonfinite_skips)
        for name in self.objectives:
            logs[f"tokens/{name}"] = float(self.tokens[name])
        max_steps = self.trainer.max_steps
        final = self.selector.final_step()
        if (max_steps is not None and max_steps > 0 and self.global_step >= max_steps) or (
            final is not None and self.global_step >= final
        ):
            self.trainer.should_stop = True  # validate once more at the very last step
        self._log_step(logs)

    def _log_step(self, logs: dict[str, Tensor | float]) -> None:
        """Callback metrics and the progress bar every step; the loggers every ``log_every_n_steps`` optimizer
        steps, with each value averaged over the steps that produced it (see :class:`StepLogWindow`)."""
        steps = {f"steps/{k}": float(v) for k, v in self.steps.items()}
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=1, logger=False)
        self.log_dict(steps, on_step=True, on_epoch=False, prog_bar=True, batch_size=1, logger=False)
        self._log_window.add({**logs, **steps})
        every = max(1, self.trainer.log_every_n_steps)
        if self.loggers and (self.global_step % every == 0 or self.trainer.should_stop):
            values = self._log_window.flush()
            for logger in self.loggers:  # the step index Lightning uses for validation logs: 0-based
                logger.log_metrics(values, step=self.global_step - 1)

    def _update_is_finite(self, step: int, grad_norm: Tensor | None) -> bool:
        """True when this step's losses and gradient norm are finite; else the guard counts, logs and skips it.

        The values are averaged over processes first, so every process takes the same decision. With a gradient
        scaler (fp16) only the losses are checked: the scaler itself skips steps with inf/NaN gradients.
        """
        check = self.accumulator.loss_means()
        if grad_norm is not None:
            check["gradient"] = grad_norm.float()
        return self.nonfinite_guard.check(step, self.accumulator.decision.branch, self._reduce(check))

    def reset_optimizer(self) -> None:
        """Re-create the optimizer and LR scheduler (fresh state), e.g. at Sequential's switch."""
        replace_optimizers(self.trainer)

    def reset_reference(self) -> None:
        """Make the reference a frozen copy of the policy as it stands now (with LoRA: fold the adapters into the
        base weights, see :func:`~xright_pl.training.reference.reset_to_policy`)."""
        if self.reference_released:
            raise ConfigError("the reference model was released (precompute_reference_logps=True); it cannot be reset")
        if not self.needs_reference:
            return  # reference-free loss (simpo): there is no reference to reset
        if reset_to_policy(self.policy, self.reference, self.lora is not None):
            self._reference_reset = True
        self.reference_is_initial = False

    # ------------------------------------------------------------------ validation
    def on_validation_model_zero_grad(self) -> None:
        """Lightning frees the gradients before validating; not in the middle of gradient accumulation, where they
        are the half-accumulated gradients of the current optimizer step (``val_check_interval`` counts
        micro-batches)."""
        if self.accumulator.at_boundary:
            super().on_validation_model_zero_grad()

    def validation_objective(self, batch: Any, dataloader_idx: int = 0) -> Objective:
        """The objective a validation batch belongs to: by loader when the data module names its validation
        loaders (``val_names``), else the first objective that accepts the batch's type."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(dm, "val_names", None)
        if names and dataloader_idx < len(names) and names[dataloader_idx] in self.objectives:
            return self.objectives[names[dataloader_idx]]
        for objective in self.objectives.values():
            if objective.accepts(batch):
                return objective
        raise ConfigError(f"no objective of this module ({', '.join(self.objectives)}) takes a {type(batch).__name__}")

    def validation_prefix(self, dataloader_idx: int = 0) -> str:
        """The metric prefix of a validation loader: ``held_in`` for the data module's sample of training rows
        (``data.held_in``), else ``val``."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        prefixes = getattr(dm, "val_prefixes", None)
        return prefixes[dataloader_idx] if prefixes and dataloader_idx < len(prefixes) else "val"

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        objective = self.validation_objective(batch, dataloader_idx)
        prefix = self.validation_prefix(dataloader_idx)
        for key, (value, weight) in objective.validation_values(self, batch).items():
            key = _with_prefix(key, prefix)
            metric = self.val_metrics[_metric_key(key)]
            metric.update(value, weight)
            self.log(key, metric, on_epoch=True, add_dataloader_idx=False, prog_bar=key.endswith("_loss"))

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_finite_weights(self.policy, self.global_step)
        checkpoint["xright_pl"] = save_state(self, run_folders(self._trainer))
        drop_rebuilt_reference(self, checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_state(self, checkpoint)


#: The two-objective hooks a subclass may override (``objective(name)`` calls them when it does).
_OBJECTIVE_HOOKS = {"sft": "sft_objective", "dpo": "dpo_objective"}


#: Metric prefixes of validation: the held-out rows, and the held-in sample of training rows (``data.held_in``).
VALIDATION_PREFIXES = ("val", "held_in")


def _with_prefix(key: str, prefix: str) -> str:
    """A validation metric name (``val/...``) under ``prefix`` (``held_in/...``)."""
    return key if prefix == "val" else prefix + key[key.index("/") :]


def _metric_key(name: str) -> str:
    """A metric name as a ``ModuleDict`` key (no dots or slashes)."""
    return name.replace("/", "__").replace(".", "_")
