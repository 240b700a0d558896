"""Finding f*: the optimum file, the `optimum` command, MAXRIGHT reading it, and MAXRIGHT's online estimate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import REPO, demo_data, tiny_module, trainer
from lightning.pytorch.callbacks import Callback

from xright_pl import Maxright, TradeoffMetrics
from xright_pl.commands.cli import run
from xright_pl.core.assets import resolve
from xright_pl.core.errors import ConfigError
from xright_pl.core.optimum import (
    Optimum,
    OptimumK,
    load_optimum,
    optimum_from_summaries,
    optimum_k_from_summaries,
    write_optimum,
)

TINY = [
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.callbacks=[]",
    "trainer.logger=false",
    "trainer.enable_checkpointing=false",
    "trajectory.enabled=false",
    "summary.print_table=false",
    "data.sft.limit=64",
    "data.preference.limit=64",
]


def _summary(path, **fields):
    path.parent.mkdir(parents=True, exist_ok=True)
    base = {"selector": "sft_only", "val/sft_loss": 0.5, "val/dpo_loss": 3.0, "optimizer_steps": 10}
    path.write_text(json.dumps({**base, **fields}))
    return path


def test_file_round_trip_and_errors(tmp_path):
    p = write_optimum(Optimum(0.39, 0.17, beta=0.1, sources={"sft": {"x": 1}}), tmp_path / "a" / "opt.json")
    o = load_optimum(p)
    assert (o.f_sft, o.f_dpo, o.beta, o.source, o.sources) == (0.39, 0.17, 0.1, str(p), {"sft": {"x": 1}})
    with pytest.raises(ConfigError, match=r"not found.*python -m xright_pl optimum"):
        load_optimum(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"f_sft_star": "low", "f_dpo_star": NaN}')
    with pytest.raises(ConfigError, match=r"bad.json.*'f_sft_star' must be a finite number.*'f_dpo_star'"):
        load_optimum(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_optimum(tmp_path / "broken.json")


def test_optimum_from_summaries_checks_its_inputs(tmp_path):
    sft = _summary(tmp_path / "s" / "summary.json")
    dpo = _summary(tmp_path / "d" / "summary.json", selector="dpo_only", **{"val/dpo_loss": 0.2})
    o = optimum_from_summaries(sft, dpo)
    assert (o.f_sft, o.f_dpo) == (0.5, 0.2)  # each from its own single-objective run
    alright = _summary(tmp_path / "a" / "summary.json", selector="alright(seed=0)")
    with pytest.raises(ConfigError, match="must come from a 'sft_only' run"):
        optimum_from_summaries(alright, dpo)
    short = _summary(tmp_path / "d2" / "summary.json", selector="dpo_only", optimizer_steps=5)
    with pytest.raises(ConfigError, match="same budget"):
        optimum_from_summaries(sft, short)
    no_val = _summary(tmp_path / "d3" / "summary.json", selector="dpo_only", **{"val/dpo_loss": None})
    with pytest.raises(ConfigError, match="no finite 'val/dpo_loss'"):
        optimum_from_summaries(sft, no_val)


def test_optimum_command_runs_both_fits_and_maxright_reads_the_file(tmp_path, monkeypatch):
    """The command runs an SFT-only and a DPO-only fit of the demo config and writes their final validation
    losses; a second call from their summaries writes the same numbers."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "optimum.json"
    result = run(["optimum", "--out", str(out), "--workdir", str(tmp_path / "w"), "--overrides", json.dumps(TINY)])
    sft_summary = json.loads((tmp_path / "w" / "sft_only" / "summary.json").read_text())
    dpo_summary = json.loads((tmp_path / "w" / "dpo_only" / "summary.json").read_text())
    assert sft_summary["steps/sft"] == 3 and sft_summary["steps/dpo"] == 0
    assert dpo_summary["steps/dpo"] == 3 and dpo_summary["steps/sft"] == 0
    data = json.loads(out.read_text())
    assert data["f_sft_star"] == sft_summary["val/sft_loss"]
    assert data["f_dpo_star"] == dpo_summary["val/dpo_loss"]
    assert data["beta"] == 0.1 and data["sources"]["sft"]["config"] == "builtin:configs/demo/sft_only.yaml"
    assert result["path"] == str(out)
    again = tmp_path / "again.json"
    run(
        [
            "optimum",
            "--out",
            str(again),
            "--sft_summary",
            str(tmp_path / "w" / "sft_only" / "summary.json"),
            "--dpo_summary",
            str(tmp_path / "w" / "dpo_only" / "summary.json"),
        ]
    )
    assert json.loads(again.read_text())["f_sft_star"] == data["f_sft_star"]
    sel = Maxright(optimum_file=str(out))
    assert not sel.online and sel.f_star == {"sft": data["f_sft_star"], "dpo": data["f_dpo_star"]}


