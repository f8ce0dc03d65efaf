#!/usr/bin/env bash
# Validates the deployment files without a cluster, a Docker engine or network
# access beyond PyPI:
#   - every Kubernetes manifest in deploy/kubernetes/ against the API schemas of
#     Kubernetes 1.29 (the first release with native sidecars on by default)
#     and of the newest release kubernetes-validate knows, strictly (unknown
#     fields are errors, so a misspelt securityContext key fails here rather
#     than being silently dropped by the API server);
#   - the kustomization lists exactly those manifests;
#   - deploy/docker-compose.yaml parses and keeps its safety properties;
#   - cross-file invariants: drain timeout < grace periods, every ALEPH_PROXY_*
#     variable and TOML key used is one the proxy accepts (KNOWN_KEYS in
#     src/config.rs), the Dockerfile's dependency-layer stubs cover every
#     explicit target in Cargo.toml, and the binary CI built needs no shared
#     library the runtime image (distroless/cc) lacks.
# kubernetes-validate ships its schemas inside the package, so after the one
# pip install this runs offline. Run from anywhere; it works from the repo root.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# 1.29: floor for `restartPolicy: Always` init containers (alpha in 1.28).
MIN_K8S_VERSION="${MIN_K8S_VERSION:-1.29.0}"
KUBERNETES_VALIDATE_REQ='kubernetes-validate>=1.29,<2'

PY="${PYTHON:-python3}"

if ! "$PY" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
    echo "installing kubernetes-validate (PyPI)"
    "$PY" -m pip install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE_REQ"
fi

status=0
fail() { echo "FAIL: $*" >&2; status=1; }

