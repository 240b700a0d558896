"""Trade-off metrics: how far a run ends from the ideal point ``(f_sft*, f_dpo*)``.

For validation losses ``f_sft``, ``f_dpo`` and optima ``f_sft*``, ``f_dpo*`` (see :mod:`xright_pl.core.optimum`):

- ``sft_gap = f_sft - f_sft*`` and ``dpo_gap = f_dpo - f_dpo*`` (signed: a run may end below a
  single-objective run's final loss, which then shows as a negative gap);
- ``ideal_distance = sqrt(sft_gap**2 + dpo_gap**2)``, the Euclidean distance to the ideal point in the
  ``(f_sft, f_dpo)`` plane (the paper's measure of the trade-off).

:class:`TradeoffGap` is the torchmetrics form (weighted running means of both losses, then the gaps), usable in
any loop. :class:`TradeoffMetrics` is the callback that logs ``val/sft_gap``, ``val/dpo_gap`` and
``val/ideal_distance`` after every validation when the optima are known, so they also reach ``summary.json``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torchmetrics import Metric

from xright_pl.core.errors import ConfigError
from xright_pl.core.optimum import Optimum, OptimumK, given_optimum, load_optimum

log = logging.getLogger(__name__)

#: Names of the logged metrics.
GAP_KEYS = ("val/sft_gap", "val/dpo_gap", "val/ideal_distance")


class StepLogWindow:
    """Training values of the optimizer steps since the last write to the loggers.

    A joint run trains one objective per step, so a per-objective value (``train/sft_loss``, ``rewards/...``)
    exists only on some steps. Lightning's step logging would write the last value again at every logging step
    (a flat, stale line); this window writes, at each logging step, the mean of each value over the steps that
    produced it since the last write, and nothing for a value no step produced. Counters and the learning rate
    (keys starting with one of :attr:`LAST`) are written as their latest value.
    """

    LAST = ("steps/", "tokens/", "train/lr", "train/nonfinite_skips")

    def __init__(self) -> None:
        self.values: dict[str, list[Tensor | float]] = {}

    def add(self, logs: dict[str, Tensor | float]) -> None:
        for key, value in logs.items():
            self.values.setdefault(key, []).append(value.detach() if isinstance(value, Tensor) else value)

    def flush(self) -> dict[str, float]:
        """The window's values (means, or latest values for :attr:`LAST` keys), then an empty window."""
        out = {}
        for key, seq in self.values.items():
            if key.startswith(self.LAST):
                out[key] = float(seq[-1])
            else:
                out[key] = float(torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in seq]).mean())
        self.values = {}
        return out


def tradeoff_gaps(f_sft: float, f_dpo: float, f_sft_star: float, f_dpo_star: float) -> dict[str, float]:
    """``{"sft_gap", "dpo_gap", "ideal_distance"}`` of the point ``(f_sft, f_dpo)`` (pure function)."""
    return tradeoff_gaps_k({"sft": f_sft, "dpo": f_dpo}, {"sft": f_sft_star, "dpo": f_dpo_star})


class TradeoffGap(Metric):
    """Gaps to the optima of the weighted means of the SFT and DPO losses seen by :meth:`update`.

    ``update(sft_loss, dpo_loss, sft_weight, dpo_weight)`` accumulates each objective's loss weighted like the
    module's validation (token count for SFT, pair count for DPO; either loss may be None); ``compute()``
    returns ``{"sft_gap", "dpo_gap", "ideal_distance"}`` as 0-dim tensors. States are sums, so the metric
    synchronises across processes like ``MeanMetric``.

    Args:
        f_sft_star: optimum of the SFT loss.
        f_dpo_star: optimum of the DPO loss.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, f_sft_star: float, f_dpo_star: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, v in (("f_sft_star", f_sft_star), ("f_dpo_star", f_dpo_star)):
            if not math.isfinite(float(v)):
                raise ConfigError(f"{name} must be a finite number, got {v!r}")
        self.f_sft_star = float(f_sft_star)
        self.f_dpo_star = float(f_dpo_star)
        for name in ("sft_sum", "sft_weight", "dpo_sum", "dpo_weight"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        sft_loss: Tensor | float | None = None,
        dpo_loss: Tensor | float | None = None,
        sft_weight: Tensor | float = 1.0,
        dpo_weight: Tensor | float = 1.0,
    ) -> None:
        if sft_loss is not None:
            w = torch.as_tensor(sft_weight, dtype=torch.float64, device=self.device)
            self.sft_sum += torch.as_tensor(sft_loss, dtype=torch.float64, device=self.device) * w
            self.sft_weight += w
        if dpo_loss is not None:
            w = torch.as_tensor(dpo_weight, dtype=torch.float64, device=self.device)
            self.dpo_sum += torch.as_tensor(dpo_loss, dtype=torch.float64, device=self.device) * w
            self.dpo_weight += w

    def compute(self) -> dict[str, Tensor]:
        if self.sft_weight <= 0 or self.dpo_weight <= 0:
            raise ValueError("TradeoffGap.compute() needs at least one SFT and one DPO loss with weight > 0")
        sft_gap = self.sft_sum / self.sft_weight - self.f_sft_star
        dpo_gap = self.dpo_sum / self.dpo_weight - self.f_dpo_star
        return {
            "sft_gap": sft_gap.float(),
            "dpo_gap": dpo_gap.float(),
            "ideal_distance": torch.sqrt(sft_gap**2 + dpo_gap**2).float(),
        }


def tradeoff_gaps_k(losses: dict[str, float], f_star: dict[str, float]) -> dict[str, float]:
    """``{"{name}_gap": f_k - f_k*, ..., "ideal_distance": sqrt(sum of squared gaps)}`` over the objectives of
    ``losses`` (each must have an optimum in ``f_star``); for the pair the same numbers as :func:`tradeoff_gaps`."""
    gaps = {f"{k}_gap": float(v) - float(f_star[k]) for k, v in losses.items()}
    return {**gaps, "ideal_distance": math.hypot(*gaps.values())}


def optimum_of(trainer: pl.Trainer) -> Optimum | None:
    """The SFT/DPO pair's optima known to this run: the module's ``optimum`` (see :class:`TradeoffMetrics`) when it is
    the pair's, else None (an online estimate does not count)."""
    found = getattr(trainer.lightning_module, "optimum", None)
    return found if isinstance(found, Optimum) else None


