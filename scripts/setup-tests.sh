#!/usr/bin/env bash
# Installs the real peers the tests and benchmarks run against, idempotently (quick when they are
# present): NBD clients, fio, the fuzzers, an S3 server, the backup tools the backup benchmark
# compares with, and the browser of the web UI test (the VM runtime and its test guest come with
# scripts/setup.sh).
set -euo pipefail
# shellcheck source=scripts/apt.sh
. "$(dirname "$0")/apt.sh"
cd "$(dirname "$0")/.."
./scripts/setup.sh

need_apt=()
# nbdinfo / nbdcopy: independent NBD clients the NBD server is tested against.
command -v nbdinfo >/dev/null 2>&1 || need_apt+=(libnbd-bin)
# nbdsh (libnbd's Python shell): sends the edge-case requests of the NBD conformance tests.
command -v nbdsh >/dev/null 2>&1 || need_apt+=(python3-libnbd)
# fio (with its nbd engine): the NBD benchmark's load generator.
command -v fio >/dev/null 2>&1 || need_apt+=(fio)
# mkfs.ext4 / dumpe2fs / e2fsck / debugfs: the VM tests make and inspect a guest file system.
[ -x /sbin/mkfs.ext4 ] || [ -x /usr/sbin/mkfs.ext4 ] || need_apt+=(e2fsprogs)
# restic and borg: the backup benchmark's peers.
command -v restic >/dev/null 2>&1 || need_apt+=(restic)
command -v borg >/dev/null 2>&1 || need_apt+=(borgbackup)
# Chromium and its WebDriver: the web UI's end-to-end test drives a real browser.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
apt_install ${need_apt[@]+"${need_apt[@]}"}
# schemathesis: fuzzes the HTTP API from its OpenAPI document (scripts/fuzz-api.sh).
if ! st --version 2>/dev/null | grep -q "4.32.5"; then
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "schemathesis==4.32.5"
    # pyenv puts new commands on PATH through its shims.
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
fi
export PATH="$HOME/.cargo/bin:$PATH"
# Fuzzing the decoders needs nightly and cargo-fuzz.
rustup run nightly rustc --version >/dev/null 2>&1 || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
# s3s-fs: the S3 server of the backup tests (0.14.1 is the newest that builds with this rustc).
command -v s3s-fs >/dev/null 2>&1 || cargo install s3s-fs --version 0.14.1 --features binary --locked
# Garage: the distributed S3 store of the backup cluster tests (3 nodes on 127.0.0.1). Built
# without the features the tests do not use (metrics, K2V, LMDB) and at opt-level 1: 440 s on two
# cores instead of half an hour; a test peer on loopback needs no more.
command -v garage >/dev/null 2>&1 || CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=0 \
    cargo install garage --version 2.5.0 --locked --no-default-features --features bundled-libs,sqlite
