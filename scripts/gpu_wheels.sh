#!/usr/bin/env bash
# Wheels for what the lent GPU machine's image lacks (it reaches no package index), for its Python 3.12 on x86-64,
# into .whl/ (ignored by git); scripts/gpu_check.sh installs them there. Carry `.whl` with the device tool's `run`.
#
# What is carried is resolved, not listed: scripts/gpu_wheels.py resolves the project's requirements with pip
# against the image's package list (scripts/gpu_image_packages.txt, dated) and carries every package the image
# lacks or holds at a version that does not satisfy them (tests/unit/test_gpu_wheels.py checks that resolution).
# Besides those: DeepSpeed, built here from its source package for the ZeRO-3 GPU test, and the project's own
# wheel (its metadata). Any failure stops this script with a non-zero status, and the total (the tree plus .whl)
# is checked against the device tool's 64 MiB. bitsandbytes ships one CUDA library per CUDA release; only the
# CUDA 13 ones (the image's torch) and the CPU one are kept, and its RECORD is rewritten to match.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
"$PY" scripts/gpu_wheels.py download .whl
# DeepSpeed is published as a source package: built without its compiled ops (DS_BUILD_OPS=0; it compiles what
# it needs at run time). A failed build fails here: the ZeRO-3 test would otherwise skip on the machine.
DEEPSPEED=${DEEPSPEED:-0.19.8}
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$DEEPSPEED"
echo "deepspeed==$DEEPSPEED" >> .whl/CARRIED.txt
# the project itself: its metadata (version) is what a pushed version's requirements pin; gpu_check.sh puts the
# tree before it on PYTHONPATH, so the code that runs is the tree's
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl .
echo "expert-pipeline" >> .whl/CARRIED.txt
"$PY" - <<'PYEOF'
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
PYEOF
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
wheels=$(du -sb .whl | cut -f1)
echo "gpu_wheels: $(ls .whl/*.whl | wc -l) wheels, $((wheels / 1048576)) MiB; with the tree $(((tree + wheels) / 1048576)) MiB of 64"
if [ $((tree + wheels)) -gt $((64 * 1048576)) ]; then
  echo "gpu_wheels: the tree and .whl/ exceed the device tool's 64 MiB carry limit" >&2
  exit 1
fi
