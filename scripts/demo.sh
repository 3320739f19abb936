#!/usr/bin/env bash
# Sets up, builds, and runs Cairn's main job: the test guest on Cairn volumes under the daemon,
# checkpointed, broken and rewound, on a store of its own that it removes afterwards (--keep
# keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release -q -p cairn-cli
exec ./target/release/cairn demo "$@"
