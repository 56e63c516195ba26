#!/usr/bin/env bash
# What a GPU kernel costs per iteration, without a GPU: assembles a PTX file with ptxas
# (scripts/ptxas.sh), disassembles it with nvdisasm (fetched from PyPI into target/nvdisasm/
# on first use) and prints, for each entry, its registers and spills and the instruction mix
# of each loop. A tensor-core attention kernel's main loop is its largest: per warp and key
# tile, its `HMMA`s are the products and everything else is overhead.
# Usage: scripts/sass.sh KERNELS.ptx [ARCH]   (ARCH: the PTX's .target, or e.g. sm_90a)
# For example:
#   target/release/zebra compile bench/gpu_attention.zb --for attention --target sm_90 \
#       --emit artifact -o /tmp/bench && scripts/sass.sh /tmp/bench/kernels.ptx
set -euo pipefail
ptx=$(realpath "${1:?usage: scripts/sass.sh KERNELS.ptx [ARCH]}")
cd "$(dirname "$0")/.."
arch=${2:-$(sed -n 's/^\.target[[:space:]]*\([a-z0-9_]*\).*/\1/p' "$ptx" | head -1)}
scripts/ptxas.sh
[ -x target/ptxas/ptxas ] || { echo "sass.sh: no ptxas" >&2; exit 1; }
nvdisasm=target/nvdisasm/nvdisasm
if [ ! -x "$nvdisasm" ]; then
    mkdir -p target/nvdisasm
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --platform manylinux2014_x86_64 --python-version 3 --implementation py \
        -d "$tmp" "nvidia-cuda-nvdisasm==13.5.37" ||
        { echo "sass.sh: cannot download nvidia-cuda-nvdisasm (no pip or no network)" >&2; exit 1; }
    python3 - "$tmp" "$nvdisasm" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/bin/nvdisasm"))
    data = z.read(name)
with open(sys.argv[2] + ".tmp", "wb") as f:
    f.write(data)
os.chmod(sys.argv[2] + ".tmp", 0o755)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
PY
fi
work=$(mktemp -d)
target/ptxas/ptxas -arch="$arch" -v "$ptx" -o "$work/kernels.cubin" 2> "$work/ptxas.txt"
"$nvdisasm" -c "$work/kernels.cubin" > "$work/kernels.sass" 2>/dev/null
python3 - "$work/ptxas.txt" "$work/kernels.sass" <<'PY'
import collections, re, sys
usage = {}
entry = None
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '(\S+)'", line)
    if m:
        entry = m.group(1)
    m = re.search(r"(\d+) bytes spill stores", line)
    if m and entry:
        usage.setdefault(entry, {})["spilled"] = int(m.group(1))
    m = re.search(r"Used (\d+) registers", line)
    if m and entry:
        usage.setdefault(entry, {})["registers"] = int(m.group(1))
parts = re.split(r"//-+ \.text\.(\S+) -+", open(sys.argv[2]).read())
for name, body in zip(parts[1::2], parts[2::2]):
    labels, code = {}, []
    for line in body.splitlines():
        m = re.match(r"^\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(code)
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if m:
            code.append(m.group(1))
    u = usage.get(name, {})
    print(f"{name}: {u.get('registers', '?')} registers, {u.get('spilled', 0)} bytes spilled, "
          f"{len(code)} instructions")
    for end, text in enumerate(code):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", text)
        if not m or labels.get(m.group(1), end + 1) > end:
            continue
        start = labels[m.group(1)]
        mix = collections.Counter(
            re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in code[start:end + 1])
        top = ", ".join(f"{op} {n}" for op, n in mix.most_common(12))
        print(f"  loop of {end - start + 1} instructions: {top}")
PY
rm -rf "$work"
