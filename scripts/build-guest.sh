#!/usr/bin/env bash
# Builds the test guest from Debian packages: the small cloud kernel (the package
# linux-image-cloud-amd64 depends on) and a busybox-static initramfs whose init writes a counter
# to its console and its disks every second, and runs Debian's qemu-guest-agent (with the
# libraries it links, unpacked from their packages) so Cairn can freeze the guest's filesystems. Nothing is installed into the host: the packages are
# downloaded and unpacked. Output: $GUEST_DIR (default target/guest) with vmlinuz and initrd.img.
# Idempotent: quick when the guest is already built.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${GUEST_DIR:-target/guest}
if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ] && [ "$out/initrd.img" -nt scripts/build-guest.sh ] \
    && [ "$out/initrd.img" -nt scripts/guest-load.c ]; then
    exit 0
fi
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ { print $2; exit }')
[ -n "$kpkg" ] || { echo "build-guest: cannot find the cloud kernel package (apt-get update?)" >&2; exit 1; }
# qemu-ga and exactly the shared libraries it needs (`ldd qemu-ga` on bookworm); taken from
# their packages, not from the host, so the guest does not depend on what the host has installed.
agent_pkgs="qemu-guest-agent libglib2.0-0 libudev1 libnuma1 liburing2 libpcre2-8-0 libc6"
agent_libs="libudev.so.1 libnuma.so.1 liburing.so.2 libglib-2.0.so.0 libgmodule-2.0.so.0 libm.so.6 libc.so.6 libpcre2-8.so.0"
echo "build-guest: $kpkg + busybox-static + $agent_pkgs" >&2
# shellcheck disable=SC2086
(cd "$work" && apt-get -q -o APT::Sandbox::User=root download "$kpkg" busybox-static $agent_pkgs >/dev/null)
dpkg-deb -x "$work"/linux-image-*.deb "$work/kernel"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/busybox"
mkdir -p "$work/agent"
for p in $agent_pkgs; do
    dpkg-deb -x "$work/${p}"_*.deb "$work/agent"
done
cp "$work"/kernel/boot/vmlinuz-* "$out/vmlinuz"

root="$work/root"
mkdir -p "$root/bin" "$root/sbin" "$root/lib/modules" "$root/lib64" "$root/lib/x86_64-linux-gnu" \
    "$root/dev" "$root/proc" "$root/sys" "$root/run" "$root/tmp" "$root/data"
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
cp "$work/agent/usr/sbin/qemu-ga" "$root/sbin/qemu-ga"
# The disk load generator of `cairn bench --guest-io`, static: fio's libraries would not fit.
cc -O2 -static -pthread -o "$root/bin/cairn-load" scripts/guest-load.c
for l in $agent_libs ld-linux-x86-64.so.2; do
    f=$(find "$work/agent" -name "$l" | head -1)
    [ -n "$f" ] || { echo "build-guest: $l not found in $agent_pkgs" >&2; exit 1; }
    cp -L "$f" "$root/lib/x86_64-linux-gnu/$l"
done
ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$root/lib64/ld-linux-x86-64.so.2"
# virtio is built as modules in the cloud kernel; load order matters. virtio_console carries
# the guest agent's port.
mods="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console"
for m in $mods; do
    f=$(find "$work/kernel/lib/modules" -name "$m.ko*" | head -1)
    [ -n "$f" ] || { echo "build-guest: module $m not found in $kpkg" >&2; exit 1; }
    case "$f" in
        *.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
        *) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
done
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
# Cairn's test guest. No /dev/console node is needed in the archive: devtmpfs provides it.
/bin/busybox mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console; do
    insmod /lib/modules/$m.ko
done
cmdline=" $(cat /proc/cmdline) "
# `cairn.datafs=/dev/vdX` mounts that disk (an ext4 file system made on the host) on /data; the
# counter then also goes to /data/counter, through the page cache and without a sync, as an
# application would write it. That disk gets no raw counter writes.
datafs=
for w in $cmdline; do
    case "$w" in cairn.datafs=*) datafs=${w#cairn.datafs=} ;; esac
done
if [ -n "$datafs" ]; then
    if mount -t ext4 "$datafs" /data; then
        echo "cairn-guest: mounted $datafs on /data"
    else
        echo "cairn-guest: cannot mount $datafs"
        datafs=
    fi
fi
# `cairn.load=JOB,JOB,...` runs those disk jobs (scripts/guest-load.c: RW:BS:QD) on the last
# disk, `cairn.loadsecs=S` seconds each after `cairn.loadramp=R`, and prints their results on the
# console; that disk gets no counter writes.
load= loadsecs=10 loadramp=2 loaddisk=
for w in $cmdline; do
    case "$w" in
        cairn.load=*) load=${w#cairn.load=} ;;
        cairn.loadsecs=*) loadsecs=${w#cairn.loadsecs=} ;;
        cairn.loadramp=*) loadramp=${w#cairn.loadramp=} ;;
    esac
done
[ -n "$load" ] && loaddisk=$(ls /dev/vd? 2>/dev/null | tail -1)
disks=$(ls /dev/vd? 2>/dev/null | grep -vx "${datafs:-none}" | grep -vx "${loaddisk:-none}" | tr '\n' ' ')
disks=${disks% }
echo "cairn-guest: up, disks: ${disks:-none}"
# The guest agent listens on the virtio-serial port QEMU names org.qemu.guest_agent.0, unless
# `cairn.noagent` is on the command line (a guest without one).
case "$cmdline" in
    *" cairn.noagent "*) echo "cairn-guest: no guest agent (cairn.noagent)" ;;
    *)
        for p in /sys/class/virtio-ports/*; do
            [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] || continue
            /sbin/qemu-ga -m virtio-serial -p "/dev/${p##*/}" -t /run -f /run/qemu-ga.pid &
            echo "cairn-guest: guest agent on /dev/${p##*/}"
        done
        ;;
esac
# With `cairn.heartbeat` on the kernel command line, a busy loop also writes a dot to the console
# as fast as the guest runs: the host times the gaps between dots to see pauses as the guest lives
# them (`cairn bench --vm`).
case "$cmdline" in
    *" cairn.heartbeat "*) (while :; do echo -n .; done) & ;;
esac
if [ -n "$load" ]; then
    # shellcheck disable=SC2046
    (/bin/cairn-load "${loaddisk:-none}" "$loadsecs" "$loadramp" $(echo "$load" | tr , ' '); echo "cairn-load: done") &
fi
# A shell on the serial console for `cairn vm console --attach` (restarted if it exits). An
# asynchronous list reads /dev/null unless told otherwise, hence the redirections.
(while :; do sh -i </dev/console >/dev/console 2>&1; done) &
# Every second: the counter on the console, in block 0 of every disk (the latest value) and in
# block N of the first disk (a log), then sync so the host sees it.
i=0
while :; do
    i=$((i + 1))
    line=$(printf 'cairn-counter %08d' "$i")
    echo "$line"
    for d in $disks; do
        echo "$line" | dd of="$d" bs=4096 seek=0 conv=notrunc,sync 2>/dev/null
    done
    first=${disks%% *}
    [ -n "$first" ] && echo "$line" | dd of="$first" bs=4096 seek="$i" conv=notrunc,sync 2>/dev/null
    # The raw disks are synced; /data is left to the page cache, like most application writes.
    for d in $disks; do
        sync "$d"
    done
    [ -n "$datafs" ] && echo "$line" > /data/counter
    sleep 1
done
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initrd.img.tmp"
mv "$out/initrd.img.tmp" "$out/initrd.img"
echo "build-guest: $out/vmlinuz, $out/initrd.img" >&2
