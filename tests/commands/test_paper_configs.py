"""The paper's configs (Pythia-1B, Llama-3-8B) and the DDP/FSDP overlays through the real CLI parser.

``--print_config`` parses and validates every field (class paths, LoRA settings, selector arguments) and
exits before anything is built, so no model or dataset is downloaded."""

from __future__ import annotations

import pytest
import yaml
from helpers import REPO

from xright_pl.commands.cli import run

PAPER = REPO / "configs" / "paper"
METHODS = ["alright", "maxright", "sequential", "mix", "sft_only", "dpo_only"]
SELECTORS = {
    "alright": "xright_pl.Alright",
    "maxright": "xright_pl.Maxright",
    "sequential": "xright_pl.Sequential",
    "mix": "xright_pl.Mix",
    "sft_only": "xright_pl.Single",
    "dpo_only": "xright_pl.Single",
}
SETUPS = {
    "pythia-1b": {"model": "EleutherAI/pythia-1b", "r": 32, "targets": ["query_key_value"], "f": (1.4980, 0.0522)},
    "llama3-8b": {
        "model": "meta-llama/Meta-Llama-3-8B",
        "r": 16,
        "targets": ["q_proj", "v_proj"],
        "f": (1.02426, 0.04935),
    },
}


def _resolved(*args: str, capsys) -> dict:
    with pytest.raises(SystemExit) as e:
        run(["fit", *args, "--print_config"])
    assert e.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_every_paper_config_is_here():
    for setup in SETUPS:
        assert sorted(p.stem for p in (PAPER / setup).glob("*.yaml")) == sorted(METHODS)


@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("method", METHODS)
def test_paper_config_parses_with_the_paper_settings(setup, method, capsys):
    path = PAPER / setup / f"{method}.yaml"
    assert f"python -m xright_pl fit --config configs/paper/{setup}/{method}.yaml" in path.read_text()
    cfg = _resolved("--config", str(path), capsys=capsys)
    want = SETUPS[setup]
    m, d, t = cfg["model"], cfg["data"], cfg["trainer"]
    assert m["model"] == want["model"] and d["tokenizer"] == want["model"]
    assert m["lora"]["r"] == want["r"] and m["lora"]["target_modules"] == want["targets"]
    assert m["beta"] == 0.1 and m["gradient_clip_val"] == 1.0 and m["lam"] == 0.5
    assert m["optimizer"]["class_path"] == "torch.optim.Adam"
    assert m["optimizer"]["init_args"]["lr"] == 5e-5 and m["optimizer"]["init_args"]["betas"] == [0.9, 0.95]
    assert m.get("lr_scheduler") is None  # constant learning rate
    assert t["precision"] == "bf16-mixed"
    assert d["sft"]["path"] == "vicgalle/alpaca-gpt4" and d["preference"]["path"] == "Dahoas/rm-hh-rlhf"
    assert d["preference"]["format"] == "prompt_chosen_rejected"
    assert m["selector"]["class_path"] == SELECTORS[method]
    args = m["selector"].get("init_args") or {}
    if method == "maxright":
        assert (args["f_sft_star"], args["f_dpo_star"]) == want["f"] and args["eval_every"] == 10
    if method == "sequential":
        assert args["first"] == "dpo" and args["reference"] == "initial"
        # Equal cost with the other methods: the lam split of the same max_steps (DPO first: lam of it).
        from xright_pl import Sequential
        from xright_pl.selectors import StepContext

        sel = Sequential(**args).bind(m["lam"], StepContext(max_steps=t["max_steps"]))
        assert sel.boundary() == round(m["lam"] * t["max_steps"]) and 0 < sel.boundary() < t["max_steps"]
    if method in ("sft_only", "dpo_only"):
        assert args["objective"] == method.removesuffix("_only")


