#!/usr/bin/env bash
# graft on one NVIDIA GPU (H100 / H200): training throughput of a 0.8 B-parameter VLM, and one
# training step against Hugging Face's LlavaForConditionalGeneration with the same weights.
#
# What it measures (about 3 minutes with eager blocks, ~5 with compiled ones; at most ~7.5: each
# part has a time limit):
#   1. `graft train --dry-run`: the parameter count and the memory plan of the run below.
#   2. `graft train shapes_vqa` through the real CLI: 814 M parameters (ViT 768 x 12 with 256
#      patches per image, MLP connector, Llama-style LM 2048 x 16, GQA 16/4 heads), bf16, FSDP2 at
#      world size 1, torch.compile per block, 64 conversations per step (one per row: ~350 tokens,
#      256 of them image tokens), 100 steps, no evaluation, one checkpoint at the end (deleted
#      afterwards: $OUT may be copied back to the caller).
#   3. benchmarks/hf_llava_step.py at the same sizes: graft's VLM step vs the HF class with the
#      same weights (eager, bf16 autocast, batches of 32 conversations), timed alternately in one
#      process; it prints one "speed ratio ... / transformers" line per graft variant it times.
# Images are 112 px with 7 px patches: the same 256 patches as 224 px / 14 px, at a quarter of the
# pixels, because the built-in world is drawn on the CPU in the training process, between steps,
# and at 224 px drawing a batch would take as long as the GPU's step ("data wait" below).
#
# How to read the output: "torch.compile: N graphs compiled" says whether the blocks really were
# compiled; the "median ..." line gives the medians over the logged windows (5 steps each) after
# the first 4 (compile warm-up and recompiles), the peak of torch.cuda.max_memory_allocated, and
# tokens/s without the data wait (what the model sustains when batches come from DataLoader
# workers, as with real data); MFU uses FLOPs counted by torch's FLOP counter against the
# datasheet's dense bf16 peak (graft/trainer/runtime.py). The HF ratio is graft speed / HF speed
# (> 1: graft is faster); the first-step losses above it must agree.
# The two markdown rows at the end go verbatim into the README's benchmark table (what | figure |
# command | date), with the device and the date they carry; docs/benchmarks.md keeps the notes.
#
#   bash benchmarks/gpu.sh                        # on the GPU machine; outputs in ${OUT:-/tmp/graft_gpu}
#   GRAFT_GPU_SMOKE=1 bash benchmarks/gpu.sh      # every step on the CPU at a tiny size, fp32 (~1 min)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/graft_gpu}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"

if [[ ${GRAFT_GPU_SMOKE:-0} == 1 ]]; then
    echo "SMOKE MODE: CPU, fp32, tiny sizes, few steps; the figures below mean nothing"
    DEVICE=cpu PRECISION=fp32 GPUS=()
    SIZE=(lm.hidden_size=64 lm.layers=2 lm.heads=4 lm.kv_heads=2 lm.intermediate_size=128 lm.max_seq_len=128
          vision.hidden_size=64 vision.layers=2 vision.heads=4 vision.intermediate_size=128
          vision.image_size=28 vision.patch_size=7)
    BATCH=8 STEPS=12 LOG_EVERY=2 SKIP=2
    HF_BATCH=8 HF_STEPS=3 HF_WARMUP=1
    TRAIN_LIMIT=600 HF_LIMIT=300
else
    DEVICE=cuda PRECISION=bf16 GPUS=(--gpus 1)
    # 814 M parameters: lm 722 M, vision 86 M, connector 6 M. max_seq_len 384 holds the longest
    # conversation (6 questions, the caption, 256 image tokens: 277-353 tokens), so none is cut;
    # two never fit in a row, so the memory plan (rows full to max_seq_len) is tight, not 3x high.
    SIZE=(lm.hidden_size=2048 lm.layers=16 lm.heads=16 lm.kv_heads=4 lm.intermediate_size=5632 lm.max_seq_len=384
          vision.hidden_size=768 vision.layers=12 vision.heads=12 vision.intermediate_size=3072
          vision.image_size=112 vision.patch_size=7)
    BATCH=64 STEPS=100 LOG_EVERY=5 SKIP=4  # plan: 52.5 GiB at batch 64
    # every model it times stays resident with its AdamW state (~13 GiB each at 814 M), plus one
    # step's activations (plan, plain bf16 autocast: 24 GiB at batch 32): ~65 GiB for three models
    HF_BATCH=32 HF_STEPS=20 HF_WARMUP=3
    TRAIN_LIMIT=270 HF_LIMIT=120  # seconds; with the dry run, at most ~7.5 minutes in all
