#!/usr/bin/env bash
# Live-QEMU benchmark, same machine, same run:
#  1. A 4 GiB qcow2 disk (the shared workload generator's day-0 image) attached to a
#     running QEMU (TCG, -machine none) is protected through `holdfast server` +
#     `holdfast agent --qmp-dir`: the full backup (initial replica), then 1 % of the
#     disk rewritten in scattered 64 KiB guest writes (gen_disk.py mutate, replayed
#     into QEMU with HMP `qemu-io write -s`; then `sync`, as the kernel's writeback
#     would have done long before a real backup), then the incremental. Reported: wall
#     times, bytes read through NBD, the dirty bytes (64 KiB blocks the bitmap marks)
#     and the bytes written.
#  2. NBD read throughput of the same disk exported by QEMU: our client
#     (`nbd` crate, examples/nbdread) against `nbdcopy ... null:`, RUNS rounds
#     interleaved, best of each. Both read only the allocated extents.
#
#  3. the real booted guest: bench/guest.sh RUNS (full and incremental after 64 MiB
#     written in the guest, and how long the guest is held per backup: the guest's own
#     freeze or pause and Holdfast's share). GUEST=0 leaves it out.
#
#   bench/qemu.sh [SIZE] [RUNS]     default 4G 3
#
# Results go to bench/results/qemu-STAMP/ (summary.md). HOLDFAST_BIN: binary (default
# target/release/holdfast); NBDREAD_BIN: default target/release/examples/nbdread
# (cargo build --release -p holdfast && cargo build --release -p nbd --example nbdread).
set -euo pipefail

