"""The module paths of the flat layout keep working: configs and checkpoints that name them still load."""

from __future__ import annotations

import importlib
import pickle

import pytest
import torch
import yaml
from helpers import REPO

import xright_pl
from xright_pl.callbacks.checkpoint import checkpoint_types
from xright_pl.commands.cli import run
from xright_pl.core.moved import ALIASES, RENAMED, old_names


@pytest.mark.parametrize("old", sorted(ALIASES))
def test_an_old_module_path_is_the_moved_module(old):
    assert importlib.import_module(old) is importlib.import_module(ALIASES[old])


def test_an_old_module_named_like_its_folder_is_re_exported_by_it():
    """``xright_pl.callbacks.RunSummary``, ``xright_pl.objectives.PreferenceObjective``, ``xright_pl.models....``"""
    folders = [old for old in RENAMED if old not in ALIASES]
    assert folders, "some old modules are folders now"
    for old in folders:
        folder, module = importlib.import_module(old), importlib.import_module(RENAMED[old])
        public = [
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and getattr(v, "__module__", "") == module.__name__
        ]
        assert public, old
        for name in public:
            assert getattr(folder, name) is getattr(module, name), f"{old}.{name}"


def test_a_pickled_class_path_of_an_old_module_loads():
    assert pickle.loads(b"cxright_pl.checkpoint\nXRightCheckpoint\n.") is xright_pl.XRightCheckpoint
    assert pickle.loads(b"cxright_pl.callbacks\nRunSummary\n.") is xright_pl.RunSummary


def test_a_checkpoint_naming_an_old_module_loads_with_weights_only(tmp_path, monkeypatch):
    """A checkpoint written before the move names ``xright_pl.lora.LoraSettings``: ``torch.load(weights_only=True)``
    with the library's allowed types still rebuilds it."""
    from xright_pl.models.lora import LoraSettings

    assert "xright_pl.lora.LoraSettings" in old_names(LoraSettings)
    settings = LoraSettings(r=4)
    with monkeypatch.context() as m:
        m.setattr(LoraSettings, "__module__", "xright_pl.lora")  # pickled as before the move
        torch.save({"hyper_parameters": {"lora": settings}}, tmp_path / "old.ckpt")
    assert b"xright_pl.lora" in (tmp_path / "old.ckpt").read_bytes()
    with torch.serialization.safe_globals(checkpoint_types()):
        loaded = torch.load(tmp_path / "old.ckpt", weights_only=True)
    assert loaded["hyper_parameters"]["lora"] == settings


def test_a_config_with_old_class_paths_parses(capsys):
    args = ["fit", "--config", str(REPO / "configs/demo.yaml"), "--print_config"]
    args += [
        "--trainer.callbacks+=xright_pl.checkpoint.XRightCheckpoint",
        "--model.selector",
        "xright_pl.selectors.Mix",
    ]
    with pytest.raises(SystemExit) as e:
        run(args)
    assert e.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert "xright_pl.checkpoint.XRightCheckpoint" in [c["class_path"] for c in cfg["trainer"]["callbacks"]]
    assert cfg["model"]["selector"]["class_path"] == "xright_pl.selectors.Mix"
