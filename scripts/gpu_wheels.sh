#!/usr/bin/env bash
# Wheels for the packages a lent GPU machine's image lacks (it reaches no package index), for its Python 3.12, at
# the versions this project's .venv uses, into .whl/ (ignored by git); scripts/gpu_check.sh installs them there.
# Carry `.whl` with the device tool's `run` call: the tree plus the wheels must stay under its 64 MiB.
#
# The list is what `expert run` and `expert serve` import on that image (it has torch, accelerate, tokenizers,
# pyarrow, pandas, typer, rich, httpx, pytest, ...: /work/.library/device/KINDS.md), checked here by running the
# GPU tests on the CPU in a virtual environment holding only the image's packages plus these wheels (docs/
# BENCHMARKS.md, "GPU path"). bitsandbytes ships one CUDA library per CUDA release (42 MB); only the CUDA 13
# ones (the image's torch) and the CPU one are kept, and its RECORD is rewritten to match.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
PACKAGES=(
  bitsandbytes trl transformers peft datasets dill multiprocess
  pydantic pydantic-core annotated-types typing-inspection
  mlflow-skinny opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
  cachetools sqlparse sqlalchemy alembic mako importlib-metadata python-dotenv
  starlette uvicorn jsonschema referencing rpds-py jsonschema-specifications llguidance
  openai jiter distro sniffio fastapi databricks-sdk cryptography cffi pycparser
)
rm -rf .whl && mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pins=()
for name in "${PACKAGES[@]}"; do pins+=("$name==$(version "$name")"); done
platforms=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
           manylinux_2_17 manylinux2014; do platforms+=(--platform "${tag}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "${pins[@]}"
# DeepSpeed (for the ZeRO launch configs' GPU test) is published as a source package: built here without its
# compiled ops (DS_BUILD_OPS=0; it compiles what it needs at run time), ~2 MB; it needs hjson (and einops,
# ninja, py-cpuinfo, msgpack, which the image has)
DEEPSPEED=${DEEPSPEED:-0.19.8}
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$DEEPSPEED" 2>&1 | grep -v '^WARNING' || true
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl hjson 2>&1 | grep -v '^WARNING' || true
# the project itself: its metadata (version) is what a pushed version's requirements pin; gpu_check.sh puts the
# tree before it on PYTHONPATH, so the code that runs is the tree's
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl . 2>&1 | grep -v '^WARNING' || true
"$PY" - <<'EOF'
"""Keep bitsandbytes' CPU and CUDA 13 libraries only, with a RECORD that lists what is left."""
import glob, os, re, zipfile

(wheel,) = glob.glob(".whl/bitsandbytes-*.whl")
kept = os.path.join(".whl", "stripped.tmp")
drop = re.compile(r"bitsandbytes/libbitsandbytes_(?!cpu|cuda13)\w+\.so$")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(kept, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if drop.search(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = [l for l in data.decode().splitlines() if not drop.search(l.split(",")[0])]
            data = ("\n".join(lines) + "\n").encode()
        dst.writestr(item, data)
os.replace(kept, wheel)
EOF
du -sh .whl
