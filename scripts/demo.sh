#!/usr/bin/env bash
# Sets up, builds, and runs Cairn's main job on the default store (or $CAIRN_STORE / --store DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -q -p cairn-cli
exec ./target/release/cairn demo "$@"
