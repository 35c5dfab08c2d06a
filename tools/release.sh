#!/usr/bin/env bash
# Builds Loupe's release archives: `loupe` and libloupe (shared, static, header) for x86-64 and
# 64-bit ARM Linux, one versioned archive per architecture, and SHA256SUMS beside them.
#
#   tools/release.sh [OUT]          OUT defaults to dist/
#   ARCHS="x86_64" tools/release.sh only the build machine's architecture
#
# x86-64 is built with rustup's toolchain, aarch64 with tools/aarch64.sh (Debian's rustc and
# cross linker: `tools/aarch64.sh install` first). The aarch64 build links glibc statically (see
# tools/aarch64.sh: only such binaries run under qemu here), so it has no shared library: its
# archive has libloupe.a alone (a dynamically linked libloupe.so could not be tested here). The
# x86-64 binaries link glibc dynamically (glibc 2.36, Debian 12, or newer).
# Each archive, loupe-VERSION-ARCH-linux/, holds:
#   bin/loupe  lib/libloupe.a  lib/libloupe.so (x86-64)  include/loupe.h  README.md
#   LICENSE-NOTE.txt  docs/embedding.md  models/loupe-parts-demo/ (the demonstration model, its
#   spec and samples)
# and, before it is packed, `bin/loupe info` must run (under qemu for aarch64).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-dist}"
archs="${ARCHS:-x86_64 aarch64}"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
[ -n "$version" ] || { echo "release: no version in Cargo.toml" >&2; exit 1; }
mkdir -p "$out"

package() {
  local arch=$1 release=$2 runner=$3 strip=$4
  local name="loupe-$version-$arch-linux"
  local stage
  stage=$(mktemp -d)
  local root="$stage/$name"
  mkdir -p "$root/bin" "$root/lib" "$root/include" "$root/docs" "$root/models"
  cp "$release/loupe" "$root/bin/"
  cp "$release/libloupe.a" "$root/lib/"
  if [ "$arch" = x86_64 ]; then cp "$release/libloupe.so" "$root/lib/"; fi
  # The release profile keeps line tables for backtraces here; the archives keep the symbols (a
  # crash report still names functions) but not the debug info (160 MB of the binary's 165).
  "$strip" --strip-debug "$root/bin/loupe" "$root"/lib/libloupe.*
  cp crates/loupe-capi/include/loupe.h "$root/include/"
  cp README.md "$root/"
  cp docs/embedding.md "$root/docs/"
  cp -r models/loupe-parts-demo "$root/models/"
  printf 'Loupe %s, %s Linux. Licensed under Apache-2.0 (Cargo.toml).\n' "$version" "$arch" \
    > "$root/LICENSE-NOTE.txt"
  # The binary must at least start on its architecture.
  $runner "$root/bin/loupe" info --model "$root/models/loupe-parts-demo" > /dev/null
  tar -C "$stage" -czf "$out/$name.tar.gz" "$name"
  rm -rf "$stage"
  echo "release: $out/$name.tar.gz"
}

for arch in $archs; do
  case "$arch" in
    x86_64)
      cargo build --release -p loupe-cli -p loupe-capi
      package x86_64 target/release "" strip
      ;;
    aarch64)
      tools/aarch64.sh cargo build --release --target aarch64-unknown-linux-gnu -p loupe-cli -p loupe-capi
      package aarch64 target/aarch64/aarch64-unknown-linux-gnu/release \
        "qemu-aarch64 -cpu max -L /usr/aarch64-linux-gnu" aarch64-linux-gnu-strip
      ;;
    *)
      echo "release: unknown architecture $arch (x86_64, aarch64)" >&2
      exit 2
      ;;
  esac
done
(cd "$out" && sha256sum loupe-"$version"-*-linux.tar.gz > SHA256SUMS && cat SHA256SUMS)
