#!/usr/bin/env bash
# Fuzzing, briefly, from CI or by hand.
#
# Always: the proptest properties of the library (`cargo test --lib prop_`): config parsing
# never panics nor echoes a secret, contract routing picks the first segment-boundary prefix,
# access control accepts only allowed hosts and the exact key. They run on stable.
#
# Then, when cargo-fuzz and a nightly toolchain are installed: every cargo-fuzz target in fuzz/
# for FUZZ_SECONDS seconds each (default 30). Corpora grow in fuzz/corpus/<target> (ignored by
# git); a crash leaves its input in fuzz/artifacts/<target> and fails this script. Reproduce with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<crash-file>
# Without them, or with FUZZ_SECONDS=0, this says so and stops after the properties (exit 0).
# The first fuzz build compiles every dependency with nightly and sanitizers: about 25 minutes
# on two cores; later runs reuse fuzz/target.
#
# Usage: .ci/fuzz.sh [target ...]   (default: every target in fuzz/Cargo.toml)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds="${FUZZ_SECONDS:-30}"

echo "== proptest properties (cargo test --lib prop_)"
cargo test --locked --lib prop_

if [[ "$seconds" == 0 ]]; then
    echo "fuzz: FUZZ_SECONDS=0: ran the proptest properties only"
    exit 0
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: no nightly toolchain (rustup toolchain install nightly): ran the proptest properties only"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz is not installed (cargo install cargo-fuzz): ran the proptest properties only"
    exit 0
fi

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
for t in "${targets[@]}"; do
    echo "== cargo +nightly fuzz run $t (${seconds}s)"
    cargo +nightly fuzz run "$t" -- -max_total_time="$seconds" -timeout=10
done
echo "fuzz: ${#targets[@]} target(s), ${seconds}s each, no crash"
