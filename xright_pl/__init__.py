"""xright_pl: joint SFT + DPO post-training in PyTorch Lightning (ALRIGHT, MAXRIGHT, Sequential, Mix)."""

from xright_pl.callbacks import RunSummary
from xright_pl.data.module import Batching, JointDataModule
from xright_pl.data.specs import PreferenceData, SFTData
from xright_pl.module import XRightModule
from xright_pl.selectors import Alright, Decision, Maxright, Mix, Selector, Sequential, Single

__version__ = "0.1.0.dev0"

__all__ = [
    "Alright",
    "Batching",
    "Decision",
    "JointDataModule",
    "Maxright",
    "Mix",
    "PreferenceData",
    "RunSummary",
    "SFTData",
    "Selector",
    "Sequential",
    "Single",
    "XRightModule",
]