class TradeoffMetrics(Callback):
    """Log ``val/sft_gap``, ``val/dpo_gap`` and ``val/ideal_distance`` after every validation.

    The optima come from ``optimum_file`` (written by ``python -m xright_pl optimum``), or from
    ``f_sft_star`` and ``f_dpo_star``, or else from the module's ``optimum`` (``XRightModule.optimum``: a MAXRIGHT
    selector given its optima); with none of these nothing is logged. Given optima of its own, the callback makes
    them the module's ``optimum`` for the run, which the trajectory plot reads. The gaps are computed from the
    epoch values of ``val/sft_loss`` and ``val/dpo_loss`` (already averaged over processes), written to the loggers
    at the current step and added to ``trainer.callback_metrics``, so :class:`~xright_pl.RunSummary` puts
    them in ``summary.json``.

    Args:
        optimum_file: JSON file from ``python -m xright_pl optimum``: the pair's ``f_sft_star`` and
            ``f_dpo_star``, or (from ``--datasets_config`` (``data.datasets``)) every data set's ``f_star``.
        f_sft_star: optimum of the SFT loss (instead of a file).
        f_dpo_star: optimum of the DPO loss (instead of a file).
        f_star: the optima of any number of objectives, ``{name: f_k*}``: logs ``val/{name}_gap`` for each and
            ``val/ideal_distance`` (Euclidean over all of them). Without it, a MAXRIGHT selector's ``f_star``.
    """

    def __init__(
        self,
        optimum_file: str | None = None,
        f_sft_star: float | None = None,
        f_dpo_star: float | None = None,
        f_star: dict[str, float] | None = None,
    ) -> None:
        given = (f_sft_star is not None, f_dpo_star is not None)
        if f_star is not None and (optimum_file is not None or any(given)):
            raise ConfigError("TradeoffMetrics: give f_star or the pair's optima, not both.")
        self._own_star = {str(k): float(v) for k, v in f_star.items()} if f_star else None
        self.f_star: dict[str, float] | None = self._own_star
        if optimum_file is not None and any(given):
            raise ConfigError("TradeoffMetrics: give optimum_file or f_sft_star and f_dpo_star, not both.")
        if any(given) and not all(given):
            raise ConfigError("TradeoffMetrics needs both f_sft_star and f_dpo_star (or an optimum_file).")
        self.optimum_file = optimum_file
        self._own: Optimum | None = None
        #: A named objectives' optimum file (its ``f_star`` is used); None otherwise.
        self.optimum_k: OptimumK | None = None
        self._own_k: OptimumK | None = None
        if optimum_file is not None:
            loaded = load_optimum(optimum_file)
            if isinstance(loaded, OptimumK):
                self.optimum_k = self._own_k = loaded
                self._own_star = self.f_star = dict(loaded.f_star)
            else:
                self._own = loaded
        elif all(given):
            self._own = Optimum(float(f_sft_star), float(f_dpo_star))
        self.optimum: Optimum | None = self._own
        self.last: dict[str, float] = {}
        self._beaten: set[str] = set()  # objectives whose f* a validation went below (warned once)

    def given(self) -> Optimum | OptimumK | None:
        """The optima this callback was given (a file, the pair's numbers or ``f_star``), else None."""
        return given_optimum(self._own, self._own_k, self._own_star)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the module this callback's optima, or read the module's (its selector's given optima)."""
        given = self.given()
        if given is not None and hasattr(pl_module, "optimum"):
            pl_module.optimum = given  # the run's optimum has one owner, the module, which the plot reads
        found = given if given is not None else getattr(pl_module, "optimum", None)
        self.optimum = found if isinstance(found, Optimum) else None
        self.f_star = dict(found.f_star) if isinstance(found, OptimumK) else None
        self.optimum_k = found if isinstance(found, OptimumK) and found.source != "arguments" else None
        if found is not None and hasattr(pl_module, "beta"):
            found.check_beta(pl_module.beta)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        given = self.given()
        if given is not None and getattr(pl_module, "optimum", None) is given:
            pl_module.optimum = None  # a later fit of the module without this callback does not keep them

    def check_objectives(self, pl_module: pl.LightningModule) -> None:
        """Refuse optima of its own (a file, the pair's numbers or ``f_star``) that miss an objective of the run."""
        names = list(getattr(pl_module, "objectives", None) or ())
        if not names:
            return
        if self._own is not None:
            have = {"sft", "dpo"}
            how = f"the SFT/DPO pair's optima ({self._own.source})"
        elif self._own_star is not None:
            have = set(self._own_star)
            how = f"optima of {', '.join(self._own_star)}" + (f" ({self.optimum_k.source})" if self.optimum_k else "")
        else:
            return
        missing = [k for k in names if k not in have]
        if missing:
            raise ConfigError(
                f"TradeoffMetrics has no optimum for {', '.join(missing)}: it was given {how}, and this run's"
                f" objectives are {', '.join(names)}. Give --tradeoff.f_star with one value per objective, or"
                " --tradeoff.optimum_file measured for them (`python -m xright_pl optimum --datasets_config CONFIG`"
                " runs a Single fit per data set of CONFIG's data.datasets), or --tradeoff.optimum_file null."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_objectives(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_objectives(pl_module)

    def _log_star_gaps(self, trainer: pl.Trainer) -> None:
        """K objectives: ``val/{name}_gap`` for each objective with an optimum, and their Euclidean norm."""
        metrics = trainer.callback_metrics
        losses = {k: float(metrics[f"val/{k}_loss"]) for k in self.f_star if f"val/{k}_loss" in metrics}
        if not losses:
            return
        gaps = tradeoff_gaps_k(losses, self.f_star)
        self.last = {f"val/{k}": v for k, v in gaps.items()}
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in self.last.items()})
        self._warn_below(losses, self.f_star)
        self._log_last(trainer)

    def _warn_below(self, losses: dict[str, float], f_star: dict[str, float]) -> None:
        """Warn once per objective whose validation loss went below its optimum (f* too high for this run)."""
        source = self.optimum.source if self.optimum is not None else self.optimum_k.source if self.optimum_k else None
        for name, loss in losses.items():
            if loss < f_star[name] and name not in self._beaten:
                self._beaten.add(name)
                log.warning(
                    "val/%s_loss %.4g is below f_%s* = %.4g (%s): f* is not the optimum for this data and budget, and"
                    " val/ideal_distance now also grows the further the run gets below it. Re-estimate f* (longer"
                    " single-objective runs, or the lowest value any run reached) before comparing distances.",
                    name, loss, name, f_star[name], source or "f_star",
                )  # fmt: skip

    def _log_last(self, trainer: pl.Trainer) -> None:
        """Write ``self.last`` to the loggers at the step index of Lightning's own validation logs."""
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.last, step=max(trainer.global_step - 1, 0))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self.f_star is not None:
            return self._log_star_gaps(trainer)
        if self.optimum is None:
            return
        metrics = trainer.callback_metrics
        if "val/sft_loss" not in metrics or "val/dpo_loss" not in metrics:
            return
        gap = TradeoffGap(self.optimum.f_sft, self.optimum.f_dpo, sync_on_compute=False)
        gap.update(metrics["val/sft_loss"].cpu(), metrics["val/dpo_loss"].cpu())
        values = {f"val/{k}": v for k, v in gap.compute().items()}
        self.last = {k: float(v) for k, v in values.items()}
        trainer.callback_metrics.update(values)
        pair_star = {"sft": self.optimum.f_sft, "dpo": self.optimum.f_dpo}
        self._warn_below({k: float(metrics[f"val/{k}_loss"]) for k in pair_star}, pair_star)
        self._log_last(trainer)

    def summary_fields(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Fields for ``summary.json``: the optima used and where they came from."""
        if self.f_star is not None:
            return {"f_star": dict(self.f_star), **({"optimum": self.optimum_k.source} if self.optimum_k else {})}
        if self.optimum is None:
            return {}
        return {"f_sft_star": self.optimum.f_sft, "f_dpo_star": self.optimum.f_dpo, "optimum": self.optimum.source}
