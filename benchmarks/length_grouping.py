"""Padding and DPO step speed of length-grouped vs random batches on a real preference file.

Tokenizes ``PREF_JSONL`` with the library's loader (``datasets`` needed) and ``--tokenizer``, builds the DPO
training stream with and without ``Batching(group_by_length=True)`` (``--pairs`` pairs a batch, ``max_length``
``--seq-len``, default 512), and reports over one epoch the share of padded positions; then times plain DPO steps
(policy + reference, the library's losses) of a random-init model on the first ``--steps`` batches of each order,
interleaved, and reports real (non-padding) tokens per second. The model is ``bench_setup.py``'s ``--quick``
shape (tiny GPTNeoX, fp32, CPU; ``--gpu``: Pythia-1B shape, bf16, CUDA) with the vocabulary grown to the
tokenizer's. Output: ``length_grouping.json`` (the rows: grouped, real_tokens, padded_positions, padding_share,
timed_batches, timed_real_tokens, real_tokens_per_s), one JSON line a row on stdout.

Usage::

    python benchmarks/length_grouping.py ../shared/data/hh_rlhf_pref_train.jsonl --tokenizer <gpt2-folder> \
        --pairs 4 --steps 8 --out out/length_grouping
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers, beside this file

from bench_setup import Setup, add_setup_args, gpu_setup, prepare, quick_setup, sync, to_device  # noqa: E402


def length_grouping(args: argparse.Namespace, setup: Setup, out: Path) -> list[dict]:
    """Padding and DPO step speed of length-grouped vs random batches on a real preference file.

    Tokenizes the file with the library's loader (``datasets`` needed), builds the training stream with and
    without ``group_by_length``, and reports over one epoch the share of padded positions; then times plain
    DPO steps (policy + reference, the library's losses) on the first ``--steps`` batches of each order,
    interleaved, and reports real (non-padding) tokens per second; writes ``out / length_grouping.json``.
    """
    from xright_pl import Batching, JointDataModule
    from xright_pl.data.sources import PreferenceData, SFTData
    from xright_pl.models.build import build_causal_lm, frozen_copy
    from xright_pl.objectives.losses import dpo_loss, sequence_logps

    pairs = args.pairs or setup.pairs
    steps = args.steps or setup.steps
    results, batches = [], {}
    for grouped in (False, True):
        dm = JointDataModule(
            tokenizer=args.tokenizer,
            sft=SFTData(path="builtin:demo/sft_train.jsonl", limit=8),
            preference=PreferenceData(path=args.pref_jsonl, val_fraction=0.0, max_length=args.seq_len or 512),
            batching=Batching(dpo_batch_size=pairs, group_by_length=grouped),
            seed=setup.seed,
        )
        dm.setup("fit")
        dm.train_dataloader()
        stream = dm.streams["dpo"]
        epoch = []
        for _ in range(len(stream)):
            epoch.append(stream.peek())
            stream.consume(pairs)
        real = sum(int(b.attention_mask.sum()) for b in epoch)
        padded = sum(b.attention_mask.numel() for b in epoch)
        batches[grouped] = epoch[:steps]
        results.append({"grouped": grouped, "real_tokens": real, "padded_positions": padded})
    cfg = dict(setup.model_config)
    cfg["vocab_size"] = max(cfg["vocab_size"], len(dm.tokenizer))
    dev = setup.device
    policy = build_causal_lm(None, cfg, setup.seed, setup.dtype, "sdpa").to(dev).train()
    ref = frozen_copy(policy)
    times: dict[bool, float] = {False: 0.0, True: 0.0}
    for i in range(steps):
        for grouped in (False, True):
            b = to_device(batches[grouped][i], dev)
            sync(dev)
            t0 = time.perf_counter()
            with torch.no_grad():
                r = sequence_logps(ref(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.labels).logps
            pi = sequence_logps(policy(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.labels).logps
            k = b.num_examples
            dpo_loss(pi[:k], pi[k:], r[:k], r[k:], setup.beta).losses.mean().backward()
            policy.zero_grad(set_to_none=True)
            sync(dev)
            times[grouped] += time.perf_counter() - t0
    for r in results:
        g = r["grouped"]
        r["padding_share"] = round(1 - r["real_tokens"] / r["padded_positions"], 4)
        r["timed_batches"] = steps
        r["timed_real_tokens"] = sum(int(b.attention_mask.sum()) for b in batches[g])
        r["real_tokens_per_s"] = round(r["timed_real_tokens"] / times[g], 1)
    (out / "length_grouping.json").write_text(json.dumps({"pairs": pairs, "model": cfg, "rows": results}, indent=2))
    for r in results:
        print(json.dumps(r))
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pref_jsonl", metavar="PREF_JSONL", help="preference rows (prompt/chosen/rejected)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (vocab.json and merges.txt, ...) or name")
    parser.add_argument("--gpu", action="store_true", help="Pythia-1B shape on CUDA, bf16 weights")
    add_setup_args(
        parser,
        "out/length_grouping",
        "length_grouping.json",
        ("pairs", "seq-len", "steps"),
        pairs="preference pairs per batch (default 4; --gpu: 8)",
        seq_len="max_length of the rows (default 512)",
        steps="timed batches of each order (default 8; --gpu: 10)",
    )
    args = parser.parse_args(argv)
    out = prepare(args)
    return length_grouping(args, gpu_setup() if args.gpu else quick_setup(), out)


if __name__ == "__main__":
    main()
