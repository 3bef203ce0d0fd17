#!/usr/bin/env bash
# DeepSpeed ZeRO editing run under the `deepspeed` launcher (one node, or several with a hostfile):
#   launch/deepspeed.sh [--config run.yaml] [key=value ...]
#   DS_CONFIG=deepspeed_configs/zero3_offload.json NPROC=8 launch/deepspeed.sh --config run.yaml
#   HOSTFILE=hosts.txt launch/deepspeed.sh --config run.yaml   # multi-node: "host slots=N" per line
# NPROC (processes per node) defaults to the number of visible GPUs, or 1 without GPUs. DS_CONFIG defaults
# to deepspeed_configs/zero3.json; its "auto" values are filled from our config (docs/deepspeed.md).
# Exit code 75: preempted after saving a checkpoint; rerun the same command to resume.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ds_config="${DS_CONFIG:-$here/../deepspeed_configs/zero3.json}"
gpus="$(python -c 'import torch; print(torch.cuda.device_count())')"
nproc="${NPROC:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 1)}"
launcher=(deepspeed --no_local_rank --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  launcher+=(--hostfile "$HOSTFILE" --num_gpus "$nproc")
else
  launcher+=(--num_gpus "$nproc")
fi
exec "${launcher[@]}" "$here/edit.py" dist.strategy=deepspeed "dist.deepspeed_config=$ds_config" "$@"
