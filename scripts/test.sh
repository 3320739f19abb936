#!/usr/bin/env bash
# Sets up and runs the whole test suite: formatting, lints, a short benchmark run (so the benchmark
# itself keeps working), then unit/property/crash/concurrency/CLI tests. .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings
cargo build --release -q -p cairn-cli
./target/release/cairn bench --quick
cargo test --workspace
