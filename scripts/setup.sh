#!/usr/bin/env bash
# Installs what Cairn's main job needs on a Debian machine, idempotently (quick when everything is
# present): cargo, qemu-img for importing and exporting disk images, QEMU to run VMs, and the small
# test guest the demo boots. What only the tests and benchmarks use comes from
# scripts/setup-tests.sh.
set -euo pipefail
# shellcheck source=scripts/apt.sh
. "$(dirname "$0")/apt.sh"

need_apt=()
# qemu-img / qemu-nbd: `volume import|export` and `backup restore --to-file` convert with them.
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
# cpio packs the test guest's initramfs (scripts/build-guest.sh).
command -v cpio >/dev/null 2>&1 || need_apt+=(cpio)
# A C compiler and static libc: cargo links with cc, and the test guest's load generator is
# built static.
{ command -v cc >/dev/null 2>&1 && [ -e /usr/lib/x86_64-linux-gnu/libc.a ]; } || need_apt+=(gcc libc6-dev)
apt_install ${need_apt[@]+"${need_apt[@]}"}
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
cd "$(dirname "$0")/.."
# The VM runtime: QEMU 10 from bookworm-backports, and the test guest built from Debian packages.
./scripts/setup-qemu.sh
./scripts/build-guest.sh
exit 0
