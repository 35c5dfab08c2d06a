#!/usr/bin/env bash
# Builds and tests Loupe for 64-bit ARM Linux (aarch64-unknown-linux-gnu) on an x86-64 Debian
# machine, with Debian's own packages: its rustc (`rustc-web`, with the aarch64 standard library
# beside it), the GNU cross linker, and qemu's user-mode emulator to run the test binaries.
#
#   tools/aarch64.sh install        the Debian packages (needs root or sudo)
#   tools/aarch64.sh build          cargo build --release of `loupe` for aarch64
#   tools/aarch64.sh test           the kernel tests at three CPU levels, then the parity tests
#   tools/aarch64.sh cargo ARGS...  any cargo command with the aarch64 settings
#
# CPU levels (qemu's -cpu): cortex-a53 has NEON only, cortex-a76 adds the dot product (`sdot`),
# max adds the 8-bit matrix multiply (`smmla`). Every kernel test runs at each; the parity tests
# (every family: tokens, logits, greedy answers) at max. Emulation says nothing about ARM speed.
# The build goes to target/aarch64/ (its own folder: Debian's rustc is not rustup's, and the two
# would rebuild each other's host tools in one folder). Binaries link glibc statically: under qemu's
# user-mode emulation on these machines, a dynamically linked aarch64 program loops forever in
# glibc's pthread_create (walking its thread-stack cache: a plain C program with one thread does
# it too, with qemu 7.2 and 10.0), so `loupe run`, which starts a thread pool, never finished; the
# static binaries run.
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu

debian_rustc() {
  # rustup's rustc comes first on PATH; Debian's is the one with the aarch64 standard library.
  local rustc
  rustc=$(dpkg -L rustc-web 2>/dev/null | grep -m1 '/bin/rustc$' || true)
  if [ -z "$rustc" ] || [ ! -d /usr/lib/rustlib/$target ]; then
    echo "aarch64: Debian's rustc-web and libstd-rust-web-dev:arm64 are missing (tools/aarch64.sh install)" >&2
    exit 1
  fi
  echo "$rustc"
}

with_settings() {
  RUSTC="$(debian_rustc)" \
  CARGO_TARGET_DIR=target/aarch64 \
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
  CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu ${QEMU_CPU:-max} -L $sysroot" \
  "$@"
}

case "${1:-}" in
  install)
    run_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
    run_root dpkg --add-architecture arm64
    run_root apt-get update -qq
    run_root apt-get install -y -qq rustc-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu \
      libc6-dev-arm64-cross qemu-user
    ;;
  build)
    with_settings cargo build --release --target $target -p loupe-cli
    echo "aarch64: target/aarch64/$target/release/loupe"
    ;;
  test)
    # Every family's parity (checkpoints, GGUF, quantized types), the library's own tests, the
    # README's inspection by the aarch64 binary, and libloupe from a C program (tests/c_api.rs: compiled with the cross compiler, linked
    # statically, run under qemu). Left out under emulation, for time: constrained.rs and batch.rs
    # (the grammar and the batch scheduler, the same code on every architecture; their numbers come
    # from the products tested here), 130 s of the 480 s the whole suite takes under qemu; and
    # tokenizer_qwen2 (text to ids, no arithmetic of ours: 43 s), which keeps the CI run under its
    # 45 minutes.
    # Every cargo call names the same packages, so the dependencies are built once (another set
    # would unify other features and rebuild them).
    pkgs=(-p loupe-core -p loupe-capi -p loupe-cli)
    # demo_model: the README's inspection command run by the aarch64 `loupe` (under qemu, through
    # LOUPE_TEST_RUNNER) gives the labelled verdicts x86 gives, and greedy tokens equal
    # transformers' on every sample.
    parity=(--test parity --test llama --test gemma3 --test phi3 --test gguf --test gguf_vision
      --test quantization --test conversation --test configs --test patch_features
      --test c_api --test demo_model)
    # The test binaries once, then run under each CPU level.
    with_settings cargo test --target $target "${pkgs[@]}" --lib "${parity[@]}" --no-run
    # The kernels, and the layers' products of every block format (which path each takes depends
    # on the CPU: candle's quantized products stop a core without `sdot`), at each level; a
    # quantized model end to end on the NEON-only core.
    for cpu in cortex-a53 cortex-a76 max; do
      echo "aarch64: kernel tests at -cpu $cpu"
      QEMU_CPU=$cpu with_settings cargo test --target $target "${pkgs[@]}" --lib -- kernels:: models::layers::
    done
    echo "aarch64: quantized parity at -cpu cortex-a53"
    QEMU_CPU=cortex-a53 with_settings cargo test --target $target "${pkgs[@]}" --test gguf \
      --test quantization
    echo "aarch64: parity, C library and demo model tests at -cpu max"
    QEMU_CPU=max LOUPE_TEST_CC=aarch64-linux-gnu-gcc LOUPE_TEST_CFLAGS=-static \
      LOUPE_TEST_RUNNER="qemu-aarch64 -cpu max -L $sysroot" \
      with_settings cargo test --target $target "${pkgs[@]}" --lib "${parity[@]}" -- --skip kernels::
    ;;
  cargo)
    shift
    with_settings cargo "$@"
    ;;
  *)
    echo "usage: tools/aarch64.sh install|build|test|cargo ARGS..." >&2
    exit 2
    ;;
esac
