"""xright_pl: joint SFT + DPO post-training in PyTorch Lightning (ALRIGHT, MAXRIGHT, Sequential, Mix)."""

from xright_pl.callbacks import RunSummary
from xright_pl.checkpoint import XRightCheckpoint
from xright_pl.data.module import Batching, JointDataModule
from xright_pl.data.specs import PreferenceData, SFTData
from xright_pl.eval_callback import WinRateCallback
from xright_pl.export import ExportOnFitEnd
from xright_pl.metrics import TradeoffMetrics
from xright_pl.module import XRightModule
from xright_pl.progress import StepProgress
from xright_pl.selectors import Alright, Decision, Maxright, Mix, Selector, Sequential, Single
from xright_pl.signals import StopOnSignal
from xright_pl.trajectory import TrajectoryPlot

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
