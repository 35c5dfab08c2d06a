#!/usr/bin/env bash
# Writes crates/loupe-capi/include/loupe.h, the C library's header, from src/lib.rs with cbindgen
# (settings: crates/loupe-capi/cbindgen.toml). The test `header` fails while the header is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
LOUPE_WRITE_HEADER=1 cargo test -q -p loupe-capi --test header
echo "wrote crates/loupe-capi/include/loupe.h"
