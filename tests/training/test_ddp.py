"""DDP on 2 CPU processes (gloo): every rank takes the same branch at every step, ends with identical weights,
logs the same keys; a selector that decides differently per rank is stopped before any backward pass.

Each test runs this file as a script (``python tests/training/test_ddp.py <selector> <out_dir>``); Lightning's
``strategy="ddp"`` launches the second rank by re-running the same command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1]
STEPS = 8


def _selector(kind: str, rank: int):
    from xright_pl import Alright, Maxright, Mix

    class Rec:
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.branches = []

        def decide(self, step, losses):
            d = super().decide(step, losses)
            self.branches.append(d.branch)
            return d

    if kind == "alright":
        return type("RecAlright", (Rec, Alright), {})(seed=7)
    if kind == "maxright":  # k = 3: evaluation steps (a graph built and not backpropagated) and plain steps
        return type("RecMaxright", (Rec, Maxright), {})(f_sft_star=4.5, f_dpo_star=0.3, eval_every=3)
    if kind == "mix":  # two backward passes per optimizer step
        return type("RecMix", (Rec, Mix), {})()
    if kind.startswith("fsdp"):  # the same as "alright", so the results can be compared
        return type("RecAlright", (Rec, Alright), {})(seed=7)
    if kind == "equiv":  # both objectives in every step, each with its own normalisation
        return type("RecMix", (Rec, Mix), {})()
    if kind == "desync":  # the bug the paper's code had: a draw that differs by rank
        return type("RecAlright", (Rec, Alright), {})(seed=100 + rank)
    raise ValueError(kind)


def worker(kind: str, out_dir: str) -> None:
    import lightning.pytorch as pl
    from helpers import demo_data, tiny_module

    from xright_pl.callbacks.summary import weights_sha256

    rank = int(os.environ.get("LOCAL_RANK", 0))
    selector = _selector(kind, rank)
    accumulate = 2 if kind in ("alright", "equiv") or kind.startswith("fsdp") else 1
    module = tiny_module(selector, accumulate_grad_batches=accumulate)
    data = demo_data(limit=64)
    if kind == "equiv":  # half the single-process batch on each rank, answers of different lengths, SGD
        module = tiny_module(selector, lam=0.3, accumulate_grad_batches=accumulate, optimizer=_sgd)
        data = demo_data(limit=64, sft_bs=2, dpo_bs=1, sft_path=str(Path(out_dir, "sft_varied.jsonl")))
    strategy, precision = "ddp", "32-true"
    if kind.startswith("fsdp"):  # fsdp-32-true, fsdp-bf16-mixed, fsdp-bf16-true
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        precision = kind.removeprefix("fsdp-")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        precision=precision,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        val_check_interval=STEPS * accumulate,
        check_val_every_n_epoch=None,
    )
    result = {"rank": trainer.global_rank}
    try:
        trainer.fit(module, datamodule=data)
    except Exception as e:  # noqa: BLE001 - the test reads the message
        result["error"] = f"{type(e).__name__}: {e}"
    else:
        if kind.startswith("fsdp"):
            result["fsdp"] = _fsdp_facts(module)
        result.update(
            branches=selector.branches,
            weights=_full_weights_sha256(module.policy) if kind.startswith("fsdp") else weights_sha256(module.policy),
            checksum=_checksum(module.policy),
            val={k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
            steps=module.steps,
            keys=sorted(trainer.callback_metrics),
            consumed=trainer.datamodule.consumed_examples(),
            global_step=trainer.global_step,
        )
        if kind == "equiv" and trainer.global_rank == 0:
            import torch

            torch.save(module.policy.state_dict(), Path(out_dir, "policy.pt"))
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if "error" in result:
        sys.exit(3)


def _sgd(params):
    import torch

    return torch.optim.SGD(params, lr=0.5)


def _full_weights_sha256(model) -> str:
    """Hash of the full (gathered) weights of an FSDP2 model; a collective: every rank calls it."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from xright_pl.callbacks.summary import weights_sha256

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    holder = torch.nn.Module()
    for i, (_name, v) in enumerate(sorted(sd.items())):
        holder.register_buffer(f"b{i}", v.detach().clone())
    return weights_sha256(holder)


def _checksum(model) -> float:
    """Sum of |w| over the full weights (gathers FSDP shards; every rank calls it)."""
    total = 0.0
    for p in model.parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        total += float(t.detach().double().abs().sum())
    return total


def _fsdp_facts(module) -> dict:
    from torch.distributed.tensor import DTensor

    from xright_pl.training.distributed import fsdp_units

    policy_units = fsdp_units(module.policy.modules())
    reference_units = fsdp_units(module.reference.modules())
    return {
        "policy_units": len(policy_units),
        "reference_units": len(reference_units),
        "shared_units": len({id(m) for m in policy_units} & {id(m) for m in reference_units}),
        "all_dtensor": all(
            isinstance(p, DTensor) for p in [*module.policy.parameters(), *module.reference.parameters()]
        ),
        "local_numel": sum(p.to_local().numel() for p in module.policy.parameters()),
        "full_numel": sum(p.numel() for p in module.policy.parameters()),
        "param_dtype": str(next(module.policy.parameters()).dtype),
    }