@pytest.mark.parametrize("name", ["sft_only.yaml", "dpo_only.yaml"])
def test_packaged_default_configs_are_the_repositorys(name):
    """Issue 11 (9): the command's default configs ship in the package; they are the repository's
    configs/demo files byte for byte (edit both together)."""
    packaged = resolve(f"builtin:configs/demo/{name}")
    assert packaged.startswith(str(REPO / "xright_pl" / "assets"))
    assert open(packaged, "rb").read() == (REPO / "configs" / "demo" / name).read_bytes()


def test_optimum_command_defaults_work_from_any_folder(tmp_path, monkeypatch):
    """Issue 11 (9): from a folder without configs/ the default configs resolve to the packaged ones and the
    two (tiny) fits run; a missing config given by hand is a clear error naming the option."""
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / "configs").exists()
    result = run(["optimum", "--out", "opt.json", "--workdir", "w", "--overrides", json.dumps(TINY)])
    assert result["sources"]["sft"]["config"] == "builtin:configs/demo/sft_only.yaml"
    assert result["sources"]["dpo"]["config"] == "builtin:configs/demo/dpo_only.yaml"
    for single in ("sft_only", "dpo_only"):
        assert json.loads((tmp_path / "w" / single / "summary.json").read_text())["selector"] == single
    assert load_optimum(tmp_path / "opt.json").beta == 0.1
    with pytest.raises(ConfigError, match=r"sft_config 'configs/demo/sft_only.yaml' not found.*builtin:configs"):
        run(["optimum", "--sft_config", "configs/demo/sft_only.yaml", "--overrides", json.dumps(TINY)])


def test_committed_demo_optimum_matches_the_demo_configs():
    """builtin:demo/optimum.json was written by the command from the 600-step single-objective demo configs."""
    o = load_optimum("builtin:demo/optimum.json")
    assert o.sources["sft"]["config"] == "configs/demo/sft_only.yaml"
    assert o.sources["dpo"]["config"] == "configs/demo/dpo_only.yaml"
    assert o.sources["sft"]["optimizer_steps"] == o.sources["dpo"]["optimizer_steps"] == 600
    assert 0 < o.f_sft < 5 and 0 < o.f_dpo < math.log(2) + 1e-6  # below the untrained DPO loss log 2


def test_maxright_settings():
    with pytest.raises(ValueError, match="not both"):
        Maxright(f_sft_star=1.0, f_dpo_star=0.1, optimum_file="x.json")
    with pytest.raises(ValueError, match="online_margin"):
        Maxright(online_margin=1.0)
    assert Maxright().online and "online" in Maxright().describe()
    assert not Maxright(f_sft_star=1.0, f_dpo_star=0.1).online


def test_online_estimate_is_the_margined_running_min_of_validation_losses():
    """f_i* = (1 - margin) * min over validations of val_i; 0 before any validation.

    lam = 0.5, tracked batch losses f = (sft 1.0, dpo 0.8):
    - no validation yet: f* = (0, 0); gaps 0.5 * 1.0 = 0.5 vs 0.5 * 0.8 = 0.4 -> SFT step;
    - validation (0.9, 0.3), margin 0.1: f* = (0.81, 0.27); gaps 0.5 * 0.19 = 0.095 vs 0.5 * 0.53 = 0.265 -> DPO;
    - validation (1.2, 0.2): minima (0.9, 0.2) -> f* = (0.81, 0.18).
    """
    sel = Maxright(eval_every=1, online_margin=0.1).bind(0.5)
    assert sel.f_star == {"sft": 0.0, "dpo": 0.0}
    assert sel.decide(0, {"sft": 1.0, "dpo": 0.8}).branch == "sft"
    sel.observe_validation({"sft": 0.9, "dpo": 0.3})
    assert sel.f_star == pytest.approx({"sft": 0.81, "dpo": 0.27})
    assert sel.gaps() == pytest.approx({"sft": 0.095, "dpo": 0.265})
    assert sel.decide(1, {"sft": 1.0, "dpo": 0.8}).branch == "dpo"
    sel.observe_validation({"sft": 1.2, "dpo": 0.2})
    assert sel.f_star == pytest.approx({"sft": 0.81, "dpo": 0.18})
    restored = Maxright(eval_every=1, online_margin=0.1).bind(0.5)
    restored.load_state_dict(sel.state_dict())
    assert restored.f_star == sel.f_star and restored.values == sel.values