@pytest.mark.parametrize("overlay", ["fsdp", "ddp"])
def test_parallel_overlays_compose_with_a_paper_config(overlay, capsys):
    cfg = _resolved(
        "--config", str(PAPER / "llama3-8b" / "alright.yaml"), "--config", str(REPO / "configs" / f"{overlay}.yaml"),
        "--trainer.num_nodes", "2", capsys=capsys,
    )  # fmt: skip
    t = cfg["trainer"]
    assert t["num_nodes"] == 2 and cfg["model"]["lora"]["r"] == 16
    if overlay == "fsdp":
        assert t["strategy"]["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
        assert t["strategy"]["init_args"]["tensor_parallel_size"] == 1
        assert t["strategy"]["init_args"]["save_distributed_checkpoint"] is False
    else:
        assert t["strategy"] == "ddp"


# ------------------------------------------------------------------ SmolLM2-135M-Instruct (configs/real/smollm2)
REAL = REPO / "configs" / "real" / "smollm2"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_every_real_config_is_here():
    assert sorted(p.stem for p in REAL.glob("*.yaml")) == sorted(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_real_config_parses_with_its_settings_and_local_overrides(method, capsys):
    """Parse-only (no model, no data): the hub defaults, then the offline overrides the header prints."""
    path = REAL / f"{method}.yaml"
    text = path.read_text()
    assert f"python -m xright_pl fit --config configs/real/smollm2/{method}.yaml" in text
    cfg = _resolved("--config", str(path), capsys=capsys)
    m, d, t = cfg["model"], cfg["data"], cfg["trainer"]
    assert m["model"] == SMOLLM2 and d["tokenizer"] == SMOLLM2 and m.get("lora") is None
    assert m["selector"]["class_path"] == SELECTORS[method] and m["lam"] == 0.5 and m["beta"] == 0.1
    assert m["optimizer"]["class_path"] == "torch.optim.AdamW" and m["optimizer"]["init_args"]["lr"] == 1e-5
    assert t["max_steps"] == 200 and t["default_root_dir"] == f"runs/real/smollm2/{method}"
    for part in ("sft", "preference"):
        assert d[part]["use_chat_template"] is True
        assert d[part]["max_length"] == 128 and d[part]["max_prompt_length"] == 64
    assert d["batching"]["group_by_length"] is True
    args = m["selector"].get("init_args") or {}
    if method in ("sft_only", "dpo_only"):
        assert args["objective"] == method.removesuffix("_only")
    if method == "sequential":
        assert args["first"] == "sft" and "--model.selector.init_args.first dpo" in text
    if method == "maxright":
        assert args["optimum_file"] == "runs/real/smollm2/optimum.json" and "xright_pl optimum" in text
    # The header's offline command line parses, and points everything at the local files.
    block = text[text.index("Offline") :].split("\n#\n")[1]
    local = " ".join(line.lstrip("# ").rstrip("\\ ") for line in block.splitlines()).split()
    assert local[:5] == ["python", "-m", "xright_pl", "fit", "--config"]
    cfg = _resolved("--config", str(path), *local[6:], capsys=capsys)
    d = cfg["data"]
    assert cfg["model"]["model"] == d["tokenizer"] == "../smollm2"
    assert d["sft"]["path"].endswith("alpaca_gpt4_sft_train.jsonl") and d["preference"]["eval_split"] is None
    assert d["preference"]["eval_path"].endswith("hh_rlhf_pref_eval.jsonl")


# ------------------------------------------------------------ three objectives on SmolLM2 (configs/real/smollm2_k3)
K3 = REPO / "configs" / "real" / "smollm2_k3"


def test_three_objective_real_config_parses_online_and_offline(capsys):
    """Hub sources by default; the offline overlay replaces the model and every data set's source, and keeps the
    objectives, weights and lengths."""
    base = K3 / "three_objectives.yaml"
    text = base.read_text()
    assert "--config configs/real/smollm2_k3/offline.yaml" in text
    online = _resolved("--config", str(base), capsys=capsys)
    offline = _resolved("--config", str(base), "--config", str(K3 / "offline.yaml"), capsys=capsys)
    for cfg, model in ((online, SMOLLM2), (offline, "../smollm2")):
        assert cfg["model"]["model"] == cfg["data"]["tokenizer"] == model
        sets = cfg["data"]["datasets"]
        assert [(d["name"], d["weight"]) for d in sets] == [("alpaca", 0.4), ("hh_chosen", 0.2), ("hh_dpo", 0.4)]
        assert [d["sft"] is not None for d in sets] == [True, True, False]
        assert sets[1]["sft"]["format"] == "prompt_chosen"
        for d in sets:
            part = d["sft"] or d["preference"]
            assert part["use_chat_template"] is True and (part["max_length"], part["max_prompt_length"]) == (128, 64)
    local = offline["data"]["datasets"]
    assert local[0]["sft"]["path"] == "../shared/data/alpaca_gpt4_sft_train.jsonl"
    assert local[2]["preference"]["eval_path"] == "../shared/data/hh_rlhf_pref_eval.jsonl"
