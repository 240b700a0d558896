"""The run's path in the ``(f_sft, f_dpo)`` plane: start, every validation, end, and the ideal point.

:class:`TrajectoryPlot` records ``(step, val/sft_loss, val/dpo_loss)`` after every validation (and, by default,
once before the first step), logs the picture to TensorBoard as a figure (``tradeoff/trajectory``) at each
validation, and saves it as a PNG next to ``summary.json`` when training ends. The ideal point
``(f_sft*, f_dpo*)`` is drawn when the optima are known (see :func:`xright_pl.training.metrics.optimum_of`).

matplotlib is an optional extra (``pip install xright_pl[plot]``): without it the callback records the points,
logs one note and draws nothing.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from xright_pl.core.optimum import Optimum
from xright_pl.selectors import selector_of
from xright_pl.training.distributed import agree_run_dir, run_dir
from xright_pl.training.metrics import optimum_of

log = logging.getLogger(__name__)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _limited(loader: Any, limit: int | float) -> Any:
    """The first batches of ``loader`` as ``Trainer(limit_val_batches=limit)`` would take them."""
    if isinstance(limit, float) and limit >= 1.0:
        yield from loader
        return
    n = int(limit) if isinstance(limit, int) else max(1, math.ceil(limit * len(loader)))
    for i, batch in enumerate(loader):
        if i >= n:
            return
        yield batch


@torch.no_grad()
def evaluate_losses(trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str = "val") -> dict[str, float]:
    """``{"sft": ..., "dpo": ...}``: the validation losses of the module as it stands, computed exactly like
    its ``validation_step`` (token-mean SFT NLL, pair-mean DPO loss) on the datamodule's validation loaders of
    ``prefix`` (``val``: the held-out rows; ``held_in``: the sample of training rows of ``data.held_in``),
    honouring ``limit_val_batches``, and averaged over processes."""
    dm = trainer.datamodule
    loaders = dm.val_dataloader() if dm is not None else trainer.val_dataloaders
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    prefixes = getattr(dm, "val_prefixes", None) or ["val"] * len(loaders)
    means: dict[str, MeanMetric] = {}
    was_training = pl_module.training
    pl_module.eval()
    try:
        for idx, loader in enumerate(loaders):
            if prefixes[idx] != prefix:
                continue
            for batch in _limited(loader, trainer.limit_val_batches):
                batch = trainer.strategy.batch_to_device(batch)
                objective = pl_module.validation_objective(batch, idx)
                value, weight = objective.validation_values(pl_module, batch)[f"val/{objective.name}_loss"]
                if objective.name not in means:
                    means[objective.name] = MeanMetric().to(pl_module.device)
                means[objective.name].update(value, weight)
    finally:
        pl_module.train(was_training)
    return {k: float(m.compute()) for k, m in means.items() if m.update_count > 0}


def _readable_scale(ax: Any, which: str, values: list[float]) -> None:
    """Log scale on axis ``which`` when ``values`` span more than a decade, with numbers at 1, 2 and 5 times each
    power of ten (a log axis labels only the powers, often one or none in the range); linear otherwise."""
    if not values or min(values) <= 0 or max(values) / min(values) <= 10:
        return
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_trajectory(
    points: list[tuple[int, float, float]],
    optimum: Optimum | None = None,
    title: str = "",
    axes: tuple[str, str] = ("sft", "dpo"),
) -> Any:
    """A matplotlib ``Figure`` of the path ``points`` (``(step, f_x, f_y)``, by default ``f_sft, f_dpo``) with its
    start, its end and the ideal point ``(f_sft*, f_dpo*)`` when given. Needs matplotlib."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 4.2), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    xs = [p[1] for p in points]
    ys = [p[2] for p in points]
    if points:
        ax.plot(xs, ys, "-o", color="tab:blue", ms=3, lw=1.2, label="validation")
        ax.plot(xs[0], ys[0], "s", color="tab:gray", ms=8, label=f"start (step {points[0][0]})")
        ax.plot(xs[-1], ys[-1], "D", color="tab:blue", ms=8, label=f"end (step {points[-1][0]})")
    if optimum is not None:
        ax.plot(optimum.f_sft, optimum.f_dpo, "*", color="tab:red", ms=14, label="ideal (f_sft*, f_dpo*)")
    if points and (optimum is not None or len(points) > 1):
        # A log axis keeps the start (often 10x the end) and the ideal point readable in one picture; each axis
        # decides for itself, so that one spanning less than a decade stays linear (a log axis there has no labels).
        extra = (optimum.f_sft, optimum.f_dpo) if optimum is not None else (None, None)
        _readable_scale(ax, "x", xs + [v for v in extra[:1] if v is not None])
        _readable_scale(ax, "y", ys + [v for v in extra[1:] if v is not None])
    ax.set_xlabel(f"f_{axes[0]} (val/{axes[0]}_loss)")
    ax.set_ylabel(f"f_{axes[1]} (val/{axes[1]}_loss)")
    ax.set_title(title or "trade-off trajectory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


class TrajectoryPlot(Callback):
    """Record and draw the run's path in the ``(f_sft, f_dpo)`` plane.

    Args:
        enabled: record and draw (false: do nothing at all).
        evaluate_start: evaluate the validation losses once before the first step (one extra validation pass,
            outside the training steps) so that the picture has its start point; otherwise the path starts at
            the first validation.
        filename: PNG written next to ``summary.json`` (in the run's log directory) at the end of training.
        log_figure: log the figure to TensorBoard (``tradeoff/trajectory``) after every validation.
        axes: the two objectives on the x and y axes (with ``data.datasets``, two data set names, e.g.
            ``[terse, prefs]``); the ideal point is drawn for the default ``[sft, dpo]`` only.
    """

    def __init__(
        self,
        enabled: bool = True,
        evaluate_start: bool = True,
        filename: str = "trajectory.png",
        log_figure: bool = True,
        axes: tuple[str, str] = ("sft", "dpo"),
    ) -> None:
        if len(axes) != 2 or axes[0] == axes[1]:
            raise ValueError(f"TrajectoryPlot axes must be two different objective names, got {axes!r}")
        self.axes = (str(axes[0]), str(axes[1]))
        self.enabled = enabled
        self.evaluate_start = evaluate_start
        self.filename = filename
        self.log_figure = log_figure
        self.points: list[tuple[int, float, float]] = []
        #: The same path on the held-in sample of training rows (``data.held_in``; empty without it).
        self.held_in_points: list[tuple[int, float, float]] = []
        self.png_path: str | None = None
        self._noted = False

    @property
    def state_key(self) -> str:
        return "xright_pl.TrajectoryPlot"

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"points": [list(p) for p in self.points]}
        if self.held_in_points:
            out["held_in_points"] = [list(p) for p in self.held_in_points]
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = [(int(s), float(a), float(b)) for s, a, b in state_dict.get("points", [])]
        self.held_in_points = [(int(s), float(a), float(b)) for s, a, b in state_dict.get("held_in_points", [])]

    def _can_draw(self) -> bool:
        if have_matplotlib():
            return True
        if not self._noted:
            rank_zero_info("TrajectoryPlot: matplotlib is not installed (pip install xright_pl[plot]); no figure.")
            self._noted = True
        return False

    def _optimum(self, trainer: pl.Trainer) -> Optimum | None:
        return optimum_of(trainer) if self.axes == ("sft", "dpo") else None

    def _title(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        sel = selector_of(pl_module)
        target = pl_module.target() if hasattr(pl_module, "target") else getattr(pl_module, "lam", "?")
        weights = ", ".join(f"{k}={v:g}" for k, v in target.items()) if isinstance(target, dict) else f"lam={target}"
        return f"{sel.describe() if sel else 'run'}, {weights}"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        agree_run_dir(trainer)  # every process: on_train_end draws on rank 0 only, which must not broadcast

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.enabled and self.evaluate_start) or trainer.global_step != 0 or self.points:
            return
        if trainer.limit_val_batches == 0:
            return
        x, y = self.axes
        prefixes = getattr(trainer.datamodule, "val_prefixes", None) or []
        for prefix, points in (("val", self.points), ("held_in", self.held_in_points)):
            if prefix != "val" and prefix not in prefixes:
                continue
            losses = evaluate_losses(trainer, pl_module, prefix)
            if x in losses and y in losses:
                points.append((0, losses[x], losses[y]))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        for prefix, points in (("held_in", self.held_in_points), ("val", self.points)):
            x, y = (f"{prefix}/{name}_loss" for name in self.axes)
            if x not in m or y not in m:
                continue
            point = (int(trainer.global_step), float(m[x]), float(m[y]))
            if points and points[-1][0] == point[0]:
                points[-1] = point
            else:
                points.append(point)
        x, y = (f"val/{name}_loss" for name in self.axes)
        if x not in m or y not in m:
            return
        if not (self.log_figure and trainer.is_global_zero):
            return
        experiments = [lg.experiment for lg in trainer.loggers if hasattr(lg.experiment, "add_figure")]
        if experiments and self._can_draw():
            fig = plot_trajectory(self.points, self._optimum(trainer), self._title(trainer, pl_module), self.axes)
            for ex in experiments:
                ex.add_figure("tradeoff/trajectory", fig, global_step=trainer.global_step, close=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero or not self.points or not self._can_draw():
            return
        folder = run_dir(trainer)  # rank 0 only here: no collective (Trainer.log_dir broadcasts)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, self.filename)
        fig = plot_trajectory(self.points, self._optimum(trainer), self._title(trainer, pl_module), self.axes)
        fig.savefig(path)
        self.png_path = path

    def summary_fields(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Fields for ``summary.json``: the PNG's path (None when none was drawn) and the recorded points
        ``[step, f_sft, f_dpo]`` (the start point first when ``evaluate_start``), so the path can be read without
        the picture; with ``data.held_in`` also ``trajectory_held_in``, the same path on the held-in sample."""
        if not self.enabled:
            return {}
        out = {"trajectory_png": self.png_path, "trajectory": [list(p) for p in self.points]}
        if self.held_in_points:
            out["trajectory_held_in"] = [list(p) for p in self.held_in_points]
        return out
