#!/usr/bin/env bash
# Live-QEMU benchmark on a real booted guest (the Debian 12 rig of scripts/guest-rig:
# a real kernel, systemd and qemu-guest-agent), same machine, same run:
#  1. the guest (root disk + a 1 GiB ext4 data disk, both qcow2) is protected through
#     `holdfast server` + `holdfast agent --qmp-dir`: the full backup (initial
#     replica), then 64 MiB written in the guest (dd from /dev/urandom, fsynced), then
#     the incremental. Reported: wall times and bytes read.
#  2. how long the guest is held for each point-in-time view, RUNS times each way:
#     frozen through the guest agent (freeze + Holdfast's view + thaw), then with the
#     guest agent stopped, paused (stop + Holdfast's view + cont). Holdfast's own share
#     is the time between the hold taking effect and its release: the QMP transaction
#     that adds the bitmaps and starts the fleecing jobs.
#
#   bench/guest.sh [RUNS]     default 5
#
# Results go to bench/results/guest-STAMP/ (summary.md). HOLDFAST_BIN: binary (default
# target/release/holdfast; cargo build --release -p holdfast).
set -euo pipefail

RUNS=${1:-5}
NAME=guest
SIZE=none NO_IMAGE=1 # this benchmark makes its own disks
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"
QGA() { python3 "$HERE/qga_exec.py" "$W/sockets/vm1.qga" "$@"; }

t0=$(now)
RIG=$("$ROOT/scripts/guest-rig" | tail -1)
ACCEL=$("$ROOT/scripts/guest-rig" --accel | tail -1)
RIG_S=$(echo "$(now) - $t0" | bc)
say "rig $RIG ($ACCEL) ready in $RIG_S s (built in $(cat "$RIG/build-seconds") s when it was built)"

mkdir -p "$W/sockets"
qemu-img create -q -f qcow2 -F qcow2 -b "$RIG/disk.qcow2" "$W/root.qcow2"
truncate -s 1G "$W/data.raw"
# (sgdisk 1.0.9 with -q writes nothing.)
sgdisk -o -n 1:2048:0 -t 1:8300 "$W/data.raw" >/dev/null
mke2fs -q -F -t ext4 -E offset=1048576 "$W/data.raw" $(((1024 - 2) * 1024))k
qemu-img convert -f raw -O qcow2 "$W/data.raw" "$W/data.qcow2"
rm -f "$W/data.raw"

cpu=max
[ "$ACCEL" = kvm ] && cpu=host
t0=$(now)
qemu-system-x86_64 -nodefaults -no-user-config -display none -machine "q35,accel=$ACCEL" \
  -cpu $cpu -smp 2 -m 512 -no-reboot -name vm1 -uuid 5e0c1a7e-0000-4000-8000-00000000c001 \
  -kernel "$RIG/vmlinuz" -initrd "$RIG/initrd.img" \
  -append "root=/dev/vda1 rw console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off 8250.nr_uarts=1 systemd.show_status=0 tsc=reliable no_timer_check" \
  -drive "file=$W/root.qcow2,format=qcow2,if=none,id=drive0,node-name=disk0" -device virtio-blk-pci,drive=drive0,id=vda \
  -drive "file=$W/data.qcow2,format=qcow2,if=none,id=drive1,node-name=disk1" -device virtio-blk-pci,drive=drive1,id=vdb \
  -qmp "unix:$W/sockets/vm1.qmp,server=on,wait=off" -qmp "unix:$W/test.qmp,server=on,wait=off" \
  -device virtio-serial-pci -chardev "socket,id=qga0,path=$W/sockets/vm1.qga,server=on,wait=off" \
  -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 \
  -serial "file:$W/console.log" >"$W/qemu.log" 2>&1 &
PIDS+=($!)
QGA ping 600
BOOT_S=$(echo "$(now) - $t0" | bc)
say "booted to a guest agent in $BOOT_S s"
for i in $(seq 1 60); do
  QGA "mountpoint -q /data2" && break
  [ "$i" = 60 ] && { say "the data disk is not mounted: $(QGA 'dmesg | tail -5; cat /proc/mounts' 2>&1)"; exit 1; }
  sleep 1
done

