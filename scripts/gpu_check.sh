#!/usr/bin/env bash
# The one prepared check for a lent NVIDIA H100/H200 (the device tool; a few minutes of device time):
# the GPU-marked tests, then the LoRA/QLoRA throughput table of scripts/bench_gpu.py.
#
#   here:   bash scripts/gpu_wheels.sh          # once: wheels for what the GPU image lacks, into .whl/
#   device: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# Results go to $OUT (the device tool's return folder) or /tmp/gpu-check: gpu.txt, gpu-tests.log,
# bench_gpu.log and bench_gpu.json. Put the table in docs/BENCHMARKS.md with the card's name.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, trl, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'bitsandbytes', bitsandbytes.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
status=0
timeout 180 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu-tests.log" || status=1
timeout 300 python3 scripts/bench_gpu.py --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log" || status=1
exit $status
