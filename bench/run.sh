#!/usr/bin/env bash
# aleph-proxy benchmark: direct vs aleph-proxy vs nginx vs HAProxy, all on loopback.
#
#   bench/run.sh            full run (~30 min): the profile-guided release build the container
#                           image ships (scripts/pgo-build.sh, ~8 min), 7 alternating rounds of 5 s per
#                           target, 256-connection RSS run, 30 paired slices of aleph-w1 and
#                           the peers, 10 paced slices (each connection pausing 1 ms after each
#                           response: the same lighter load on every target, direct included),
#                           1 GiB download + 256 MiB upload;
#                           the target pinned to the last CPU, the rest on the others
#                           (--no-pin to turn that off)
#   bench/run.sh --smoke    CI smoke (~45 s): debug build, 1 round of 2 s, 16 MiB transfers;
#                           prints the table, asserts no numbers
#
# Needs (Debian): apt-get install -y nginx-light haproxy wrk curl python3
# Any other flag goes to bench/bench.py (--rounds N, --duration S, --conns C, --targets a,b,
# --no-transfers, --keep, --out FILE); --bin PATH uses a prebuilt aleph-proxy binary; --no-pgo
# measures the plain `cargo build --release` instead of the profile-guided build.
# Targets: direct, aleph-wN[+rw][+info|+json] (N tokio worker threads, 1 = the current-thread
# runtime; +rw link rewriting on; +info RUST_LOG=info instead of warn, the default access log
# line per request; +json the same as JSON lines), nginx-wN[+log] (+log: nginx's default access
# log to a file), haproxy-wN (N workers / threads). The ratios "vs best peer" are against the
# nginx and HAProxy targets without +log.
# The builds use CARGO_TARGET_DIR if set (default: target/).
# Results: printed, and written to bench/out/latest.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

smoke=0
pgo=1
bin=""
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --smoke) smoke=1 ;;
        --no-pgo) pgo=0 ;;
        --bin) bin="$2"; shift ;;
        *) args+=("$1") ;;
    esac
    shift
done

target_dir="${CARGO_TARGET_DIR:-target}"
if [[ -z "$bin" ]]; then
    if [[ $smoke -eq 1 ]]; then
        # The debug build CI already has for the tests: the smoke run checks that the benchmark
        # works, not how fast it is.
        cargo build --quiet --bin aleph-proxy
        bin="$target_dir/debug/aleph-proxy"
    elif [[ $pgo -eq 1 ]]; then
        bash scripts/pgo-build.sh --out "$target_dir/pgo/aleph-proxy"
        bin="$target_dir/pgo/aleph-proxy"
    else
        cargo build --quiet --release --bin aleph-proxy
        bin="$target_dir/release/aleph-proxy"
    fi
fi

mkdir -p bench/out
if [[ $smoke -eq 1 ]]; then
    set -- --rounds 1 --duration 2 --download-mib 16 --upload-mib 16 --transfer-rounds 1 --paired-slices 2 --paired-seconds 1 --paced-slices 1 \
        --targets direct,aleph-w1,aleph-w2,nginx-w1,haproxy-w1,aleph-w1+json,nginx-w1+log \
        --paired aleph-w1,nginx-w1,haproxy-w1
else
    set --
fi
exec python3 bench/bench.py --bin "$bin" --out bench/out/latest.md "$@" ${args[@]+"${args[@]}"}
