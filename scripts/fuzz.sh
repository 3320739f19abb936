#!/usr/bin/env bash
# Fuzzes the NBD request and option parsers (crates/cairn-nbd/fuzz). CI runs a short pass;
# FUZZ_SECONDS=3600 ./scripts/fuzz.sh runs a long one. Crashes land in crates/cairn-nbd/fuzz/artifacts.
set -euo pipefail
cd "$(dirname "$0")/../crates/cairn-nbd"
secs=${FUZZ_SECONDS:-20}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in request options; do
    if ! cargo +nightly fuzz run "$target" -- -max_total_time="$secs" >"$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz: target $target found a failure (input saved under fuzz/artifacts/$target)" >&2
        exit 1
    fi
    echo "fuzz $target: $(grep -E '^Done' "$log")"
done