start_server "$W/srv" $'[scheduler]\ntick_seconds = 1\npoll_seconds = 5'
tok=$("$HF" agent-token create --host kvm01 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
"$HF" agent --enroll "$tok" --data-dir "$W/agent" --qmp-dir "$W/sockets" --inventory-seconds 1 \
  --freeze-timeout-seconds 30 ${AGENT_ARGS:-} 2>"$W/agent.stderr" &
PIDS+=($!)
wait_sources 1
"$HF" pg create live --member kvm01/vm1 --retention-days 7 --sync-frequency 1440 \
  --recovery-point-times 03:33 --replica manual >/dev/null

backup() { # TAG -> wall seconds; the job (with its log) in $OUT/TAG.json
  local t0 t1 id
  t0=$(now)
  id=$("$HF" backup-now kvm01/vm1 --wait --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  t1=$(now)
  "$HF" jobs show "$id" --json >"$OUT/$1.json"
  echo "$t1 - $t0" | bc
}

FULL_S=$(backup full)
say "full backup: $FULL_S s"
QGA "dd if=/dev/urandom of=/data2/big bs=1M count=64 conv=fsync status=none && sync"
INC_S=$(backup incremental)
say "incremental after 64 MiB written: $INC_S s"
for r in $(seq 1 "$RUNS"); do
  QGA "dd if=/dev/urandom of=/data2/small$r bs=64K count=4 conv=fsync status=none"
  s=$(backup "frozen-$r")
  say "frozen run $r: $s s"
done
QGA "systemctl stop --no-block qemu-guest-agent" 2>/dev/null || true # the agent goes mid-answer
sleep 3
for r in $(seq 1 "$RUNS"); do
  s=$(backup "paused-$r")
  say "paused run $r: $s s"
done

python3 - "$OUT" "$RUNS" "$FULL_S" "$INC_S" "$BOOT_S" "$RIG_S" "$ACCEL" "$(cat "$RIG/build-seconds")" >"$OUT/summary.md" <<'PY'
import json, re, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
full_s, inc_s, boot_s, rig_s = map(float, sys.argv[3:7])
accel, build_s = sys.argv[7], sys.argv[8]
job = lambda t: json.load(open(f"{out}/{t}.json"))
full, inc = job("full"), job("incremental")
print(f"## Real guest (Debian 12 rig, {accel}), root 2 GiB + data 1 GiB qcow2\n")
print(f"rig build: {build_s} s (once, cached); boot to a guest agent: {boot_s:.1f} s\n")
print("| | wall | bytes read |\n|---|---:|---:|")
print(f"| full backup (initial replica) | {full_s:.2f} s | {full['bytes_read']:,} |")
print(f"| incremental after 64 MiB written in the guest | {inc_s:.2f} s | {inc['bytes_read']:,} |")
print(f"\nincremental / full: wall **{inc_s / full_s:.3f}x**, bytes read **{inc['bytes_read'] / full['bytes_read']:.3f}x**\n")
pat = re.compile(r"for (\d+) ms \((\w+) (\d+) ms, Holdfast's view (\d+) ms, (\w+) (\d+) ms\)")
print("| hold | runs | held (median, max) | guest/QEMU part: hold (median) | Holdfast's view (median, max) | release (median) |")
print("|---|---:|---:|---:|---:|---:|")
for kind in ("frozen", "paused"):
    rows = []
    for r in range(1, runs + 1):
        for line in job(f"{kind}-{r}")["log"]:
            m = pat.search(line["message"])
            if m:
                rows.append([int(m.group(i)) for i in (1, 3, 4, 6)])
    if not rows:
        print(f"| {kind} | 0 | no hold line in the job logs | | | |")
        continue
    col = lambda i: [x[i] for x in rows]
    med = lambda i: statistics.median(col(i))
    print(f"| {kind} | {len(rows)} | {med(0):.0f} ms, {max(col(0))} ms | {med(1):.0f} ms | "
          f"{med(2):.0f} ms, {max(col(2))} ms | {med(3):.0f} ms |")
print("\nBar: Holdfast's own share of the hold under 50 ms.")
PY
cp "$W/agent.stderr" "$OUT/agent.log"
cat "$OUT/summary.md"
