#!/usr/bin/env bash
# Fuzzes the frontend (parser, checker, lowering) with cargo-fuzz for N seconds (default 60),
# seeded with every example and fixture. cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP
# enables them on the pinned stable toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
corpus=fuzz/corpus/check
mkdir -p "$corpus"
cp examples/*.zb examples/*/*.zb tests/fixtures/*/*.zb "$corpus"/
cd fuzz
RUSTC_BOOTSTRAP=1 cargo fuzz run check corpus/check -- -max_total_time="$seconds" -max_len=4096
