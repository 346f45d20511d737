#!/usr/bin/env bash
# Wheels for the packages a lent GPU machine's image lacks (it reaches no package index), for its Python 3.12,
# at the versions this project's .venv uses. They go to .whl/ (ignored by git), which scripts/gpu_check.sh
# installs from; carry `.whl` with the device tool's `run` call. ~61 MB: with the working tree it fits the
# 64 MiB a call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
packages=()
for name in bitsandbytes trl transformers peft pydantic pydantic-core annotated-types typing-inspection; do
  packages+=("$name==$(version "$name")")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${packages[@]}"
du -sh .whl
