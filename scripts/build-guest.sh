#!/usr/bin/env bash
# Builds the test guest from Debian packages: the small cloud kernel (the package
# linux-image-cloud-amd64 depends on) and a busybox-static initramfs whose init writes a counter
# to its console and its disks every second. Nothing is installed into the host: the packages are
# downloaded and unpacked. Output: $GUEST_DIR (default target/guest) with vmlinuz and initrd.img.
# Idempotent: quick when the guest is already built.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${GUEST_DIR:-target/guest}
if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ] && [ "$out/initrd.img" -nt scripts/build-guest.sh ]; then
    exit 0
fi
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ { print $2; exit }')
[ -n "$kpkg" ] || { echo "build-guest: cannot find the cloud kernel package (apt-get update?)" >&2; exit 1; }
echo "build-guest: $kpkg + busybox-static" >&2
(cd "$work" && apt-get -q -o APT::Sandbox::User=root download "$kpkg" busybox-static >/dev/null)
dpkg-deb -x "$work"/linux-image-*.deb "$work/kernel"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/busybox"
cp "$work"/kernel/boot/vmlinuz-* "$out/vmlinuz"

root="$work/root"
mkdir -p "$root/bin" "$root/lib/modules" "$root/dev" "$root/proc" "$root/sys"
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
# virtio is built as modules in the cloud kernel; load order matters.
mods="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk"
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
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    insmod /lib/modules/$m.ko
done
disks=$(ls /dev/vd? 2>/dev/null | tr '\n' ' ')
disks=${disks% }
echo "cairn-guest: up, disks: ${disks:-none}"
# With `cairn.heartbeat` on the kernel command line, a busy loop also writes a dot to the console
# as fast as the guest runs: the host times the gaps between dots to see pauses as the guest lives
# them (`cairn bench --vm`).
case " $(cat /proc/cmdline) " in
    *" cairn.heartbeat "*) (while :; do echo -n .; done) & ;;
esac
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
    sync
    sleep 1
done
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initrd.img.tmp"
mv "$out/initrd.img.tmp" "$out/initrd.img"
echo "build-guest: $out/vmlinuz, $out/initrd.img" >&2
