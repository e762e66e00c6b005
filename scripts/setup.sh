#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for kiln: the Node dependencies (which build dist/), and with
# --test the real components the test suite starts (registry, skopeo, umoci, fsck tools…).
set -euo pipefail
cd "$(dirname "$0")/.."

TEST_PACKAGES=(docker-registry skopeo umoci erofs-utils e2fsprogs cpio busybox-static apache2-utils
  openssl kmod attr libcap2-bin tar gzip zstd ca-certificates)

if [[ "${1:-}" == "--test" ]]; then
  missing=()
  for p in "${TEST_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    SUDO=""
    [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    echo "setup: installing ${missing[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# npm ci compiles better-sqlite3 from source (no prebuilt download here) and runs `prepare` (tsc).
if [[ ! -d node_modules ]] || [[ package-lock.json -nt node_modules/.package-lock.json ]]; then
  npm ci --no-audit --no-fund
else
  npm run build --silent
fi