SIZE=${1:-4G}
RUNS=${2:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
ANCHORS=$(cd "${ANCHORS:-$ROOT/../shared/bench}" && pwd)
HF=${HOLDFAST_BIN:-$ROOT/target/release/holdfast}
NBDREAD=${NBDREAD_BIN:-$ROOT/target/release/examples/nbdread}
PERF_DIR=${PERF_DIR:-/tmp/perf}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$HERE/results/qemu-$STAMP
W=$(mktemp -d /tmp/hf-qemu-bench.XXXXXX)
IMG=$PERF_DIR/img/day0-$SIZE-s42.img
mkdir -p "$OUT" "$PERF_DIR/img" "$W/sockets"
for b in "$HF" "$NBDREAD"; do
  [ -x "$b" ] || { echo "qemu.sh: no binary at $b (see the header)" >&2; exit 1; }
done
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/qemu.log" >&2; }
now() { date +%s.%N; }
QMP() { python3 "$HERE/qmp_cmd.py" "$W/test.qmp" "$@"; }

[ -f "$IMG" ] || { say "generating $IMG"; python3 "$ANCHORS/gen_disk.py" gen --size "$SIZE" --seed 42 "$IMG"; }
say "qcow2 of $IMG"
qemu-img convert -f raw -O qcow2 "$IMG" "$W/vm1.qcow2"

qemu-system-x86_64 -nodefaults -display none -machine none,accel=tcg -name vm1 \
  -uuid 5e0c1a7e-0000-4000-8000-00000000b001 \
  -qmp "unix:$W/sockets/vm1.qmp,server=on,wait=off" -qmp "unix:$W/test.qmp,server=on,wait=off" \
  -drive "if=none,id=drive0,node-name=disk0,driver=qcow2,file.driver=file,file.filename=$W/vm1.qcow2" \
  >"$W/qemu.log" 2>&1 &
PIDS+=($!)
QMP query-status >/dev/null

mkdir -p "$W/srv"
printf '[scheduler]\ntick_seconds = 1\npoll_seconds = 5\n' >"$W/srv/holdfast.toml"
"$HF" server --data-dir "$W/srv" --listen 127.0.0.1:0 >"$W/srv/stdout" 2>"$W/srv/stderr" &
PIDS+=($!)
for _ in $(seq 1 200); do
  URL=$(sed -n 's/^holdfast server listening on //p' "$W/srv/stdout" 2>/dev/null | head -1)
  [ -n "$URL" ] && break
  sleep 0.05
done
export HOLDFAST_SERVER=$URL HOLDFAST_TOKEN_FILE=$W/srv/admin.token HOLDFAST_CA_FILE=$W/srv/ca.pem
tok=$("$HF" agent-token create --host kvm01 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
"$HF" agent --enroll "$tok" --data-dir "$W/agent" --qmp-dir "$W/sockets" --inventory-seconds 1 ${AGENT_ARGS:-} 2>"$W/agent.stderr" &
PIDS+=($!)
for _ in $(seq 1 300); do
  n=$("$HF" datasources list --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
  [ "$n" -ge 1 ] && break
  sleep 0.2
done
"$HF" pg create live --member kvm01/vm1 --retention-days 7 --sync-frequency 1440 \
  --recovery-point-times 03:33 --replica manual >/dev/null

backup() { # TAG
  local t0 t1
  t0=$(now)
  "$HF" backup-now kvm01/vm1 --wait --json >"$OUT/$1.json"
  t1=$(now)
  echo "$t1 - $t0" | bc
}
FULL_S=$(backup full)
say "full backup: $FULL_S s"

say "mutating 1 % in 64 KiB writes"
python3 "$ANCHORS/gen_disk.py" copy "$IMG" "$W/mutated.raw"
python3 "$ANCHORS/gen_disk.py" mutate "$W/mutated.raw" --seed 7 --day 1 --fraction 0.01 \
  --write-size 64K --ranges-out "$W/ranges.txt" >"$OUT/mutate.json"
python3 "$HERE/qmp_cmd.py" "$W/test.qmp" --replay "$W/mutated.raw" "$W/ranges.txt" drive0 >"$OUT/dirty.json"
rm -f "$W/mutated.raw"
# The kernel writes dirty page cache back within 30 s (dirty_expire_centisecs); a day's
# writes are long on disk by backup time. Without this, QEMU's `stop` would first
# flush the 40 MB just written (about 250 ms, all of it with the guest paused).
sync
INC_S=$(backup incremental)
say "incremental backup: $INC_S s"

# NBD export of the live disk for the throughput comparison (the agent is idle now).
QMP nbd-server-start "{\"addr\":{\"type\":\"unix\",\"data\":{\"path\":\"$W/bench.nbd\"}}}" >/dev/null
QMP block-export-add '{"type":"nbd","id":"bench","node-name":"disk0","name":"bench","writable":false}' >/dev/null
URI="nbd+unix:///bench?socket=$W/bench.nbd"
echo "round,tool,seconds,bytes" >"$OUT/nbd.csv"
for r in $(seq 1 "$RUNS"); do
  t0=$(now); nbdcopy "$URI" null: ; t1=$(now)
  echo "$r,nbdcopy,$(echo "$t1 - $t0" | bc),0" >>"$OUT/nbd.csv"
  t0=$(now); b=$("$NBDREAD" "$URI"); t1=$(now)
  echo "$r,holdfast-nbd,$(echo "$t1 - $t0" | bc),$b" >>"$OUT/nbd.csv"
  say "round $r: nbdcopy $(tail -2 "$OUT/nbd.csv" | head -1 | cut -d, -f3) s, ours $(echo "$t1 - $t0" | bc) s"
done
ALLOC=$(nbdinfo --map "$URI" | awk '$3 == 0 {s += $2} END {printf "%.0f", s}')

python3 - "$OUT" "$FULL_S" "$INC_S" "$ALLOC" >"$OUT/summary.md" <<'EOF'
import csv, json, sys
out, full_s, inc_s, alloc = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
full = json.load(open(f"{out}/full.json")); inc = json.load(open(f"{out}/incremental.json"))
d = json.load(open(f"{out}/dirty.json"))
print("## Live QEMU, 4 GiB qcow2 (day-0 image), 1 % rewritten in scattered 64 KiB writes\n")
print("| | wall | bytes read through NBD |\n|---|---:|---:|")
print(f"| full backup (initial replica) | {full_s:.2f} s | {full['bytes_read']:,} |")
print(f"| incremental | {inc_s:.2f} s | {inc['bytes_read']:,} |")
print(f"\nincremental / full wall time: **{inc_s / full_s:.3f}x** (bar: at most 0.1x)\n")
m = json.load(open(f"{out}/mutate.json"))
print(f"guest writes: {m['writes']} of 64 KiB ({d['writes']} ranges once merged), {d['bytes_written']:,} bytes; dirty 64 KiB blocks: {d['dirty_bytes']:,} bytes")
print(f"\nbytes read / dirty bytes: **{inc['bytes_read'] / d['dirty_bytes']:.3f}x** (bar: at most 1.1x); "
      f"bytes read / bytes written: {inc['bytes_read'] / d['bytes_written']:.3f}x\n")
rows = list(csv.DictReader(open(f"{out}/nbd.csv")))
best = {}
for r in rows:
    s = float(r["seconds"])
    if r["tool"] not in best or s < best[r["tool"]]:
        best[r["tool"]] = s
print(f"## NBD read of the same export ({alloc:,} allocated bytes), best of {len(rows) // 2}\n")
print("| reader | wall | throughput |\n|---|---:|---:|")
for k in ("nbdcopy", "holdfast-nbd"):
    print(f"| {k} | {best[k]:.2f} s | {alloc / best[k] / 2**20:.0f} MiB/s |")
print(f"\nours / nbdcopy throughput: **{best['nbdcopy'] / best['holdfast-nbd']:.2f}x** (bar: at least 0.8x)")
EOF
cp "$W/agent.stderr" "$OUT/agent.log"
cat "$OUT/summary.md"
if [ "${GUEST:-1}" != 0 ]; then
  say "the real guest: bench/guest.sh $RUNS"
  HOLDFAST_BIN=$HF "$HERE/guest.sh" "$RUNS"
fi
