#!/usr/bin/env bash
# Fuzzes the decoders of untrusted bytes: the NBD request and option parsers (crates/cairn-nbd/fuzz)
# and the store's page decoders and journal replay (crates/cairn-engine/fuzz). CI runs a short
# pass; FUZZ_SECONDS=3600 ./scripts/fuzz.sh runs a long one. Crashes land in CRATE/fuzz/artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-20}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for pair in cairn-nbd:request cairn-nbd:options cairn-engine:pages cairn-engine:journal; do
    crate=${pair%%:*}
    target=${pair#*:}
    if ! (cd "crates/$crate" && cargo +nightly fuzz run "$target" -- -max_total_time="$secs") >"$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz: $crate target $target found a failure (input saved under crates/$crate/fuzz/artifacts/$target)" >&2
        exit 1
    fi
    echo "fuzz $target: $(grep -E '^Done' "$log")"
done
