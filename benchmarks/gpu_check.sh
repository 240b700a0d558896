#!/usr/bin/env bash
# GPU checks, run on one GPU as one short script: bash benchmarks/gpu_check.sh [section ...]
# Each section appends its measured rows to $OUT (default benchmarks/gpu_check_results), for
# benchmarks/RESULTS.md. Nothing here downloads anything: models are random-init at real shapes from
# --model.model_config, data are the offline samples in ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-benchmarks/gpu_check_results}
mkdir -p "$OUT"
SECTIONS=${*:-fsdp step_speed memory}

# ------------------------------------------------------------------------------------------------------------
# FSDP (issue 6): ModelParallelStrategy + FSDP2 fully_shard on ONE device, Pythia-1B shape (GPTNeoX, 16 layers,
# hidden 2048), bf16-mixed and bf16-true. Rows: precision, steps, first/last train SFT loss (loss must fall),
# tokens/s, peak GPU memory (from summary.json). Env: FSDP_STEPS (default 60), FSDP_DEVICE (gpu; cpu + a tiny
# FSDP_SHAPE for a smoke test of this script), FSDP_SHAPE (a JSON model_config).
# ------------------------------------------------------------------------------------------------------------
PYTHIA_1B='{"model_type": "gpt_neox", "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 8, "max_position_embeddings": 2048, "rotary_pct": 0.25, "use_parallel_residual": true, "tie_word_embeddings": false}'
fsdp() {
  local steps=${FSDP_STEPS:-60} device=${FSDP_DEVICE:-gpu} shape=${FSDP_SHAPE:-$PYTHIA_1B}
  local data=../shared/data
  for precision in bf16-mixed bf16-true; do
    local root="$OUT/fsdp-$precision"
    rm -rf "$root"
    $PY -m xright_pl fit --config configs/demo.yaml --config configs/fsdp.yaml \
      --trainer.accelerator "$device" --trainer.precision "$precision" \
      --trainer.callbacks '[]' --trainer.enable_checkpointing false \
      --trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir "$root" \
      --trainer.default_root_dir "$root" --trainer.max_steps "$steps" --trainer.log_every_n_steps 1 \
      --trainer.val_check_interval "$steps" --trainer.limit_val_batches 4 --trainer.enable_progress_bar false \
      --model.model_config "$shape" --model.selector xright_pl.Single --model.selector.init_args.objective sft \
      --model.optimizer.lr 1e-4 \
      --data.tokenizer builtin:demo/tokenizer \
      --data.sft.path "$data/alpaca_gpt4_sft_train.jsonl" --data.sft.eval_path "$data/alpaca_gpt4_sft_eval.jsonl" \
      --data.sft.prompt_template null --data.sft.max_length 512 \
      --data.preference.path "$data/hh_rlhf_pref_train.jsonl" --data.preference.eval_path "$data/hh_rlhf_pref_eval.jsonl" \
      --data.preference.max_length 512 --data.batching.sft_batch_size 8 --data.batching.eval_batch_size 8 \
      > "$root.log" 2>&1 || { echo "fsdp $precision FAILED (see $root.log)"; tail -20 "$root.log"; continue; }
    $PY - "$root" "$precision" "$steps" <<'PYEOF' | tee -a "$OUT/fsdp.md"
import csv, glob, json, sys
root, precision, steps = sys.argv[1], sys.argv[2], sys.argv[3]
summary = json.load(open(sorted(glob.glob(f"{root}/**/summary.json", recursive=True))[-1]))
rows = [r for f in glob.glob(f"{root}/**/metrics.csv", recursive=True) for r in csv.DictReader(open(f))]
sft = [float(r["train/sft_loss"]) for r in rows if r.get("train/sft_loss")]
first, last = sum(sft[:5]) / len(sft[:5]), sum(sft[-5:]) / len(sft[-5:])
print(f"| fsdp2 1 device | {precision} | {steps} | {first:.3f} -> {last:.3f} ({'falls' if last < first else 'DOES NOT FALL'})"
      f" | {summary['tokens_per_s']} tok/s | {summary['peak_memory_mb']} MiB |")
PYEOF
  done
}

