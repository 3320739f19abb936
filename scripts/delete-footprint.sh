#!/usr/bin/env bash
# Time and peak memory of deleting a large checkpoint and a large volume, per size.
#
#   scripts/delete-footprint.sh [GIB ...]          (default: 1 4 8)
#
# For each size: a volume gets GIB GiB written, a checkpoint, and GIB GiB written again, so the
# checkpoint and the head each hold GIB GiB nothing else references. Then `checkpoint delete` and
# `volume delete` run under /usr/bin/time. CAIRN picks the binary (default target/release/cairn,
# so two builds can be compared); SCRATCH the directory for the store (default: a temp dir).
set -euo pipefail

cairn=${CAIRN:-target/release/cairn}
[ -x "$cairn" ] || { echo "no cairn binary at $cairn: run cargo build --release first" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (apt install time)" >&2; exit 1; }
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1 4 8)
scratch=${SCRATCH:-$(mktemp -d)}
export CAIRN_STORE="$scratch/delete-footprint-store"
trap 'rm -rf "$CAIRN_STORE"' EXIT

measure() { # label, command...: prints "seconds max-rss-MiB"
    /usr/bin/time -f "%e %M" -o "$scratch/time.out" "$@" >/dev/null
    awk '{ printf "%s s | %.0f MiB", $1, $2 / 1024 }' "$scratch/time.out"
}

echo "binary: $cairn"
echo "| written | checkpoint delete | volume delete |"
echo "|---|---|---|"
for g in "${sizes[@]}"; do
    rm -rf "$CAIRN_STORE"
    "$cairn" init >/dev/null
    "$cairn" volume create big --size "$((g * 2 + 1))G" >/dev/null
    "$cairn" volume write big --offset 0 --pattern 0xAB --length "${g}G" >/dev/null
    "$cairn" checkpoint create big@old >/dev/null
    "$cairn" volume write big --offset 0 --pattern 0xCD --length "${g}G" >/dev/null
    cp=$(measure "$cairn" checkpoint delete big@old)
    vol=$(measure "$cairn" volume delete big)
    "$cairn" fsck >/dev/null
    echo "| $g GiB | $cp | $vol |"
done
