#!/usr/bin/env bash
# FSDP2 editing run under torchrun. Single node:   launch/torchrun.sh --config run.yaml [key=value ...]
# Multi-node (run on every node, same RDZV_ID):    NNODES=4 RDZV_ENDPOINT=head:29500 RDZV_ID=job42 launch/torchrun.sh ...
# NPROC (processes per node) defaults to the number of visible GPUs, or 1 without GPUs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
gpus="$(python -c 'import torch; print(torch.cuda.device_count())')"
nproc="${NPROC:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 1)}"
if [ "${NNODES:-1}" -gt 1 ]; then
  exec torchrun --nnodes "$NNODES" --nproc_per_node "$nproc" --rdzv_backend c10d \
    --rdzv_endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the first node}" \
    --rdzv_id "${RDZV_ID:?set RDZV_ID to the same value on every node}" "$here/edit.py" "$@"
fi
exec torchrun --standalone --nproc_per_node "$nproc" "$here/edit.py" "$@"
