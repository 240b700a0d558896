"""Selectors: the algorithms that decide which objective each optimizer step trains.

A selector is a small :class:`~lightning.pytorch.callbacks.Callback` with its own seeded state and a
``state_dict``, so a resumed run continues the exact same sequence of decisions. The module asks it at
the first micro-batch of every optimizer step (see :meth:`xright_pl.XRightModule.training_step`):

1. :meth:`Selector.needs` names the objectives whose loss on the current batches it wants to see before
   deciding (MAXRIGHT on its evaluation steps; nothing for the others);
2. :meth:`Selector.decide` returns a :class:`Decision`: the weight of each objective in this step's
   backward pass (``{"dpo": 1.0}`` for a DPO step, ``{"sft": 1 - lam, "dpo": lam}`` for Mix) and whether
   the optimizer (and the DPO reference) must be re-created first;
3. after the optimizer step, :meth:`Selector.observe` receives the pre-update loss of each trained objective.

Every input to a decision is identical on every process (a generator seeded the same everywhere; losses
averaged across processes by the module before they reach the selector), so all ranks take the same branch
by construction. A new algorithm is a new subclass; the module does not change.

``lam`` is the weight of the DPO objective in the target ``lam * f_dpo + (1 - lam) * f_sft``. It belongs to
the module (``--model.lam``), which hands it to its selector with :meth:`Selector.bind`.
"""

from xright_pl.selectors.alright import Alright
from xright_pl.selectors.base import (
    CHECKPOINT_KEY,
    OBJECTIVES,
    Decision,
    Selector,
    StepContext,
    check_lam,
    check_weights,
    draw,
    selector_of,
)
from xright_pl.selectors.maxright import Maxright
from xright_pl.selectors.mix import Mix, Single
from xright_pl.selectors.sequential import Sequential

__all__ = [
    "Alright",
    "Maxright",
    "Sequential",
    "Mix",
    "Single",
    "Selector",
    "Decision",
    "StepContext",
    "OBJECTIVES",
    "CHECKPOINT_KEY",
    "check_lam",
    "check_weights",
    "draw",
    "selector_of",
]