_RUNS: dict[str, tuple[subprocess.CompletedProcess, list[dict]]] = {}


def _launch(kind: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run the worker on 2 processes once per kind (cached for the session)."""
    if kind in _RUNS:
        return _RUNS[kind]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), kind, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,  # generous: the machine may be heavily loaded; nothing here depends on timing
    )
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    _RUNS[kind] = proc, results
    return proc, results


@pytest.mark.parametrize("kind", ["alright", "maxright", "mix"])
def test_ranks_agree_and_stay_identical(kind, tmp_path):
    proc, results = _launch(kind, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["rank"] for r in results] == [0, 1]
    r0, r1 = results
    assert r0["global_step"] == r1["global_step"] == STEPS
    assert len(r0["branches"]) == STEPS
    assert r0["branches"] == r1["branches"]
    if kind != "mix":
        assert set(r0["branches"]) == {"sft", "dpo"}, r0["branches"]  # both branches were exercised
    # Each rank trained on its own slice of the data, yet the weights are bit-identical: gradients were averaged.
    assert r0["weights"] == r1["weights"]
    assert r0["steps"] == r1["steps"] and r0["keys"] == r1["keys"]
    assert "train/lr" in r0["keys"] and "steps/sft" in r0["keys"]
    assert r0["consumed"] == r1["consumed"]


def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """2 ranks x (2 SFT rows, 1 pair) x 2 micro-batches == 1 process x (4 rows, 2 pairs) x 2 micro-batches: the
    SFT token mean is taken over the whole step on all ranks (answers of different lengths), DPO over all pairs."""
    import torch
    from helpers import demo_data, tiny_module, trainer, varied_sft_file

    from xright_pl import Mix

    sft = varied_sft_file(tmp_path)
    proc, results = _launch("equiv", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert results[0]["weights"] == results[1]["weights"]
    single = tiny_module(Mix(), lam=0.3, accumulate_grad_batches=2, optimizer=_sgd)
    t = trainer(tmp_path / "single", STEPS, limit_val_batches=1)
    t.fit(single, datamodule=demo_data(limit=64, sft_bs=4, dpo_bs=2, sft_path=sft))
    ddp = torch.load(tmp_path / "policy.pt", weights_only=True)
    for name, p in single.policy.state_dict().items():
        torch.testing.assert_close(ddp[name], p, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert single.steps == results[0]["steps"] == {"sft": STEPS, "dpo": STEPS}


def test_desynchronised_selector_is_stopped(tmp_path):
    proc, results = _launch("desync", tmp_path)
    assert proc.returncode != 0
    assert results, proc.stderr[-3000:]
    for r in results:
        assert r["error"].startswith("DesyncError"), r
        assert "disagree on what optimizer step" in r["error"] and "no SFT gradient was averaged" in r["error"]
    assert "rank 0:" in results[0]["error"] and "rank 1:" in results[0]["error"]


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_fsdp2_model_parallel_strategy(precision, tmp_path):
    """ModelParallelStrategy + FSDP2 on 2 CPU processes: policy and reference sharded in separate units, the
    same decisions as DDP, and in fp32 the same weights as DDP (up to reduction order)."""
    proc, results = _launch(f"fsdp-{precision}", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = results
    for r in results:
        f = r["fsdp"]
        # 2 transformer blocks + the root, for each of policy and reference; no unit shared between them.
        assert f["policy_units"] == 3 and f["reference_units"] == 3 and f["shared_units"] == 0
        assert f["all_dtensor"] and f["local_numel"] * 2 == f["full_numel"]  # each rank holds half the weights
        assert f["param_dtype"] == ("torch.bfloat16" if precision == "bf16-true" else "torch.float32")
    assert r0["branches"] == r1["branches"] and r0["keys"] == r1["keys"] and r0["weights"] == r1["weights"]
    assert r0["global_step"] == 8
    ddp_proc, ddp = _launch("alright", tmp_path.parent / (tmp_path.name + "-ddp"))
    assert ddp_proc.returncode == 0, ddp_proc.stderr[-3000:]
    assert r0["branches"] == ddp[0]["branches"]  # same seed, same decisions
    if precision == "32-true":
        assert r0["checksum"] == pytest.approx(ddp[0]["checksum"], rel=1e-5)
        for key, value in ddp[0]["val"].items():
            assert r0["val"][key] == pytest.approx(value, abs=1e-4), key
    else:
        for key, value in ddp[0]["val"].items():
            assert r0["val"][key] == pytest.approx(value, abs=0.1), key
