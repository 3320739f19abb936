#!/usr/bin/env bash
# Sets up and runs the whole test suite: formatting, lints, a short benchmark run (so the benchmark
# itself keeps working), then unit/property/crash/concurrency/CLI tests. .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-tests.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings
cargo build --release -q -p cairn-cli
./target/release/cairn bench --quick
./target/release/cairn bench --nbd --quick
./target/release/cairn bench --vm --quick
./target/release/cairn bench --backup --quick
./target/release/cairn bench --backup-large --quick
./target/release/cairn bench --lifecycle --quick
./target/release/cairn bench --api --quick
./target/release/cairn bench --guest-io --quick
./scripts/fuzz.sh
./scripts/fuzz-api.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
