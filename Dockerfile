# aleph-proxy container image.
#
#   docker build -t aleph-proxy:0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
#   docker run --rm aleph-proxy:0.1.0 --help
#
# Two stages: a Debian Rust image compiles the release binary, and the runtime
# image is distroless "cc" (glibc and the C runtime, no shell, no package
# manager), so the image is little more than the binary. TLS is rustls with the
# webpki roots compiled in: reaching api.satellogic.com needs no CA bundle from
# the image. (Behind a TLS-inspecting proxy, mount its CA and set
# `upstream_ca_file`.)
#
# The binary is the profile-guided glibc build that BENCHMARKS.md measures
# (scripts/pgo-build.sh: an instrumented build trained on `aleph-proxy demo`, then
# the release build laid out by that profile; per request about a fifth fewer
# instructions and half the instruction-cache misses of the plain release build). It takes
# about twice as long as a plain build; --build-arg PGO=0 builds without the
# profile (`cargo build --release`, the same source). A fully static musl
# build runs on distroless "static" instead (a smaller base image without glibc,
# 2 to 3 MiB less RSS), but musl's malloc costs it 7% more instructions and
# about 10% more CPU per request with two worker threads (BENCHMARKS.md, "The
# container's binary"):
#
#   docker build --build-arg RUST_TARGET=x86_64-unknown-linux-musl \
#     --build-arg RUNTIME_IMAGE=gcr.io/distroless/static-debian12:nonroot .

# Pin a minor (rust:1.95-slim-bookworm) or a digest for reproducible release
# builds; the crate's rust-version in Cargo.toml is the floor. The glibc build
# links against the build image's glibc: keep both images on the same Debian
# release (bookworm = debian12), or the binary may need a newer glibc than the
# runtime image has.
ARG RUST_IMAGE=rust:1-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS build

# x86_64 by default. For arm64 build on an arm64 host (or buildx with
# --platform linux/arm64) with --build-arg RUST_TARGET=aarch64-unknown-linux-gnu
# (or aarch64-unknown-linux-musl with the static runtime image).
ARG RUST_TARGET=x86_64-unknown-linux-gnu
# 1: the profile-guided build (scripts/pgo-build.sh); 0: a plain release build.
ARG PGO=1

