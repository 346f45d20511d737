#!/usr/bin/env bash
# The one prepared check for a lent NVIDIA H100/H200 (the device tool): the GPU-marked tests (JUnit file), then the
# training throughput table of benchmarks/bench_gpu.py. About 4 minutes of device time (6 at most: each part has
# a 3-minute timeout), within one call's limit, with time left for one rerun.
#
#   here:   bash scripts/gpu_wheels.sh          # once: wheels for what the GPU image lacks, into .whl/
#   device: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=420)
#   CPU:    PYTHON=.venv/bin/python WHEELS= bash scripts/gpu_check.sh   # end to end here, GPU parts skipped
#
# Results go to $OUT (the device tool's return folder) or /tmp/gpu-check: gpu.txt (card, driver, versions),
# gpu-tests.xml (JUnit) and gpu-tests.log, bench_gpu.log and bench_gpu.json. Put the table in docs/BENCHMARKS.md
# with the card's name. Without a GPU it runs end to end too: the tests skip with their reason and the benchmark
# says it is skipped (EXPERT_GPU_TESTS_ON_CPU=1 runs the tests' own code on the CPU instead, as a dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS-.whl}  # the GPU image's Python 3.12 wheels; empty: use $PYTHON's own packages
if [ -n "$WHEELS" ] && [ -d "$WHEELS" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "gpu_check: installing $WHEELS/ failed"; exit 1; }
  export PYTHONPATH=$PWD:/tmp/site  # the tree's code first; the project wheel there gives its metadata
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi: no GPU here"; } \
  | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch, transformers, peft, trl, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'bitsandbytes', bitsandbytes.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
status=0
timeout 180 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -rs --junitxml="$OUT/gpu-tests.xml" tests/gpu 2>&1 \
  | tee "$OUT/gpu-tests.log" || status=1
timeout 180 "$PYTHON" benchmarks/bench_gpu.py --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log" || status=1
echo "gpu_check: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
