#!/usr/bin/env bash
# Sets up and runs the whole test suite: formatting, lints, unit/property/crash/CLI tests, and a short
# benchmark run so the benchmark itself keeps working. .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings
cargo test --workspace
cargo build --release -q -p cairn-cli
./target/release/cairn bench --quick
