#!/usr/bin/env bash
# The one prepared check for a lent NVIDIA H100/H200 (the device tool). It fails unless it ran on a GPU: no
# visible CUDA device, a carried wheel missing or not installable, an import or version that does not satisfy the
# requirements, any GPU test failed or skipped, or a benchmark target missed each exit non-zero.
#
#   here:   bash scripts/gpu_wheels.sh                # once: .whl/, resolved against the image's package list
#   device: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=480)
#   CPU:    PYTHON=.venv/bin/python WHEELS= bash scripts/gpu_check.sh --cpu-dry-run   # the check's code, on the CPU
#
# The whole check has 360 s (GPU_CHECK_BUDGET_S; the CPU dry run 1500): a step that would start past it fails.
# Steps, in order: wheels, versions (imports everything, prints the versions it tests), tests (pytest -rs, JUnit;
# skips fail), bench (benchmarks/bench_gpu.py, non-zero on a missed target). Each step that passes is recorded in
# .gpu-check/passed (ignored by git; kept on a warm machine) with a hash of the code it ran, so a rerun skips it;
# --fresh forgets the record. Results go to $OUT (the device tool's return folder) or /tmp/gpu-check: gpu.txt,
# versions.txt, pip-freeze.txt (to update scripts/gpu_image_packages.txt), gpu-tests.xml and .log, bench_gpu.log
# and .json, steps.txt. Put the table in docs/BENCHMARKS.md with the card's name.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
for arg in "$@"; do
  case $arg in
    --cpu-dry-run) mode=cpu ;;
    --fresh) rm -rf .gpu-check ;;
    *) echo "gpu_check: unknown option $arg (--cpu-dry-run, --fresh)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-/tmp/gpu-check}
# the whole check fits 6 minutes of a lent machine (its session has 15, starts included): each step gets what is
# left, and a step that would start with none fails, so an over-long check shows as such rather than as a timeout
BUDGET_S=${GPU_CHECK_BUDGET_S:-$([ $mode = cpu ] && echo 1500 || echo 360)}  # the CPU dry run: 2 slow cores
left() { local l=$((BUDGET_S - SECONDS)); [ $l -gt 0 ] || fail "$1" "the check is over its ${BUDGET_S} s budget (steps.txt has each step's time)"; echo $l; }
mkdir -p "$OUT" .gpu-check && echo "*" > .gpu-check/.gitignore
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS-.whl}  # the GPU image's Python 3.12 wheels; empty: use $PYTHON's own packages
code=$(cat scripts/gpu_*.sh scripts/gpu_*.py benchmarks/bench_gpu.py $(find pipeline tests/gpu tests/support -name '*.py' | sort) \
       2>/dev/null | sha256sum | cut -c1-16)
passed() { grep -qx "$mode $1 $code" .gpu-check/passed 2>/dev/null && echo "gpu_check: $1 passed before, skipped" | tee -a "$OUT/steps.txt"; }
record() { echo "$mode $1 $code" >> .gpu-check/passed; echo "gpu_check: $1 passed ($2 s)" | tee -a "$OUT/steps.txt"; }
fail() { echo "gpu_check: FAILED at $1: $2" | tee -a "$OUT/steps.txt" >&2; exit "${3:-1}"; }

# wheels: every carried wheel must be there (CARRIED.txt, written by gpu_wheels.sh) and install
if [ -n "$WHEELS" ]; then
  [ -f "$WHEELS/CARRIED.txt" ] || fail wheels "$WHEELS/CARRIED.txt is missing: run scripts/gpu_wheels.sh here and carry $WHEELS"
  shopt -s nocaseglob  # wheel file names keep their project's spelling (GitPython-..., PyYAML-...)
  for pin in $(cat "$WHEELS/CARRIED.txt"); do
    name=${pin%%==*}
    ls "$WHEELS"/"${name//-/_}"-*.whl >/dev/null 2>&1 || ls "$WHEELS"/"$name"-*.whl >/dev/null 2>&1 \
      || fail wheels "the carried wheel of $pin is missing from $WHEELS/ (did its build fail?)"
  done
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || fail wheels "installing $WHEELS/ failed"
  export PYTHONPATH=$PWD:/tmp/site  # the tree's code first; the project wheel there gives its metadata
else
  export PYTHONPATH=$PWD
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi: no GPU here"; } > "$OUT/gpu.txt"
cat "$OUT/gpu.txt"
"$PYTHON" -m pip list --format=freeze > "$OUT/pip-freeze.txt" 2>/dev/null

# versions: never skipped (it is what says which GPU and versions this run tested)
started=$SECONDS
carried_arg=()
[ -n "$WHEELS" ] && carried_arg=(--carried "$WHEELS/CARRIED.txt")
dry=()
[ $mode = cpu ] && dry=(--cpu-dry-run)
"$PYTHON" scripts/gpu_versions.py "${dry[@]}" "${carried_arg[@]}" 2>&1 | tee "$OUT/versions.txt"
rc=${PIPESTATUS[0]}
[ "$rc" = 3 ] && fail versions "no GPU was visible: this is not a GPU run (--cpu-dry-run for the CPU dry run)" 3
[ "$rc" = 0 ] || fail versions "imports or versions (see versions.txt)"
record versions $((SECONDS - started))

# tests: JUnit counts; any skip fails (a skipped GPU test proves nothing)
if ! passed tests; then
  started=$SECONDS
  if [ $mode = cpu ]; then
    export EXPERT_GPU_TESTS_ON_CPU=1
    tests=(tests/gpu/test_stages_gpu.py)  # test_train_gpu.py is the GPU's kernels only
  else
    tests=(tests/gpu)
  fi
  [ -n "${GPU_TESTS:-}" ] && read -ra tests <<< "$GPU_TESTS"  # a subset, e.g. to rerun one file
  budget=$(left tests) || exit 1
  timeout "$budget" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -rs --junitxml="$OUT/gpu-tests.xml" "${tests[@]}" 2>&1 \
    | tee "$OUT/gpu-tests.log"
  [ "${PIPESTATUS[0]}" = 0 ] || fail tests "pytest failed or ran past the budget's $budget s (gpu-tests.log)"
  skipped=$("$PYTHON" -c "import sys, xml.etree.ElementTree as E; r = E.parse(sys.argv[1]).getroot(); s = r if r.tag == 'testsuite' else r.find('testsuite'); print(s.get('skipped'), s.get('tests'))" "$OUT/gpu-tests.xml")
  read -r nskipped ntests <<< "$skipped"
  [ "$ntests" -gt 0 ] || fail tests "no test ran"
  [ "$nskipped" = 0 ] || fail tests "$nskipped of $ntests tests skipped (their reasons are in gpu-tests.log)"
  record tests $((SECONDS - started))
fi

# bench: non-zero on a missed target
if ! passed bench; then
  started=$SECONDS
  smoke=()
  [ $mode = cpu ] && smoke=(--cpu-smoke)
  budget=$(left bench) || exit 1
  timeout "$budget" "$PYTHON" benchmarks/bench_gpu.py "${smoke[@]}" --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
  [ "${PIPESTATUS[0]}" = 0 ] || fail bench "a target was missed, the benchmark failed or ran past $budget s (bench_gpu.log)"
  record bench $((SECONDS - started))
fi
echo "gpu_check: passed ($mode)"