# ------------------------------------------------------------------------------------------------------------
# STEP SPEED (issue 5): benchmarks/step_speed.py --gpu and benchmarks/run_speed.py --gpu: Pythia-1B shape, bf16
# weights, fused AdamW, SDPA, 8 pairs x 512 tokens. Rows: plain PyTorch floor / xright_pl / TRL for the DPO
# (recomputed and cached reference), SFT, Mix and MAXRIGHT-evaluation steps (step_speed.py), and whole ALRIGHT /
# MAXRIGHT(k=10) / Mix / Sequential runs of 30 steps (run_speed.py). Writes $OUT/step_speed/{step_speed.csv,
# ratios.json,step_speed.md,step_speed.log} and {run_speed.csv,run_ratios.json,run_speed.md,run_speed.log};
# about 6 minutes on an H200.
# Needs importable: torch, lightning, transformers (present on the GPU machine) and `datasets` (xright_pl's data
# layer imports it). TRL rows also need trl + accelerate. The GPU machine has no network: carry wheels in .whl/
# (git-ignored; `run(carry=[".whl"])`), filled beforehand on a networked machine with
#   bash benchmarks/gpu_check.sh fetch_wheels        (PYVER=3.11 by default: match the GPU machine's python)
# Missing packages only drop rows: without trl the TRL rows are skipped. Env: STEP_SPEED_ARGS, RUN_SPEED_ARGS (extra
# flags of step_speed.py, run_speed.py).
# ------------------------------------------------------------------------------------------------------------
fetch_wheels() {
  local pyver=${PYVER:-3.11}
  mkdir -p .whl
  # --no-deps: torch/transformers/numpy are on the GPU machine already; these are what it lacks.
  $PY -m pip download --no-deps --only-binary=:all: --python-version "$pyver" --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
    datasets pyarrow dill multiprocess xxhash fsspec trl accelerate pandas jsonargparse docstring-parser \
    typeshed-client
  du -sh .whl
}

install_carried_wheels() {
  local need=()
  for mod in datasets trl accelerate jsonargparse; do
    $PY -c "import $mod" 2>/dev/null || need+=("$mod")
  done
  if [ ${#need[@]} -gt 0 ] && [ -d .whl ]; then
    echo "installing from carried wheels (.whl, no network): ${need[*]}"
    $PY -m pip install --quiet --no-index --find-links .whl "${need[@]}" || echo "some carried wheels did not install"
  fi
}

step_speed() {
  install_carried_wheels
  if ! $PY -c "import datasets" 2>/dev/null; then
    echo "step_speed SKIPPED: 'datasets' is not importable (xright_pl imports it); carry wheels in .whl/"
    return 0
  fi
  $PY -c "import trl" 2>/dev/null || echo "note: trl not importable: the TRL rows are skipped"
  local dir="$OUT/step_speed"
  mkdir -p "$dir"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$dir/gpu.txt" || true
  gpu_bench step_speed "$dir" ${STEP_SPEED_ARGS:-}
  gpu_bench run_speed "$dir" ${RUN_SPEED_ARGS:-}
}

# gpu_bench NAME DIR [FLAG ...]: benchmarks/NAME.py --gpu --out DIR FLAG ...; its table in DIR/NAME.md, its log in
# DIR/NAME.log. A failure is reported and does not stop the other benchmarks.
gpu_bench() {
  local name=$1 dir=$2
  shift 2
  PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} $PY "benchmarks/$name.py" --gpu --out "$dir" "$@" \
    2> "$dir/$name.log" | tee "$dir/$name.md" \
    || { echo "$name FAILED (see $dir/$name.log)"; tail -30 "$dir/$name.log"; }
}

# ------------------------------------------------------------------------------------------------------------
# MEMORY (issue 21): benchmarks/memory.py --gpu: one DPO step (live reference) and one SFT step of xright_pl (fused
# log-probs, the default), xright_pl with --model.fused_logps false, TRL (its default fused LM head) and the plain
# loop, each in a fresh process, bf16 weights: SmolLM2-135M (V = 49,152, 30 layers) at 4 pairs x 512 tokens and
# its body cut to 2 layers at V = 128,256. Rows: torch.cuda.max_memory_allocated and step time. Writes
# $OUT/memory/{memory.csv,memory.md}; 16 processes, a few minutes. Env: MEMORY_ARGS (extra flags).
# ------------------------------------------------------------------------------------------------------------
memory() {
  install_carried_wheels
  if ! $PY -c "import datasets" 2>/dev/null; then
    echo "memory SKIPPED: 'datasets' is not importable (xright_pl imports it); carry wheels in .whl/"
    return 0
  fi
  local dir="$OUT/memory"
  mkdir -p "$dir"
  PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} $PY benchmarks/memory.py --gpu --out "$dir" ${MEMORY_ARGS:-} \
    2> "$dir/memory.log" || { echo "memory FAILED (see $dir/memory.log)"; tail -30 "$dir/memory.log"; }
}

for s in $SECTIONS; do
  "$s"
done
