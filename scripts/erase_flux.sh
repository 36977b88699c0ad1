#!/usr/bin/env bash
# Erase a concept from FLUX.1-dev on one node: one process per GPU under DeepSpeed ZeRO (training.engine).
#
#   scripts/erase_flux.sh FLUX_FOLDER CONCEPT [METHOD] [OUT] [more fasterase erase options...]
#
# Environment: GPUS (default: every GPU nvidia-smi lists), GPU_MEM (GB per GPU, default 80), ZERO (2 or 3,
# default 2), RESOLUTION (px, default 1024, FLUX.1-dev's own), MICRO_BATCH (rows a network call, default 4).
# It first prints `fasterase plan` for the node (memory per GPU, part by part; the options after OUT go to
# erase alone) and stops there if the plan does not fit; else it starts the
# deepspeed launcher with `--module fasterase erase`. Each process runs its share of every network
# call's rows; ZeRO splits the optimizer's states between them (ZeRO-3: the transformer too, for the whole
# run: the way ESD and TRACE fit 4 x 24 GB); rank 0 writes the edit to OUT.
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
MODEL=$1; CONCEPT=$2; METHOD=${3:-ant}; OUT=${4:-edits/flux-$METHOD}
shift $(( $# < 4 ? $# : 4 ))
GPUS=${GPUS:-$(nvidia-smi --list-gpus | wc -l)}
GPU_MEM=${GPU_MEM:-80}
ZERO=${ZERO:-2}
RESOLUTION=${RESOLUTION:-1024}
MICRO_BATCH=${MICRO_BATCH:-4}
OPTIONS=(--dtype bf16 --resolution "$RESOLUTION" --gradient-checkpointing --micro-batch "$MICRO_BATCH")

PLAN=$(fasterase plan --model "$MODEL" --method "$METHOD" --gpus "$GPUS" --gpu-mem "$GPU_MEM" \
    --set "zero=$ZERO" "${OPTIONS[@]}")
echo "$PLAN"
if grep -q '^does not fit' <<< "$PLAN"; then
    echo "the plan does not fit $GPUS x $GPU_MEM GB as asked; nothing started (what would make it fit is above:" \
        "set MICRO_BATCH, ZERO, GPUS or RESOLUTION)" >&2
    exit 1
fi

deepspeed --num_gpus "$GPUS" --module fasterase erase --model "$MODEL" --concept "$CONCEPT" --method "$METHOD" \
    --set "zero=$ZERO" "${OPTIONS[@]}" --out "$OUT" "$@"
