#!/usr/bin/env bash
# `make test`: set-up, build, tests, each phase timed. Run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

declare -a PHASES=()
phase() {
    local name=$1; shift
    local t0=$SECONDS
    echo "==> $name"
    "$@"
    PHASES+=("$(printf '%-28s %4ds' "$name" $((SECONDS - t0)))")
}
summary() {
    echo
    echo "==> phase times"
    for p in "${PHASES[@]}"; do echo "    $p"; done
}
trap summary EXIT

echo "CARGO_TARGET_DIR=${CARGO_TARGET_DIR}"
phase "setup (system packages)" scripts/setup.sh test
if cargo fmt --version >/dev/null 2>&1; then
    phase "format check" cargo fmt --all --check
fi
# The first build compiles RocksDB's C++ (most of a cold run).
phase "build (libraries, benches)" cargo build --workspace --benches
if cargo nextest --version >/dev/null 2>&1; then
    phase "build (tests)" cargo nextest run --workspace --no-run
    phase "tests (nextest)" cargo nextest run --workspace --no-fail-fast
else
    echo "(cargo-nextest not installed: using cargo test)"
    phase "build (tests)" cargo test --workspace --no-run
    phase "tests (cargo test)" cargo test --workspace --no-fail-fast
fi
if cargo clippy --version >/dev/null 2>&1; then
    phase "lint (clippy)" cargo clippy --workspace --all-targets -- -D warnings
fi
