#!/usr/bin/env bash
# Fetches NVIDIA's PTX assembler (ptxas, from the nvidia-cuda-nvcc-cu12 wheel on PyPI) into
# target/ptxas/, so that the tests assemble every GPU kernel and read its registers, spills
# and shared memory as the driver will, on machines without CUDA. Idempotent; without
# network or pip it says so and the tests that need ptxas skip.
set -uo pipefail
cd "$(dirname "$0")/.."
out=target/ptxas
[ -x "$out/ptxas" ] && exit 0
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux2010_x86_64 --python-version 3 --implementation py \
    -d "$tmp" "nvidia-cuda-nvcc-cu12==12.9.86" 2>/dev/null; then
    echo "ptxas.sh: cannot download nvidia-cuda-nvcc-cu12 (no pip or no network); the tests that assemble PTX will skip" >&2
    exit 0
fi
python3 - "$tmp" "$out" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    data = z.read("nvidia/cuda_nvcc/bin/ptxas")
path = os.path.join(sys.argv[2], "ptxas")
with open(path + ".tmp", "wb") as f:
    f.write(data)
os.chmod(path + ".tmp", 0o755)
os.replace(path + ".tmp", path)
PY
"$out/ptxas" --version | tail -1
