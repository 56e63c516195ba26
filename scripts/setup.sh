#!/usr/bin/env bash
# Installs what Zebra needs on a Debian machine: LLVM 22 and MLIR 22 (for melior and inkwell)
# and the libraries they link. Idempotent: when everything is there it only checks, in well
# under a second.
set -euo pipefail

packages=(
  llvm-22-dev libmlir-22-dev mlir-22-tools libclang-22-dev clang-22 libpolly-22-dev
  libzstd-dev libz3-dev libxml2-dev zlib1g-dev
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for needed in /usr/lib/llvm-22/lib/libMLIR.so /usr/lib/llvm-22/bin/llvm-config /usr/lib/llvm-22/bin/mlir-tblgen; do
  if [ ! -e "$needed" ]; then
    echo "setup: error: $needed is missing after installing LLVM 22 and MLIR 22" >&2
    exit 1
  fi
done

if ! command -v cargo >/dev/null; then
  echo "setup: error: cargo is not installed; install Rust with rustup (https://rustup.rs)" >&2
  exit 1
fi
