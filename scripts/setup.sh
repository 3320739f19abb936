#!/usr/bin/env bash
# Installs what Cairn's main job needs on a Debian machine, idempotently (quick when everything is
# present): cargo, and qemu-img for importing and exporting disk images. What only the tests and
# benchmarks use comes from scripts/setup-tests.sh.
set -euo pipefail
# shellcheck source=scripts/apt.sh
. "$(dirname "$0")/apt.sh"

need_apt=()
# qemu-img / qemu-nbd: `volume import|export` and `backup restore --to-file` convert with them.
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
apt_install ${need_apt[@]+"${need_apt[@]}"}
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
exit 0
