#!/usr/bin/env bash
# Profile-guided release build of aleph-proxy: the binary the container image ships and
# bench/run.sh measures (BENCHMARKS.md, "Profile-guided build").
#
#   scripts/pgo-build.sh [--target TRIPLE] [--out PATH]
#
# 1. Builds an instrumented release binary (rustc -Cprofile-generate).
# 2. Trains it on `aleph-proxy demo`, the proxy in front of its built-in mock of the Aleph API,
#    with curl (32 transfers at a time, kept-alive connections): JSON calls with link rewriting,
#    paginated lists, STAC searches by GET and POST, gzip, HEAD, asset downloads whole and by
#    range, 4 MiB uploads. Twice: on the current-thread runtime with warnings only, and on two
#    worker threads with the JSON access log (the container's default). Every answer must be
#    the expected 2xx: a profile of error paths would lay out the wrong code.
# 3. Merges the profiles with llvm-profdata from rustup's llvm-tools component (added when
#    missing; it must be the LLVM rustc itself uses).
# 4. Builds the release binary again with -Cprofile-use, puts it under the same load (every
#    answer checked again) and copies it to PATH (default: $CARGO_TARGET_DIR/pgo/aleph-proxy,
#    CARGO_TARGET_DIR defaulting to target).
#
# The source is the same as `cargo build --release`; only the code layout and inlining follow
# the profile. The builds use their own target directories (pgo-generate, pgo-use; the profiles
# in pgo-profiles), so the plain release build is left as it is. Needs curl. About twice a plain
# release build's time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

host="$(rustc -vV | sed -n 's/^host: //p')"
target="$host"
out=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --target) target="$2"; shift ;;
        --out) out="$2"; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "pgo-build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
base="${CARGO_TARGET_DIR:-target}"
out="${out:-$base/pgo/aleph-proxy}"
command -v curl >/dev/null || { echo "pgo-build.sh: needs curl" >&2; exit 1; }

# llvm-profdata of rustc's own LLVM: a distribution's LLVM cannot read newer profile formats.
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [[ ! -x "$profdata" ]]; then
    rustup component add llvm-tools
fi
[[ -x "$profdata" ]] || { echo "pgo-build.sh: $profdata not found (rustup component add llvm-tools)" >&2; exit 1; }

work="$(mktemp -d)"
demo_pid=""
cleanup() {
    [[ -n "$demo_pid" ]] && kill "$demo_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

step() { printf '==> pgo-build: %s\n' "$*" >&2; }

# Fixed paths, so the instrumented build is incremental; rustc lists the merged profile among a
# crate's inputs, so a new profile rebuilds every crate of the optimised build.
profiles="$(realpath -m "$base/pgo-profiles")"
rm -rf "$profiles"
mkdir -p "$profiles"

# With --target, RUSTFLAGS reach the binary's crates only, not build scripts and proc macros.
step "instrumented build ($target)"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$profiles/raw" \
    cargo build --release --locked --target "$target" --target-dir "$base/pgo-generate" --bin aleph-proxy
instrumented="$base/pgo-generate/$target/release/aleph-proxy"

head -c $((4 << 20)) /dev/zero > "$work/upload.bin"

# Runs the given curl transfers against the proxy at $addr and checks every status code.
load() {
    local want="$1"; shift
    curl --silent --no-progress-meter --parallel --parallel-max 32 --output /dev/null \
        --write-out '%{http_code}\n' "$@" > "$work/codes" || true
    local bad
    bad="$(grep -cv "^$want\$" "$work/codes" || true)"
    if [[ "$bad" != 0 || ! -s "$work/codes" ]]; then
        echo "pgo-build.sh: training load got $bad answers other than $want from $*:" >&2
        sort "$work/codes" | uniq -c >&2
        exit 1
    fi
}

# One pass of the load on `BINARY demo`: WHAT THREADS RUST_LOG FORMAT BINARY.
train() {
    local what="$1" threads="$2" log="$3" format="$4" binary="$5"
    step "$what: $threads worker thread(s), RUST_LOG=$log, $format logs"
    TOKIO_WORKER_THREADS="$threads" RUST_LOG="$log" "$binary" demo \
        --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --log-format "$format" \
        > "$work/demo.out" 2> "$work/demo.log" &
    demo_pid=$!
    local addr=""
    for _ in $(seq 100); do
        addr="$(sed -n 's|.*the proxy on http://\([0-9.:]*\) .*|\1|p' "$work/demo.out")"
        [[ -n "$addr" ]] && break
        kill -0 "$demo_pid" 2>/dev/null || break
        sleep 0.1
    done
    if [[ -z "$addr" ]]; then
        echo "pgo-build.sh: the demo did not start:" >&2
        cat "$work/demo.out" "$work/demo.log" >&2
        exit 1
    fi
    local u="http://$addr"
    local asset="$u/assets/l1d/20240101_120000_SN00_L1D_0000/analytic"
    # Streamed answers as the benchmark's small JSON is (no rewriting: a 206 of image bytes).
    load 206 --range 0-1023 "$asset?n=[1-6000]"
    load 200 "$u/tasking/products/?n=[1-4000]"
    load 200 "$u/tasking/tasks/?limit=2&n=[1-3000]"
    load 200 "$u/archive/stac/search?limit=3&n=[1-3000]"
    load 200 --compressed "$u/archive/stac/search?limit=5&n=[1-500]"
    load 200 -H 'content-type: application/json' --data '{"limit":2}' "$u/archive/stac/search?n=[1-1000]"
    load 200 --head "$u/archive/stac/collections?n=[1-500]"
    load 200 "$u/contracts?n=[1-200]"
    load 200 "$u/v2/orders?n=[1-1000]"
    load 200 "$asset?n=[1-48]"
    load 201 -H 'content-type: application/json' --data-binary "@$work/upload.bin" "$u/tasking/tasks/?n=[1-24]"
    # SIGTERM: the proxy drains and exits, which writes the profile.
    kill -TERM "$demo_pid"
    wait "$demo_pid" || { echo "pgo-build.sh: the demo did not exit cleanly" >&2; cat "$work/demo.log" >&2; exit 1; }
    demo_pid=""
}
train training 1 warn text "$instrumented"
train training 2 info json "$instrumented"

step "merging profiles"
"$profdata" merge -o "$profiles/merged.profdata" "$profiles/raw"

step "optimised build ($target)"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$profiles/merged.profdata" \
    cargo build --release --locked --target "$target" --target-dir "$base/pgo-use" --bin aleph-proxy
optimised="$base/pgo-use/$target/release/aleph-proxy"
# The same load and answers from the binary that ships, on both runtimes.
train check 1 warn text "$optimised"
train check 2 info json "$optimised"
mkdir -p "$(dirname "$out")"
install -m 0755 "$optimised" "$out"
step "done: $out"
