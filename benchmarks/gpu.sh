#!/usr/bin/env bash
# The GPU numbers of docs/performance.md "GPU", in one go (about 6 minutes on one H100):
#
#     benchmarks/gpu.sh OUT_DIR [SMOLLM2_DIR] [DATA_DIR]
#
# 1. `locft bench` at the Llama-3-8B shape (bf16, the authors' layer 22) and on a 24-layer slice of the
#    Qwen2.5-72B shape (layer 16): random weights of the real layer shapes, nothing downloaded; locft-dist's
#    loop twice (the second without the process's one-time GPU set-up).
# 2. `locft bench --model` on SmolLM2-135M with real CounterFact edits encoded by its tokenizer, its last
#    layer, bf16 and fp32. SMOLLM2_DIR defaults to the real-model cache; a directory holding only its
#    config and tokenizer gets random weights of that architecture (the speed does not depend on them).
# 3. benchmarks/eval_cost.py on the GPU: `locft edit` with default evaluation against the naive loop.
# 4. `locft edit` on SmolLM2 in bf16 with the shipped preset, 500 CounterFact edits (DATA_DIR defaults to
#    ../shared/data): the single-GPU product path end to end.
#
# Each step has its own time limit and a failing step does not stop the next; everything goes to
# OUT_DIR/suite.log and the benches' numbers to OUT_DIR/*.json.
set -uo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT_DIR [SMOLLM2_DIR] [DATA_DIR]}
smol=${2:-${XDG_CACHE_HOME:-$HOME/.cache}/locft-dist/models/smollm2-135m-instruct}
data=${3:-../shared/data}
edits=$data/counterfact_3k.json
py=${PYTHON:-python3}
mkdir -p "$out"
log="$out/suite.log"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log it, report its status and time
    local name=$1 limit=$2 began rc
    shift 2
    echo "=== $name: $*" | tee -a "$log"
    began=$(date +%s)
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $(($(date +%s) - began)) s" | tee -a "$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
torch.cuda.get_device_name())" 2>&1 | tee -a "$log"

step bench_8b 150 $py -m locft_dist.cli bench --device cuda --shape llama3-8b --dtype bfloat16 --layer 22 \
    --num-edits 2000 --epochs 5 --batch-size 100 --repeat 2 --json "$out/bench_8b.json"
step bench_72b_slice 200 $py -m locft_dist.cli bench --device cuda --shape qwen2.5-72b --num-layers 24 \
    --layer 16 --dtype bfloat16 --num-edits 1000 --epochs 5 --batch-size 100 --repeat 2 --json "$out/bench_72b.json"

if [[ ! -f "$smol/model.safetensors" ]]; then
    echo "=== $smol holds no weights: SmolLM2's architecture and tokenizer with random weights" | tee -a "$log"
    $py - "$smol" /tmp/smollm2-random <<'EOF' 2>&1 | tee -a "$log"
import shutil, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM
source, target = sys.argv[1:]
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
model.save_pretrained(target)
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
    try:
        shutil.copy(f"{source}/{name}", target)
    except FileNotFoundError:
        pass
EOF
    smol=/tmp/smollm2-random
fi
step bench_smollm2_bf16 120 $py -m locft_dist.cli bench --device cuda --model "$smol" --edits "$edits" \
    --skip-invalid --dtype bfloat16 --num-edits 2000 --epochs 5 --batch-size 100 --json "$out/bench_smollm2_bf16.json"
step bench_smollm2_fp32 90 $py -m locft_dist.cli bench --device cuda --model "$smol" --edits "$edits" \
    --skip-invalid --num-edits 200 --epochs 5 --batch-size 20 --json "$out/bench_smollm2_fp32.json"

step eval_cost 240 $py benchmarks/eval_cost.py --work /tmp/eval_cost --device cuda

$py -m locft_dist.cli convert --skip-invalid --limit 500 "$data/counterfact_full.jsonl" /tmp/cf500.jsonl 2>&1 |
    tee -a "$log"
$py studies/locality_file.py --pool "$data/counterfact_full.jsonl" --edits /tmp/cf500.jsonl --num 3000 \
    --out /tmp/locality.jsonl 2>&1 | tee -a "$log"
step edit_smollm2_bf16 150 $py -m locft_dist.cli edit model.path="$smol" model.dtype=bfloat16 \
    edits.path=/tmp/cf500.jsonl locate.preset=smollm2-135m augment.locality_path=/tmp/locality.jsonl \
    train.progress=false output.dir=/tmp/edit_smollm2 output.overwrite=true
cp /tmp/edit_smollm2/metrics.json "$out/edit_smollm2_metrics.json" 2>/dev/null
exit 0
