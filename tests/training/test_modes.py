"""Train/eval modes: the policy trains in train mode (dropout on) even when ``from_pretrained`` hands it over in
eval mode; validation runs in eval mode; the frozen reference never leaves eval mode."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import torch
from helpers import TINY_LLAMA, demo_data, trainer

from xright_pl import Alright, XRightModule


class ModeProbe(pl.Callback):
    """Records, at every training and validation batch, which of the policy's and reference's modules train."""

    def __init__(self) -> None:
        self.train_seen: list[tuple[int, int, int]] = []  # (policy modules training, policy modules, ref training)
        self.val_seen: list[tuple[int, int]] = []

    @staticmethod
    def _count(module: torch.nn.Module) -> tuple[int, int]:
        mods = list(module.modules())
        return sum(m.training for m in mods), len(mods)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        on, total = self._count(pl_module.policy)
        self.train_seen.append((on, total, self._count(pl_module.reference)[0]))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_seen.append((self._count(pl_module.policy)[0], self._count(pl_module.reference)[0]))


def _pretrained_with_dropout(folder) -> str:
    """A tiny Llama with attention dropout saved like a hub model: ``from_pretrained`` returns it in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_LLAMA)
    config = AutoConfig.for_model(cfg.pop("model_type"), attention_dropout=0.5, **cfg)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    assert not AutoModelForCausalLM.from_pretrained(folder).training  # the premise of the fix
    return str(folder)


def test_policy_trains_in_train_mode_reference_stays_eval(tmp_path):
    path = _pretrained_with_dropout(tmp_path / "model")
    module = XRightModule(
        model=path, selector=Alright(seed=0), lam=0.5, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3)
    )
    probe = ModeProbe()
    t = trainer(tmp_path, max_steps=4, callbacks=[probe], num_sanity_val_steps=1, val_check_interval=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(module, datamodule=demo_data(limit=32))
    assert len(probe.train_seen) == 4
    for on, total, ref_on in probe.train_seen:
        assert on == total, f"{total - on} of the policy's {total} modules were in eval mode during a training step"
        assert ref_on == 0, "the reference left eval mode"
    assert probe.val_seen and all(seen == (0, 0) for seen in probe.val_seen), probe.val_seen
    assert not [w for w in caught if "in eval mode at the start of training" in str(w.message)]


def test_dropout_is_active_in_training_steps(tmp_path):
    """The same batch gives two different training losses (dropout draws), and identical validation losses."""
    path = _pretrained_with_dropout(tmp_path / "model")
    module = XRightModule(model=path, selector=Alright(seed=0), lam=0.5, optimizer=lambda p: torch.optim.SGD(p, lr=0))
    module.configure_model()
    module._enter_training_modes()
    ids = torch.randint(0, 140, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    a, b = module.forward_logits(ids, mask), module.forward_logits(ids, mask)
    assert not torch.allclose(a, b)
    module.eval()
    assert torch.equal(module.forward_logits(ids, mask), module.forward_logits(ids, mask))
    assert not any(m.training for m in module.reference.modules())
