#!/usr/bin/env python3
"""Hand experiment behind docs/decisions/0015: does a background snapshot (what a standard Cairn
checkpoint takes of a running guest's memory) hold the memory as it was at the pause while the
guest reads its disk? The guest runs 16 O_DIRECT 4 KiB random readers; at the pause its RAM is
saved with `pmemsave`, then the snapshot runs while the guest goes on; a paused helper QEMU loads
the snapshot and saves its RAM again; the two are compared page by page.

    scripts/vhost-user-blk-snapshot.py MODE RESUME [SCRATCH_DIR]
    MODE: nbd-private (how Cairn runs VMs), nbd-shared (the same, RAM in shared memfd),
          vhost-user (the disk on vhost-user-blk, RAM in shared memfd)
    RESUME: at-once (`cont` right after `migrate` returns), or started (`cont` once QEMU counts
          a saved page, as Cairn's start_snapshot does)

Both disks are served by one qemu-storage-daemon from a raw file of 1 GiB (made if missing)."""
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODE, RESUME = sys.argv[1], sys.argv[2]
D = os.path.abspath(sys.argv[3] if len(sys.argv) > 3 else os.path.join(ROOT, "target/vhost-exp"))
KERNEL, INITRD = f"{ROOT}/target/guest/vmlinuz", f"{ROOT}/target/guest/initrd.img"
MEM = 512 << 20
PAGE = 4096
assert MODE in ("nbd-private", "nbd-shared", "vhost-user") and RESUME in ("at-once", "started"), __doc__
os.makedirs(D, exist_ok=True)
os.chdir(D)
if not os.path.exists("disk.raw"):
    with open("disk.raw", "wb") as f:
        for _ in range(1024):
            f.write(os.urandom(1 << 20))
for f in ("vub.sock", "nbd.sock", "qmp.sock", "qmp2.sock", "snap.bin", "pause.mem", "loaded.mem", "console.log"):
    if os.path.exists(f):
        os.unlink(f)


def qemu(qmp, extra):
    if MODE == "nbd-private":
        mem = ["-machine", "q35", "-m", "512M"]
    else:
        mem = ["-machine", "q35,memory-backend=mem", "-m", "512M",
               "-object", "memory-backend-memfd,id=mem,size=512M,share=on"]
    if MODE == "vhost-user":
        disk = ["-chardev", f"socket,id=vub,path={D}/vub.sock",
                "-device", "vhost-user-blk-pci,chardev=vub,num-queues=1"]
    else:
        node = {"driver": "raw", "node-name": "d0", "file": {
            "driver": "nbd", "server": {"type": "unix", "path": f"{D}/nbd.sock"}, "export": "disk0"}}
        disk = ["-blockdev", json.dumps(node), "-device", "virtio-blk-pci,drive=d0"]
    load = "cairn.load=randread:4k:16 cairn.loadsecs=30 cairn.loadramp=1"
    return subprocess.Popen([
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", *mem, "-smp", "1", "-nodefaults",
        "-no-user-config", "-display", "none", "-global", "apic.vapic=off",
        "-qmp", f"unix:{D}/{qmp},server=on,wait=off", "-kernel", KERNEL, "-initrd", INITRD,
        "-append", f"console=ttyS0 rdinit=/init quiet cairn.noagent {load}", *disk, *extra])


class Qmp:
    def __init__(self, path):
        while not os.path.exists(path):
            time.sleep(0.1)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.f = self.sock.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "event" not in reply:
                if "error" in reply:
                    sys.exit(f"{name}: {reply['error']}")
                return reply.get("return")

    def migration(self):
        for _ in range(600):
            r = self.cmd("query-migrate")
            if r.get("status") in ("completed", "failed", "cancelled"):
                return r
            time.sleep(0.1)
        sys.exit("the migration did not finish within 60 s")


qsd = subprocess.Popen([
    "qemu-storage-daemon", "--blockdev", f"driver=file,node-name=file0,filename={D}/disk.raw",
    "--blockdev", "driver=raw,node-name=disk0,file=file0",
    "--nbd-server", f"addr.type=unix,addr.path={D}/nbd.sock",
    "--export", "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on",
    "--export", f"type=vhost-user-blk,id=e1,node-name=disk0,addr.type=unix,addr.path={D}/vub.sock,writable=on,num-queues=1"])
children = [qsd]  # killed at the end, whatever happens
try:
    while not os.path.exists("vub.sock"):
        time.sleep(0.1)
    vm = qemu("qmp.sock", ["-serial", f"file:{D}/console.log"])
    children.append(vm)
    m = Qmp(f"{D}/qmp.sock")
    booting = time.time()
    while "cairn-counter 00000002" not in open("console.log", errors="replace").read():
        if time.time() - booting > 180:
            sys.exit("the guest did not boot within 180 s")
        time.sleep(0.1)
    time.sleep(5)  # booted; the readers run
    m.cmd("migrate-set-capabilities", capabilities=[{"capability": "background-snapshot", "state": True}])
    m.cmd("stop")
    m.cmd("pmemsave", val=0, size=MEM, filename=f"{D}/pause.mem")
    m.cmd("migrate", uri=f"file:{D}/snap.bin")
    while RESUME == "started":
        r = m.cmd("query-migrate")
        ram = r.get("ram", {})
        if r["status"] != "setup" and ram.get("normal", 0) + ram.get("duplicate", 0) + ram.get("zero-pages", 0) > 0:
            break
        time.sleep(0.002)
    m.cmd("cont")
    r = m.migration()
    print(f"snapshot: {r['status']}, downtime {r.get('downtime')} ms, setup {r.get('setup-time')} ms")
    vm.kill()
    vm.wait()
    helper = qemu("qmp2.sock", ["-S", "-serial", "null", "-incoming", "defer"])
    children.append(helper)
    h = Qmp(f"{D}/qmp2.sock")
    h.cmd("migrate-incoming", uri=f"file:{D}/snap.bin")
    r = h.migration()
    h.cmd("pmemsave", val=0, size=MEM, filename=f"{D}/loaded.mem")
    helper.kill()
    helper.wait()
finally:
    for child in children:
        child.kill()
        child.wait()
with open("pause.mem", "rb") as a, open("loaded.mem", "rb") as b:
    x, y = a.read(), b.read()
differ = [i for i in range(0, MEM, PAGE) if x[i:i + PAGE] != y[i:i + PAGE]]
print(f"{MODE}, resumed {RESUME}: {len(differ)} of {MEM // PAGE} pages differ between the memory at the pause and the snapshot")
for f in ("pause.mem", "loaded.mem", "snap.bin"):
    os.unlink(f)
