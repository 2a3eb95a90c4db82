#!/usr/bin/env bash
# Runs the fuzz target of the SNI parser (hbone/fuzz, cargo-fuzz + libFuzzer) for a bounded time,
# seeded with the real ClientHellos in hbone/tests/corpus. Exits non-zero on any crash, panic or
# failed assertion; the input that caused it is left in hbone/fuzz/artifacts/client_hello/.
#
#   FUZZ_SECONDS   how long to fuzz (default 60)
#
# Installs cargo-fuzz first if it is missing (idempotent). cargo-fuzz needs nightly-only rustc
# flags (-Zsanitizer=address); the machine has only the stable toolchain, so RUSTC_BOOTSTRAP=1 is
# set for the fuzz command alone, never for the project's own builds.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
seconds="${FUZZ_SECONDS:-60}"
target=client_hello
cargo_fuzz_version=0.13.2

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz $cargo_fuzz_version"
  cargo install cargo-fuzz --locked --version "$cargo_fuzz_version"
fi

# libFuzzer adds what it finds to its corpus folder (kept out of git), so it works on a copy of
# the committed seeds (the .bin files only: capture.py beside them is not a ClientHello).
work_corpus="$root/hbone/fuzz/corpus/$target"
mkdir -p "$work_corpus"
cp "$root"/hbone/tests/corpus/*.bin "$work_corpus"/

cd "$root/hbone"
echo "fuzzing $target for ${seconds}s"
# --debug-assertions: arithmetic overflow panics too. The build goes to the main target/ folder
# (its own subfolder: the flags differ), so `cargo clean` removes it with the rest.
RUSTC_BOOTSTRAP=1 cargo fuzz run \
  --fuzz-dir fuzz \
  --target-dir "$root/target/fuzz" \
  --debug-assertions \
  "$target" "$work_corpus" \
  -- -max_total_time="$seconds" -print_final_stats=1
