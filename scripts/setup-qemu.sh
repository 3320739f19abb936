#!/usr/bin/env bash
# Installs qemu-system-x86 from Debian's bookworm-backports suite, the suite the machine's
# qemu-utils 10.x comes from (stock 7.2 "Breaks" qemu-utils 10 and apt would remove it).
# Idempotent: does nothing when qemu-system-x86_64 is already there.
set -euo pipefail
command -v qemu-system-x86_64 >/dev/null 2>&1 && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
list=/etc/apt/sources.list.d/cairn-backports.sources
if [ ! -f "$list" ]; then
    src=/etc/apt/sources.list.d/debian.sources
    # Reuse the machine's own mirror and keyring: the first stanza's URIs and Signed-By.
    uris=$(awk '/^URIs:/ { print $2; exit }' "$src" 2>/dev/null || true)
    key=$(awk '/^Signed-By:/ { print $2; exit }' "$src" 2>/dev/null || true)
    uris=${uris:-http://deb.debian.org/debian}
    key=${key:-/usr/share/keyrings/debian-archive-keyring.gpg}
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
        "$uris" "$key" | $SUDO tee "$list" >/dev/null
fi
echo "setup: installing qemu-system-x86 from bookworm-backports" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports qemu-system-x86
