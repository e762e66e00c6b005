#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for kiln: the Node dependencies (which build dist/), and with
# --test the real components the test suite starts (registry, skopeo, umoci, fsck tools…).
set -euo pipefail
cd "$(dirname "$0")/.."

TEST_PACKAGES=(docker-registry skopeo umoci erofs-utils e2fsprogs cpio busybox-static apache2-utils
  openssl kmod attr libcap2-bin tar gzip zstd ca-certificates qemu-system-x86
  util-linux-extra python3 debootstrap time curl) # fincore: the data stream test; python3: tar writers test; the last three: `npm run bench`

# The boot tests' guest kernel: Debian's cloud kernel (the version linux-image-cloud-ARCH depends on),
# unpacked into test/.cache/kernel (boot/vmlinuz-*, lib/modules/*; no depmod: kiln reads .modinfo).
fetch_test_kernel() {
  local dest=test/.cache/kernel arch meta pkg tmp sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  if compgen -G "$dest/boot/vmlinuz-*" >/dev/null; then return; fi
  arch=$(dpkg --print-architecture)
  meta="linux-image-cloud-$arch"
  pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  if [[ -z "$pkg" ]]; then
    $sudo apt-get update -qq
    pkg=$(apt-cache depends "$meta" | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  fi
  [[ -n "$pkg" ]] || { echo "setup: cannot find the kernel package $meta depends on" >&2; exit 1; }
  echo "setup: fetching $pkg into $dest" >&2
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq "$pkg")
  rm -rf "$dest.tmp"
  mkdir -p "$dest.tmp"
  dpkg-deb -x "$tmp"/*.deb "$dest.tmp"
  rm -rf "$tmp" "$dest"
  mv "$dest.tmp" "$dest"
}

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
  fetch_test_kernel
fi

# npm ci compiles better-sqlite3 from source (no prebuilt download here) and runs `prepare` (tsc).
if [[ ! -d node_modules ]] || [[ package-lock.json -nt node_modules/.package-lock.json ]]; then
  npm ci --no-audit --no-fund
else
  npm run build --silent
fi
