#!/usr/bin/env bash
# Installs what Cairn needs on a Debian machine, idempotently: quick when everything is present.
set -euo pipefail

need_apt=()
# qemu-img / qemu-io / qemu-nbd: the peers the benchmarks and tests compare against.
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
# nbdinfo / nbdcopy: independent NBD clients the NBD server is tested against.
command -v nbdinfo >/dev/null 2>&1 || need_apt+=(libnbd-bin)
# nbdsh (libnbd's Python shell): sends the edge-case requests of the NBD conformance tests.
command -v nbdsh >/dev/null 2>&1 || need_apt+=(python3-libnbd)
# fio (with its nbd engine): the NBD benchmark's load generator.
command -v fio >/dev/null 2>&1 || need_apt+=(fio)
# mkfs.ext4 / dumpe2fs / e2fsck / debugfs: the VM tests make and inspect a guest file system.
[ -x /sbin/mkfs.ext4 ] || [ -x /usr/sbin/mkfs.ext4 ] || need_apt+=(e2fsprogs)
# cpio packs the test guest's initramfs.
command -v cpio >/dev/null 2>&1 || need_apt+=(cpio)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
# Fuzzing the NBD parsers needs nightly and cargo-fuzz.
rustup run nightly rustc --version >/dev/null 2>&1 || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
# The VM runtime: QEMU 10 from bookworm-backports, and the test guest built from Debian packages.
"$(dirname "$0")/setup-qemu.sh"
"$(dirname "$0")/build-guest.sh"
