#!/usr/bin/env bash
# Build the allocd image with buildah and smoke-test it with podman, without a Docker engine or a registry:
# the base is a Debian bookworm rootfs made with debootstrap and imported locally (the public python image
# cannot be pulled here), passed to the Dockerfile as BASE.
#
#   scripts/build-image.sh            build the base (once), the image, then the smoke tests
#   SKIP_SMOKE=1 scripts/build-image.sh
#   IMAGE=registry.example.com/allocd:0.1.0 SOURCE_URL=https://... scripts/build-image.sh
#
# Smoke tests: `allocd --version` runs; the image runs as UID 10001; `allocd emulator` in a container stops
# with exit status 0 on `podman stop` (SIGTERM to PID 1), well before the stop timeout.
# Needs root (apt-get, debootstrap); slow (about a minute the first time); not part of `make test`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$ROOT/.tools}"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -n1)"
IMAGE="${IMAGE:-localhost/allocd:$VERSION}"
BASE_IMAGE="${BASE_IMAGE:-localhost/allocd-base:bookworm}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# The host's CA bundle, mounted over the base's during RUN steps only (never stored in the image), so pip
# can reach PyPI through a TLS-inspecting proxy. BUILD_CA_BUNDLE= (empty) turns it off.
BUILD_CA_BUNDLE="${BUILD_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}"
STOP_TIMEOUT=20

say() { printf 'build-image: %s\n' "$*" >&2; }

install_deps() {
  local missing=() cmd
  for cmd in buildah podman runc debootstrap; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  ((${#missing[@]})) || return 0
  say "installing ${missing[*]} (apt)"
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends)
  if ! "${apt[@]}" "${missing[@]}"; then
    apt-get update
    "${apt[@]}" "${missing[@]}"
  fi
}

# podman here needs runc and explicit ulimits (the defaults ask for more than the sandbox allows).
containers_conf() {
  mkdir -p "$TOOLS_DIR"
  cat >"$TOOLS_DIR/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
EOF
  export CONTAINERS_CONF="$TOOLS_DIR/containers.conf"
}

build_base() {
  if podman image exists "$BASE_IMAGE"; then
    say "base $BASE_IMAGE already built"
    return
  fi
  local rootfs
  rootfs="$(mktemp -d /var/tmp/allocd-rootfs.XXXXXX)"
  say "debootstrapping bookworm into $rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm "$rootfs" "$DEBIAN_MIRROR" \
    >"$TOOLS_DIR/debootstrap.log" 2>&1 || { tail -n 20 "$TOOLS_DIR/debootstrap.log"; exit 1; }
  # A base image carries no package lists or caches.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -c . | podman import --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  say "base $BASE_IMAGE imported"
}

build_image() {
  say "building $IMAGE from $BASE_IMAGE"
  local mounts=()
  if [[ -n "$BUILD_CA_BUNDLE" && -f "$BUILD_CA_BUNDLE" ]]; then
    mounts=(--volume "$BUILD_CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
  fi
  buildah build --layers "${mounts[@]}" \
    --build-arg "BASE=$BASE_IMAGE" \
    --build-arg "VERSION=$VERSION" \
    --build-arg "REVISION=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)" \
    --build-arg "SOURCE_URL=${SOURCE_URL:-}" \
    --tag "$IMAGE" "$ROOT"
}

smoke() {
  local out uid name="allocd-smoke-$$" code started elapsed
  out="$(podman run --rm "$IMAGE" --version)"
  [[ "$out" == "allocd $VERSION" ]] || { say "--version printed: $out"; exit 1; }
  say "podman run $IMAGE --version: $out"
  uid="$(podman run --rm --entrypoint id "$IMAGE" -u)"
  [[ "$uid" == 10001 ]] || { say "runs as uid $uid, expected 10001"; exit 1; }
  say "runs as uid $uid"

  podman run -d --name "$name" "$IMAGE" emulator --key smoke-test-key --port 8080 >/dev/null
  trap 'podman rm -f "$name" >/dev/null 2>&1 || true' RETURN
  for _ in $(seq 1 100); do  # up to 10 s for the emulator to listen
    podman logs "$name" 2>&1 | grep -q "emulator on" && break
    sleep 0.1
  done
  podman logs "$name" 2>&1 | grep -q "emulator on" || { podman logs "$name"; say "emulator did not start"; exit 1; }
  started=$SECONDS
  podman stop --time "$STOP_TIMEOUT" "$name" >/dev/null
  elapsed=$((SECONDS - started))
  code="$(podman inspect "$name" --format '{{.State.ExitCode}}')"
  say "podman stop: exit code $code after ${elapsed} s (timeout $STOP_TIMEOUT s)"
  [[ "$code" == 0 && "$elapsed" -lt "$STOP_TIMEOUT" ]] || { say "SIGTERM did not stop PID 1 cleanly"; exit 1; }
}

install_deps
containers_conf
build_base
build_image
[[ -n "${SKIP_SMOKE:-}" ]] || smoke
say "done: $IMAGE"