fi

SETS=()
for kv in "${SIZE[@]}"; do SETS+=(--set "$kv"); done
TRAIN_SETS=("${SETS[@]}" --set parallel.kind=fsdp2 --set parallel.compile=true
            --set train.precision=$PRECISION --set train.device=$DEVICE --set train.batch_size=$BATCH
            --set train.steps=$STEPS --set train.log_every=$LOG_EVERY --set train.ckpt_every=$STEPS
            --set train.progress=false --set eval.splits= --set optim.lr=3e-4)  # the recipe's 2e-3 suits 1.3 M params
RUN=$OUT/graft
failed=0

show() { printf '+'; printf ' %q' "$@"; printf '\n'; }
phase() { printf '\n== %s (%d s so far)\n' "$1" "$SECONDS"; }

phase "device"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "| cuda:", torch.cuda.is_available() and torch.cuda.get_device_name())'
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi

TRAIN=("$PYTHON" -m graft train shapes_vqa --out "$RUN" "${TRAIN_SETS[@]}")
rm -rf -- "$RUN"  # an existing run directory would be resumed, not measured

phase "memory plan"
cmd=("$PYTHON" -m graft train shapes_vqa --dry-run "${GPUS[@]}" "${TRAIN_SETS[@]}")
show "${cmd[@]}"
"${cmd[@]}" | tee "$OUT/dry_run.txt"

phase "training (log: $OUT/train.log)"
show "${TRAIN[@]}"
start=$SECONDS
rc=0
# dynamo's INFO log says what torch.compile compiled and how long it took (gpu_summary.py reads it)
TORCH_LOGS=dynamo,recompiles,graph_breaks timeout -k 30 "$TRAIN_LIMIT" "${TRAIN[@]}" >"$OUT/train.log" 2>&1 || rc=$?
grep -v '^\[rank0\]:\|^[IVWE][0-9]\{4\} ' "$OUT/train.log" | tail -n 20 || true  # graft's own lines
echo "training: exit $rc after $((SECONDS - start)) s"
if [[ $rc == 124 ]]; then
    failed=1
    echo "training stopped at its ${TRAIN_LIMIT} s limit; the summary uses the windows logged by then"
elif [[ $rc != 0 ]]; then
    failed=1
    echo "training FAILED; the log's last lines:"
    tail -n 40 "$OUT/train.log"
fi
rm -rf -- "$RUN/checkpoints"  # ~10 GB of weights and AdamW moments, measured (ckpt_blocked_s) and not needed

phase "graft vs transformers LlavaForConditionalGeneration, one step (log: $OUT/hf_llava.log)"
cmd=("$PYTHON" benchmarks/hf_llava_step.py --device "$DEVICE" --precision "$PRECISION" "${SETS[@]}"
     --batch-size "$HF_BATCH" --steps "$HF_STEPS" --warmup "$HF_WARMUP")
show "${cmd[@]}"
start=$SECONDS
rc=0
timeout -k 15 "$HF_LIMIT" "${cmd[@]}" 2>&1 | tee "$OUT/hf_llava.log" || rc=$?
echo "hf_llava_step: exit $rc after $((SECONDS - start)) s"
[[ $rc == 0 ]] || failed=1

phase "summary"
what="FSDP2 (world size 1) + torch.compile per block, $PRECISION, batch $BATCH"
"$PYTHON" benchmarks/gpu_summary.py --run "$RUN" --log "$OUT/train.log" --plan "$OUT/dry_run.txt" \
    --skip "$SKIP" --hf-log "$OUT/hf_llava.log" --what "$what" || failed=1
echo
echo "the training command (in the README row: bash benchmarks/gpu.sh):"
show "${TRAIN[@]}"
echo "total: $SECONDS s"
exit "$failed"
