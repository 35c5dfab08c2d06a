#!/usr/bin/env bash
# Runs one fuzz target (fuzz/fuzz_targets/TARGET.rs) for SECONDS with libFuzzer through cargo fuzz,
# with a 2 GiB RSS limit and a 10 s per-input timeout, starting from the committed seeds
# (fuzz/seeds/TARGET) and the working corpus (fuzz/corpus/TARGET, not committed).
# Crashes, hangs and OOMs land in fuzz/artifacts/TARGET/; each becomes a regression test before it
# is fixed. Appends a line to fuzz/runs.tsv: date, target, seconds it ran, inputs executed, result.
# FUZZ_SEED=N fixes libFuzzer's random seed (CI does, so a smoke run is repeatable).
#
#   tools/fuzz.sh TARGET SECONDS        e.g. tools/fuzz.sh gguf 600
#   tools/fuzz.sh all SECONDS           every target in turn
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz); without nightly it says so
# and exits 0, so CI can call it where nightly is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: tools/fuzz.sh TARGET|all SECONDS}"
seconds="${2:?usage: tools/fuzz.sh TARGET|all SECONDS}"

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "fuzz: no nightly toolchain here; skipped (not failed)"
  exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz is not installed (cargo install cargo-fuzz); skipped (not failed)"
  exit 0
fi

if [ "$target" = all ]; then
  failed=0
  for t in $(cd fuzz/fuzz_targets && ls *.rs | grep -v '^common' | sed 's/\.rs$//'); do
    "$0" "$t" "$seconds" || failed=1
  done
  exit "$failed"
fi
[ -f "fuzz/fuzz_targets/$target.rs" ] || { echo "fuzz: no target $target (see fuzz/fuzz_targets/)"; exit 2; }

mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
log="$(mktemp)"
# Built first, so the time recorded is the fuzzing alone.
cargo +nightly fuzz build -s none --release "$target" > "$log" 2>&1 || { cat "$log"; rm -f "$log"; exit 1; }
started=$SECONDS
set +e
# -s none: no sanitizer (the code under test is safe Rust but for libjpeg, whose input the header
# checks bound); ASan would triple the cost per input on 2 cores.
cargo +nightly fuzz run -s none --release "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
  -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=1048576 \
  -print_final_stats=1 ${FUZZ_SEED:+-seed=$FUZZ_SEED} > "$log" 2>&1
status=$?
ran=$((SECONDS - started))
set -e
grep -E "^(==[0-9]+==|SUMMARY|Test unit written|thread .* panicked)" "$log" || true
execs=$(grep -oE "stat::number_of_executed_units: *[0-9]+" "$log" | grep -oE "[0-9]+$" | tail -1)
result=ok
[ "$status" -eq 0 ] || result="FAILED (exit $status; see fuzz/artifacts/$target)"
# The time it ran (a crash stops it early).
printf '%s\t%s\t%s\t%s\t%s\n' "$(date -u +%F)" "$target" "$ran" "${execs:-?}" "$result" >> fuzz/runs.tsv
rm -f "$log"
echo "fuzz $target: ${ran}s, ${execs:-?} inputs, $result"
[ "$result" = ok ]
