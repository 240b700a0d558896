"""xright_pl: joint SFT + DPO post-training in PyTorch Lightning (ALRIGHT, MAXRIGHT, Sequential, Mix)."""

import xright_pl.core.moved  # noqa: F401  (keeps the old module paths of configs and checkpoints)
from xright_pl.callbacks.checkpoint import XRightCheckpoint
from xright_pl.callbacks.progress import StepProgress
from xright_pl.callbacks.signals import StopOnSignal
from xright_pl.callbacks.summary import RunSummary
from xright_pl.callbacks.trajectory import TrajectoryPlot
from xright_pl.callbacks.win_rate import WinRateCallback
from xright_pl.data.module import Batching, JointDataModule
from xright_pl.data.specs import PreferenceData, SFTData
from xright_pl.inference.export import ExportOnFitEnd
from xright_pl.selectors import Alright, Decision, Maxright, Mix, Selector, Sequential, Single
from xright_pl.training.metrics import TradeoffMetrics
from xright_pl.training.module import XRightModule

__version__ = "0.1.0.dev0"

__all__ = [
    "Alright",
    "Batching",
    "Decision",
    "ExportOnFitEnd",
    "JointDataModule",
    "Maxright",
    "Mix",
    "PreferenceData",
    "RunSummary",
    "SFTData",
    "Selector",
    "Sequential",
    "Single",
    "StepProgress",
    "StopOnSignal",
    "TradeoffMetrics",
    "TrajectoryPlot",
    "WinRateCallback",
    "XRightCheckpoint",
    "XRightModule",
]
