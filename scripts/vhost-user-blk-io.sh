#!/bin/bash
# Hand experiment behind docs/decisions/0015: the test guest's disk I/O over QEMU's NBD client
# against vhost-user-blk, both served by one qemu-storage-daemon from the same raw file, and the
# raw file opened by QEMU itself. Prints one `cairn-load` JSON line per job and way.
#
#   scripts/vhost-user-blk-io.sh [SCRATCH_DIR]     (after ./scripts/setup-tests.sh; about 6 minutes)
#   JOBS=randread:4k:1,write:1m:1 SECS=10 RAMP=2 ROUNDS="1 2" scripts/vhost-user-blk-io.sh
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
D=$(mkdir -p "${1:-$ROOT/target/vhost-exp}" && cd "${1:-$ROOT/target/vhost-exp}" && pwd)
K=$ROOT/target/guest/vmlinuz
I=$ROOT/target/guest/initrd.img
JOBS=${JOBS:-randread:4k:1,randwrite:4k:1,randread:4k:16,read:1m:1,write:1m:1}
SECS=${SECS:-10}
RAMP=${RAMP:-2}
cd "$D"
[ -f disk.raw ] || head -c 1G /dev/urandom >disk.raw

rm -f nbd.sock vub.sock
qemu-storage-daemon --blockdev "driver=file,node-name=file0,filename=$D/disk.raw,aio=threads" \
    --blockdev driver=raw,node-name=disk0,file=file0 \
    --nbd-server "addr.type=unix,addr.path=$D/nbd.sock" \
    --export type=nbd,id=e0,node-name=disk0,name=disk0,writable=on \
    --export "type=vhost-user-blk,id=e1,node-name=disk0,addr.type=unix,addr.path=$D/vub.sock,writable=on,num-queues=1" \
    >qsd.log 2>&1 &
QSD=$!
trap 'kill $QSD 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -S vub.sock ] && [ -S nbd.sock ] && break; sleep 0.1; done

# Boots the guest with the disk arguments after $1 (a label) and prints its job results. Guest
# RAM is shared memfd in every case: vhost-user needs it, and the others get the same.
boot() {
    local label=$1
    shift
    rm -f console.log
    timeout 900 qemu-system-x86_64 -accel tcg -machine q35,memory-backend=mem -cpu max -m 512M \
        -object memory-backend-memfd,id=mem,size=512M,share=on -smp 1 -nodefaults -no-user-config \
        -display none -global apic.vapic=off -serial "file:$D/console.log" -kernel "$K" -initrd "$I" \
        -append "console=ttyS0 rdinit=/init quiet cairn.noagent cairn.load=$JOBS cairn.loadsecs=$SECS cairn.loadramp=$RAMP" \
        "$@" >"qemu-$label.log" 2>&1 &
    local q=$!
    while kill -0 $q 2>/dev/null && ! grep -q "cairn-load: done" console.log 2>/dev/null; do sleep 0.5; done
    kill $q 2>/dev/null || true
    wait $q 2>/dev/null || true
    grep "cairn-load: {" console.log | sed "s/^/$label /"
}

NBD_NODE="{\"driver\":\"raw\",\"node-name\":\"d0\",\"file\":{\"driver\":\"nbd\",\"server\":{\"type\":\"unix\",\"path\":\"$D/nbd.sock\"},\"export\":\"disk0\"}}"
RAW_NODE="{\"driver\":\"raw\",\"node-name\":\"d0\",\"file\":{\"driver\":\"file\",\"filename\":\"$D/disk.raw\"}}"
for _ in ${ROUNDS:-1}; do
    boot nbd-client -blockdev "$NBD_NODE" -device virtio-blk-pci,drive=d0
    boot vhost-user-blk -chardev "socket,id=vub,path=$D/vub.sock" -device vhost-user-blk-pci,chardev=vub,num-queues=1
done
kill $QSD
wait $QSD 2>/dev/null || true
boot raw-in-qemu -blockdev "$RAW_NODE" -device virtio-blk-pci,drive=d0