manifests=()
for f in deploy/kubernetes/*.yaml deploy/kubernetes/*.yml; do
    [[ -e "$f" ]] || continue
    # Kustomization is a kustomize file, not an API object: checked below.
    [[ "$(basename "$f")" == kustomization.y*ml ]] && continue
    manifests+=("$f")
done
if [[ ${#manifests[@]} -eq 0 ]]; then
    fail "no manifests found in deploy/kubernetes/"
fi

latest="$("$PY" -c 'import kubernetes_validate.utils as u; print(u.latest_version())')"
for version in "$MIN_K8S_VERSION" "$latest"; do
    echo "== kubernetes-validate --strict -k $version"
    # --no-warn is not used: a kind with no schema is only a warning, and that
    # warning is the one sign that a manifest went unchecked.
    if ! out="$("$PY" -m kubernetes_validate --strict -k "$version" "${manifests[@]}" 2>&1)"; then
        status=1
    fi
    echo "$out"
    if grep -q "Couldn't find schema" <<<"$out"; then
        fail "a manifest has a kind without a schema for $version (checked nothing)"
    fi
done

echo "== cross-checks"
"$PY" - "${manifests[@]}" <<'PY' || status=1
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib

import yaml

manifests = sys.argv[1:]
problems = []


def duration_s(text):
    """'25s', '1m30s', '500ms', or a bare number of seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total, pos = 0.0, 0
    for m in re.finditer(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)", text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"cannot parse duration {text!r}")
    return total


# --- Kubernetes ---------------------------------------------------------------
docs = []
for path in manifests:
    with open(path) as fh:
        docs += [(path, d) for d in yaml.safe_load_all(fh) if d]

kust_path = "deploy/kubernetes/kustomization.yaml"
if os.path.exists(kust_path):
    with open(kust_path) as fh:
        kust = yaml.safe_load(fh)
    listed = {os.path.normpath(os.path.join("deploy/kubernetes", r)) for r in kust.get("resources", [])}
    present = {os.path.normpath(p) for p in manifests}
    for missing in sorted(listed - present):
        problems.append(f"{kust_path} lists {missing}, which does not exist")
    for unlisted in sorted(present - listed):
        problems.append(f"{kust_path} does not list {unlisted}")

toml_drain = None
for path, d in docs:
    if d.get("kind") == "ConfigMap":
        for key, text in (d.get("data") or {}).items():
            if key.endswith(".toml"):
                try:
                    cfg = tomllib.loads(text)
                except tomllib.TOMLDecodeError as e:
                    problems.append(f"{path}: {key} is not valid TOML: {e}")
                    continue
                drain = cfg.get("shutdown", {}).get("drain_timeout")
                if drain is not None:
                    toml_drain = duration_s(drain)
                # The image's ENV defaults beat the file: a value set here would be ignored.
                shadowed = {"listen": "ALEPH_PROXY_LISTEN", "admin.listen": "ALEPH_PROXY_ADMIN__LISTEN", "log.format": "ALEPH_PROXY_LOG__FORMAT"}
                for k, var in shadowed.items():
                    section, _, leaf = k.rpartition(".")
                    table = cfg.get(section, {}) if section else cfg
                    if isinstance(table, dict) and leaf in table:
                        problems.append(
                            f"{path}: {key} sets `{k}`, which the image's {var} env overrides; set {var} in the Deployment's env"
                        )

drain_k8s = toml_drain if toml_drain is not None else 25.0
for path, d in docs:
    if d.get("kind") != "Deployment":
        continue
    spec = d["spec"]["template"]["spec"]
    grace = spec.get("terminationGracePeriodSeconds", 30)
    sidecars = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    proxies = [c for c in sidecars if c["name"] == "aleph-proxy"]
    if not proxies:
        problems.append(f"{path}: no aleph-proxy native sidecar (initContainers entry with restartPolicy: Always)")
        continue
    proxy = proxies[0]
    env = {e["name"]: e.get("value") for e in proxy.get("env", [])}
    if grace <= drain_k8s:
        problems.append(f"{path}: terminationGracePeriodSeconds {grace} must exceed the drain timeout {drain_k8s:g}s")
    listen = env.get("ALEPH_PROXY_LISTEN", "0.0.0.0:8080")
    if not listen.startswith("127.") and not listen.startswith("[::1]"):
        if not any(k.startswith("ALEPH_PROXY_ACCESS__") for k in env):
            problems.append(f"{path}: proxy listens on {listen} with no ALEPH_PROXY_ACCESS__* guard")
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        sc = c.get("securityContext", {})
        for key, want in (("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False)):
            if sc.get(key) is not want:
                problems.append(f"{path}: container {c['name']}: securityContext.{key} should be {want}")
        if "ALL" not in (sc.get("capabilities", {}).get("drop") or []):
            problems.append(f"{path}: container {c['name']}: capabilities.drop should include ALL")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe not in proxy:
            problems.append(f"{path}: aleph-proxy has no {probe}")
    if spec.get("enableServiceLinks", True):
        problems.append(f"{path}: enableServiceLinks must be false (a Service named aleph-proxy would inject ALEPH_PROXY_* variables)")

# --- Docker Compose -----------------------------------------------------------
compose_path = "deploy/docker-compose.yaml"
try:
    with open(compose_path) as fh:
        compose = yaml.safe_load(fh)
except yaml.YAMLError as e:
    problems.append(f"{compose_path} is not valid YAML: {e}")
    compose = None

if compose is not None:
    services = compose.get("services") or {}
    proxy = services.get("aleph-proxy")
    if proxy is None:
        problems.append(f"{compose_path}: no aleph-proxy service")
    else:
        env = proxy.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        drain = duration_s(env.get("ALEPH_PROXY_SHUTDOWN__DRAIN_TIMEOUT", "25s"))
        grace = duration_s(proxy.get("stop_grace_period", "10s"))
        if grace <= drain:
            problems.append(f"{compose_path}: stop_grace_period {grace:g}s must exceed the drain timeout {drain:g}s")
        listen = env.get("ALEPH_PROXY_LISTEN", "0.0.0.0:8080")
        if not listen.startswith("127.") and not any(
            k in env for k in ("ALEPH_PROXY_ACCESS__KEY_FILE", "ALEPH_PROXY_ACCESS__KEY", "ALEPH_PROXY_ACCESS__ALLOWED_CIDRS")
        ):
            problems.append(f"{compose_path}: proxy listens on {listen} with no access guard")
        if "ALEPH_PROXY_AUTH__CLIENT_SECRET" in env:
            problems.append(f"{compose_path}: pass the client secret as a secret file, not ALEPH_PROXY_AUTH__CLIENT_SECRET")
        if "healthcheck" not in proxy:
            problems.append(f"{compose_path}: aleph-proxy has no healthcheck")
        declared = set((compose.get("secrets") or {}).keys())
        for s in proxy.get("secrets", []):
            name = s if isinstance(s, str) else s.get("source")
            if name not in declared:
                problems.append(f"{compose_path}: secret {name} is not declared at the top level")
    for name, svc in services.items():
        if name == "aleph-proxy":
            continue
        dep = (svc.get("depends_on") or {})
        if isinstance(dep, dict) and "aleph-proxy" in dep:
            if dep["aleph-proxy"].get("condition") != "service_healthy":
                problems.append(f"{compose_path}: {name} should wait for aleph-proxy with condition: service_healthy")

# --- Dockerfile stubs vs Cargo.toml targets -----------------------------------
with open("Cargo.toml", "rb") as fh:
    cargo = tomllib.load(fh)
with open("Dockerfile") as fh:
    dockerfile = fh.read()
stub_block = dockerfile.split("COPY Cargo.toml Cargo.lock ./", 1)[-1].split("COPY . .", 1)[0]
defaults = {"bin": "src/bin/{}.rs", "bench": "benches/{}.rs", "test": "tests/{}.rs", "example": "examples/{}.rs"}
targets = []
if "lib" in cargo and "path" in cargo["lib"]:
    targets.append(("lib", cargo["lib"]["path"]))
for kind, pattern in defaults.items():
    for t in cargo.get(kind, []):
        path = t.get("path")
        if path is None:
            if kind == "bin" and t.get("name") == cargo.get("package", {}).get("name"):
                path = "src/main.rs"
            else:
                path = pattern.format(t["name"])
        targets.append((kind, path))
for kind, path in targets:
    if path not in stub_block:
        problems.append(
            f"Cargo.toml declares {kind} target {path}, which the Dockerfile's dependency layer does not stub: the image build would fail"
        )

# --- the binary's shared libraries vs the runtime image ------------------------
# The image ships the glibc build on distroless/cc (glibc and the C/C++ runtime libraries).
# The Dockerfile refuses a binary that needs more than glibc and libgcc; the same list (read
# from the Dockerfile) is checked here against the build CI just made, so a new dependency
# that links a system library fails here, not only in an image build.
allowed = re.search(r'case "\$lib" in \\\n\s*([\w.|*+-]+)\)', dockerfile)
if not allowed:
    problems.append("Dockerfile: the list of libraries distroless/cc provides was not found")
else:
    allowed = set(allowed.group(1).split("|"))
    for build in ("target/debug/aleph-proxy", "target/release/aleph-proxy", "target/pgo/aleph-proxy"):
        if not os.path.exists(build):
            continue
        if shutil.which("readelf") is None:
            print("note: readelf not found; the binary's shared libraries not checked")
            break
        out = subprocess.run(["readelf", "-d", build], capture_output=True, text=True, check=True).stdout
        needed = re.findall(r"Shared library: \[(.+?)\]", out)
        missing = [lib for lib in needed if not any(fnmatch.fnmatchcase(lib, a) for a in allowed)]
        for lib in missing:
            problems.append(f"{build} needs {lib}, which the runtime image (distroless/cc) does not have")
        if not missing:
            print(f"{build}: needs {', '.join(needed) or 'nothing'}, all in the runtime image")

# --- configuration keys vs the ones the proxy accepts ---------------------------
# The proxy refuses unknown keys at start-up, so a misspelt env var or TOML key
# in these files would only show as a crash-looping container. The accepted
# keys are read from KNOWN_KEYS in src/config.rs.
known = None
try:
    with open("src/config.rs") as fh:
        m = re.search(r"const KNOWN_KEYS: &\[&str\] = &\[(.*?)\];", fh.read(), re.S)
    if m:
        known = set(re.findall(r'"([^"]+)"', m.group(1)))
except FileNotFoundError:
    pass
if not known:
    print("note: KNOWN_KEYS not found in src/config.rs; configuration keys not checked")
else:
    used = []  # (where, dotted key)

    def env_key(where, name):
        if name.startswith("ALEPH_PROXY_") and name != "ALEPH_PROXY_CONFIG":
            used.append((where, name[len("ALEPH_PROXY_"):].lower().replace("__", ".")))

    for m in re.finditer(r"\b(ALEPH_PROXY_[A-Z0-9_]+)=", dockerfile):
        env_key("Dockerfile", m.group(1))
    if compose is not None:
        for name, svc in (compose.get("services") or {}).items():
            env = svc.get("environment") or {}
            names = env.keys() if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
            for n in names:
                env_key(f"{compose_path} ({name})", n)
    for path, d in docs:
        if d.get("kind") == "Deployment":
            spec = d["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec.get("containers", []):
                for e in c.get("env", []):
                    env_key(f"{path} ({c['name']})", e["name"])
        if d.get("kind") == "ConfigMap":
            for key, text in (d.get("data") or {}).items():
                if not key.endswith(".toml"):
                    continue

                def walk(prefix, table):
                    for k, v in table.items():
                        dotted = f"{prefix}{k}"
                        used.append((f"{path} ({key})", dotted))
                        if isinstance(v, dict):
                            walk(dotted + ".", v)

                walk("", tomllib.loads(text))
    for where, key in used:
        if key not in known:
            problems.append(f"{where}: `{key}` is not a configuration key the proxy accepts")

for p in problems:
    print(f"FAIL: {p}", file=sys.stderr)
if problems:
    sys.exit(1)
print("cross-checks passed")
PY

if [[ $status -ne 0 ]]; then
    echo "deploy validation FAILED" >&2
    exit 1
fi
echo "deploy validation passed"