class ValRecorder(Callback):
    def __init__(self):
        self.points = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            m = trainer.callback_metrics
            self.points.append({"sft": float(m["val/sft_loss"]), "dpo": float(m["val/dpo_loss"])})


def test_online_estimate_in_a_run_is_the_margined_min_of_the_logged_validations(tmp_path):
    sel = Maxright(eval_every=2)
    rec = ValRecorder()
    t = trainer(tmp_path, 6, callbacks=[sel, rec], val_check_interval=2)
    t.fit(tiny_module(), datamodule=demo_data(limit=64))
    assert len(rec.points) == 3  # steps 2, 4, 6
    for k in ("sft", "dpo"):
        assert sel.val_min[k] == pytest.approx(min(p[k] for p in rec.points))
        assert sel.f_star[k] == pytest.approx(0.9 * min(p[k] for p in rec.points))


# ---------------------------------------------------------------------------------------------- K objectives

K_CONFIG = REPO / "configs" / "demo" / "three_objectives.yaml"
WEIGHTS = {"terse": 0.3, "polite": 0.2, "prefs": 0.5}
#: TINY without the pair's data limits (the three data sets are small already).
K_TINY = [o for o in TINY if not o.startswith(("data.sft", "data.preference"))]


def test_k_file_round_trip_errors_and_the_pair_file_unchanged(tmp_path):
    """A K file holds f_star by name; a pair file keeps exactly its old keys; bad K files list every problem."""
    k = OptimumK({"terse": 0.5, "prefs": 0.2}, beta=0.1, sources={"terse": {"x": 1}})
    p = write_optimum(k, tmp_path / "k.json")
    assert json.loads(p.read_text()) == {"f_star": {"terse": 0.5, "prefs": 0.2}, "beta": 0.1, "sources": k.sources}
    o = load_optimum(p)
    assert isinstance(o, OptimumK) and (o.f_star, o.beta, o.source) == (k.f_star, 0.1, str(p))
    pair = write_optimum(Optimum(0.39, 0.17, beta=0.1), tmp_path / "pair.json")
    assert set(json.loads(pair.read_text())) == {"f_sft_star", "f_dpo_star", "beta", "sources"}
    assert isinstance(load_optimum(pair), Optimum)
    (tmp_path / "bad.json").write_text('{"f_star": {"a": "low", "b": Infinity}, "beta": -1}')
    with pytest.raises(ConfigError, match=r"f_star\['a'\] must be a finite.*f_star\['b'\].*'beta' must be"):
        load_optimum(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text('{"f_star": {}}')
    with pytest.raises(ConfigError, match="non-empty mapping"):
        load_optimum(tmp_path / "empty.json")
    with pytest.raises(ConfigError, match=r"beta=0.1, but this run uses beta=0.2.*optimum --datasets_config"):
        o.check_beta(0.2)


def test_optimum_k_from_summaries_checks_budget_and_records_beta_only_for_preference_sets(tmp_path):
    terse = _summary(tmp_path / "t" / "summary.json", selector="terse_only", **{"val/terse_loss": 0.6})
    pref_fields = {"val/prefs_loss": 0.3, "val/prefs_rewards_accuracies": 1.0}  # logged by preference sets only
    prefs = _summary(tmp_path / "p" / "summary.json", selector="prefs_only", **pref_fields)
    o = optimum_k_from_summaries({"terse": terse, "prefs": prefs}, beta=0.1)
    assert (o.f_star, o.beta) == ({"terse": 0.6, "prefs": 0.3}, 0.1)
    assert optimum_k_from_summaries({"terse": terse}, beta=0.1).beta is None  # no preference set measured
    with pytest.raises(ConfigError, match="must come from a 'polite_only' run"):
        optimum_k_from_summaries({"polite": terse})
    short = _summary(tmp_path / "s" / "summary.json", selector="prefs_only", optimizer_steps=5, **{"val/prefs_loss": 1})
    with pytest.raises(ConfigError, match=r"different numbers of optimizer steps \(terse 10, prefs 5\)"):
        optimum_k_from_summaries({"terse": terse, "prefs": short})


def test_optimum_command_runs_one_single_fit_per_data_set_and_maxright_uses_the_file(tmp_path, monkeypatch):
    """`optimum --datasets_config three_objectives.yaml` runs Single(terse), Single(polite) and Single(prefs) from the
    same start for 3 steps each and writes each run's final val/{name}_loss; reading their summaries writes the same
    numbers; a MAXRIGHT run with the file logs val/{name}_gap = val/{name}_loss - f_star[name] for each."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "optimum_k.json"
    args = ["optimum", "--datasets_config", str(K_CONFIG), "--out", str(out), "--workdir", str(tmp_path / "w")]
    result = run([*args, "--overrides", json.dumps(K_TINY)])
    data = json.loads(out.read_text())
    assert set(data) == {"f_star", "beta", "sources"} and result["path"] == str(out)
    summaries = {}
    for name in WEIGHTS:
        summaries[name] = str(tmp_path / "w" / f"{name}_only" / "summary.json")
        s = json.loads(Path(summaries[name]).read_text())
        assert s["selector"] == f"{name}_only" and s["optimizer_steps"] == 3
        assert {k: s[f"steps/{k}"] for k in WEIGHTS} == {k: 3 if k == name else 0 for k in WEIGHTS}
        assert data["f_star"][name] == s[f"val/{name}_loss"]
        assert data["sources"][name]["config"] == str(K_CONFIG)
    assert list(data["f_star"]) == list(WEIGHTS) and data["beta"] == 0.1
    again = run(["optimum", "--out", str(tmp_path / "again.json"), "--summaries", json.dumps(summaries)])
    assert again["f_star"] == data["f_star"]

    sel = Maxright(optimum_file=str(out))
    assert not sel.online and sel.f_star == data["f_star"]
    root = tmp_path / "maxright"
    run(["fit", "--config", str(K_CONFIG), "--trainer.default_root_dir", str(root), "--trainer.max_steps", "4",
         "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar",
         "false", "--model.selector", "xright_pl.Maxright", "--model.selector.init_args.optimum_file", str(out),
         "--model.selector.init_args.eval_every", "1"])  # fmt: skip
    s = json.loads(sorted(root.rglob("summary.json"))[-1].read_text())
    assert s["f_star"] == data["f_star"]
    for name, star in data["f_star"].items():
        assert s[f"val/{name}_gap"] == pytest.approx(s[f"val/{name}_loss"] - star, abs=1e-5)


def test_pair_and_k_files_are_refused_where_they_do_not_fit(tmp_path, monkeypatch):
    """A pair file for a K run (and a K file for the pair) is refused by Maxright at bind and by TradeoffMetrics at
    fit start, naming the way to measure the right optima; a pair config is not a K config."""
    from types import SimpleNamespace

    pair = write_optimum(Optimum(0.4, 0.2, beta=0.1), tmp_path / "pair.json")
    k = write_optimum(OptimumK(dict.fromkeys(WEIGHTS, 0.1), beta=0.1), tmp_path / "k.json")
    with pytest.raises(ConfigError, match=r"no optimum for terse, polite, prefs: it was given the optimum file .*pair"
                       r".*python -m xright_pl optimum --datasets_config CONFIG"):  # fmt: skip
        Maxright(optimum_file=str(pair)).bind(WEIGHTS)
    with pytest.raises(ConfigError, match=r"no optimum for sft, dpo: it was given the optimum file .*k.json"):
        Maxright(optimum_file=str(k)).bind(0.5)
    Maxright(optimum_file=str(k)).bind(WEIGHTS)  # fits
    with pytest.raises(ConfigError, match=r"TradeoffMetrics has no optimum for terse, polite, prefs: .*pair"):
        TradeoffMetrics(optimum_file=str(pair)).check_objectives(SimpleNamespace(objectives=WEIGHTS))
    with pytest.raises(ConfigError, match=r"TradeoffMetrics has no optimum for sft, dpo: .*k.json"):
        TradeoffMetrics(optimum_file=str(k)).check_objectives(SimpleNamespace(objectives={"sft": 0, "dpo": 0}))
    assert TradeoffMetrics(optimum_file=str(k)).f_star == dict.fromkeys(WEIGHTS, 0.1)
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="TradeoffMetrics has no optimum for terse"):  # the CLI, before training
        run(["fit", "--config", str(K_CONFIG), "--trainer.default_root_dir", str(tmp_path / "r"),
             "--tradeoff.optimum_file", str(pair), "--trainer.max_steps", "2"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"'configs/demo/alright.yaml' has no data.datasets.*--sft_config"):
        run(["optimum", "--datasets_config", "configs/demo/alright.yaml"])
    with pytest.raises(ConfigError, match="--summaries names nope, not data sets"):
        run(["optimum", "--datasets_config", str(K_CONFIG), "--summaries", '{"nope": "x.json"}'])