# For a musl target, musl-tools provides musl-gcc, which the `cc` crate uses to
# compile ring's C and assembly. The glibc build uses the image's gcc. The
# profile-guided build trains the binary with curl and merges its profile with
# llvm-profdata from rustup's llvm-tools (the LLVM rustc uses).
RUN packages="" \
 && case "${RUST_TARGET}" in *-musl) packages="musl-tools" ;; esac \
 && if [ "${PGO}" = 1 ]; then packages="${packages} curl"; fi \
 && if [ -n "${packages}" ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends ${packages} \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && rustup target add "${RUST_TARGET}" \
 && if [ "${PGO}" = 1 ]; then rustup component add llvm-tools; fi

WORKDIR /src

# Dependency layer: compile every dependency against a stub crate that has the
# real Cargo.toml and Cargo.lock. Docker reuses this layer until one of those
# two files changes, so an edit under src/ recompiles aleph-proxy alone.
# Cargo refuses a manifest whose declared targets have no file, so every
# explicit [[bench]]/[[test]]/[[example]]/[[bin]]/[lib] in Cargo.toml needs a
# stub here too (.ci/validate-deploy.sh checks this list against Cargo.toml).
# `cargo clean -p` then drops the stub's own artefacts: COPY keeps the sources'
# original mtimes, which may be older than the stub's, and cargo would
# otherwise consider the stub build up to date. (PGO=1 builds with flags of its
# own, in target directories of its own: for it this layer only fetches the
# crates.)
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > benches/rewrite.rs \
 && if [ "${PGO}" = 1 ]; then \
      cargo fetch --locked; \
    else \
      cargo build --release --locked --target "${RUST_TARGET}" \
      && cargo clean --release --target "${RUST_TARGET}" -p aleph-proxy; \
    fi \
 && rm -rf src benches

# The whole context (trimmed by .dockerignore), so a build.rs, a new target or
# a file pulled in with include_str! is never missing from the image build.
COPY . .

# The profile-guided build compiles everything twice (instrumented, then with
# the profile).
# The readelf tests fail the build rather than ship a binary the runtime image
# cannot run: a musl build must be static (distroless "static" has no loader);
# a glibc build may need only the libraries distroless "cc" has (the same list
# is checked against every CI build by .ci/validate-deploy.sh). --help proves
# it starts.
RUN if [ "${PGO}" = 1 ]; then \
      bash scripts/pgo-build.sh --target "${RUST_TARGET}" --out /out/aleph-proxy; \
    else \
      cargo build --release --locked --target "${RUST_TARGET}" \
      && install -D -m 0755 "target/${RUST_TARGET}/release/aleph-proxy" /out/aleph-proxy; \
    fi \
 && case "${RUST_TARGET}" in \
      *-musl) if readelf -l /out/aleph-proxy | grep -q 'program interpreter'; then \
            echo 'aleph-proxy is dynamically linked; the static runtime image cannot run it' >&2; \
            exit 1; \
        fi ;; \
      *) for lib in $(readelf -d /out/aleph-proxy | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p'); do \
            case "$lib" in \
              libc.so.6|libm.so.6|libgcc_s.so.1|libpthread.so.0|libdl.so.2|librt.so.1|ld-linux-*) ;; \
              *) echo "aleph-proxy needs $lib, which distroless/cc does not have" >&2; exit 1 ;; \
            esac; \
        done ;; \
    esac \
 && /out/aleph-proxy --help > /dev/null

# ---------------------------------------------------------------------------
# distroless/cc:nonroot holds glibc and the C/C++ runtime libraries, /etc/passwd
# with user "nonroot" (65532), a CA bundle and tzdata; no shell, no package
# manager (distroless/static, for the musl build, the same without the
# libraries). The CA bundle is what the native-roots lookup adds to the trust
# store.
FROM ${RUNTIME_IMAGE}

ARG RUNTIME_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="aleph-proxy" \
      org.opencontainers.image.description="Authenticating sidecar proxy for Satellogic's Aleph API: injects a fresh OAuth2 token and the contract header into every request." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${RUNTIME_IMAGE}"

COPY --from=build /out/aleph-proxy /aleph-proxy

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 65532:65532

# In a container the client reaches the proxy over the container network, so
# the image listens on every interface. That exposes it to every container on
# that network: whoever runs the image sets an access guard
# (ALEPH_PROXY_ACCESS__KEY_FILE or ALEPH_PROXY_ACCESS__ALLOWED_CIDRS), or sets
# ALEPH_PROXY_LISTEN=127.0.0.1:8080 when the client shares the proxy's network
# namespace (a Kubernetes pod, compose `network_mode: service:...`).
# Environment variables take precedence over the TOML config file, so a
# mounted config file cannot change these: override them in the environment.
# JSON logs suit container log collectors; ALEPH_PROXY_LOG__FORMAT=text reads better by eye.
ENV ALEPH_PROXY_LISTEN=0.0.0.0:8080 \
    ALEPH_PROXY_ADMIN__LISTEN=0.0.0.0:9090 \
    ALEPH_PROXY_LOG__FORMAT=json

# 8080: the proxy. 9090: admin (/healthz, /readyz, /metrics), no API traffic.
EXPOSE 8080 9090

# The image has no shell or curl, so the binary probes itself: `healthcheck`
# GETs the running instance's /readyz and exits non-zero unless it is ready.
# The start period covers the first token fetch. The probe sees the container's
# environment but not its command line, so give a config file as
# ALEPH_PROXY_CONFIG rather than `--config`, or a non-default admin address in
# that file goes unseen by the probe.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["/aleph-proxy", "healthcheck"]

# SIGTERM starts a graceful drain (shutdown.drain_timeout, 25s by default):
# give `docker stop -t` / compose `stop_grace_period` more than that.
STOPSIGNAL SIGTERM

ENTRYPOINT ["/aleph-proxy"]
CMD ["run"]
