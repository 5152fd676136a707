#!/usr/bin/env bash
# Item-level recovery benchmark, same machine, same run:
#  A SIZE (default 4 GiB) GPT disk with p1 ext4 and p2 NTFS (each half the disk), each
#  holding a 1 GiB pseudo-random file and a small tree, backed up with
#  `holdfast backup` into a fresh datastore. Then, RUNS rounds:
#  1. `holdfast ilr ls VM -d DS --partition P /`: a new process each time (cold start
#     of the command); once with the page cache dropped, then warm.
#  2. `holdfast ilr get ... /big.bin` (1 GiB) against `holdfast restore` of the whole
#     disk (raw, no fsync for both... ilr get fsyncs each file; restore runs with fsync
#     too, to compare like with like), best of RUNS each.
#
#   bench/ilr.sh [SIZE] [RUNS]      default 4G 3
#
# Results go to bench/results/ilr-STAMP/summary.md. HOLDFAST_BIN: binary (default
# target/release/holdfast; cargo build --release -p holdfast).
set -euo pipefail

SIZE=${1:-4G}
RUNS=${2:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HF=${HOLDFAST_BIN:-$ROOT/target/release/holdfast}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$HERE/results/ilr-$STAMP
W=$(mktemp -d /tmp/hf-ilr-bench.XXXXXX)
mkdir -p "$OUT"
[ -x "$HF" ] || { echo "ilr.sh: no binary at $HF (see the header)" >&2; exit 1; }
cleanup() { mountpoint -q "$W/mnt" 2>/dev/null && umount "$W/mnt"; rm -rf "$W"; }
trap cleanup EXIT
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.3f}')"; }

BYTES=$(python3 -c "import re;s='$SIZE';m={'K':1<<10,'M':1<<20,'G':1<<30};print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))")
SECTORS=$((BYTES / 512))
HALF=$(((SECTORS - 2048 - 34) / 2 / 2048 * 2048))
echo "== building the $SIZE disk (ext4 + NTFS, a 1 GiB file in each)"
mkdir -p "$W/src/docs/sub"
python3 - "$W/src/big.bin" <<'PY'
import random, sys
r = random.Random(7)
with open(sys.argv[1], "wb") as f:
    for _ in range(1024):
        f.write(r.randbytes(1 << 20))
PY
for i in $(seq 1 200); do echo "note $i" > "$W/src/docs/note-$i.txt"; done
echo "deep" > "$W/src/docs/sub/deep.txt"
truncate -s "$SIZE" "$W/disk.raw"
printf 'label: gpt\nstart=2048, size=%d, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\nstart=%d, size=%d, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n' \
  "$HALF" $((2048 + HALF)) "$HALF" | sfdisk -q "$W/disk.raw"
mke2fs -q -F -t ext4 -d "$W/src" "$W/ext.img" $((HALF / 2))k
dd if="$W/ext.img" of="$W/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
rm "$W/ext.img"
truncate -s $((HALF * 512)) "$W/ntfs.img"
mkntfs -q -F -Q -s 512 -p $((2048 + HALF)) -H 255 -S 63 "$W/ntfs.img"
mkdir -p "$W/mnt"
ntfs-3g "$W/ntfs.img" "$W/mnt"
cp -r "$W/src/." "$W/mnt/"
umount "$W/mnt"
dd if="$W/ntfs.img" of="$W/disk.raw" bs=512 seek=$((2048 + HALF)) conv=notrunc,sparse status=none
rm "$W/ntfs.img"
"$HF" datastore create "$W/ds" >/dev/null
"$HF" backup -q -d "$W/ds" --source hv/vm "$W/disk.raw" >/dev/null
DATA=$(du -B1 "$W/disk.raw" | cut -f1)
echo "disk: $BYTES bytes virtual, $DATA allocated" | tee "$OUT/disk.txt"

ls_time() {  # $1 partition, $2 cold|warm
  [ "$2" = cold ] && { sync; echo 3 > /proc/sys/vm/drop_caches; }
  local t0 t1; t0=$(now)
  "$HF" ilr ls hv/vm -d "$W/ds" --partition "$1" / >/dev/null
  t1=$(now); secs "$t0" "$t1"
}
declare -A BEST
best() { local k=$1 v=$2; if [ -z "${BEST[$k]:-}" ] || python3 -c "import sys; sys.exit(0 if $v < ${BEST[$k]} else 1)"; then BEST[$k]=$v; fi; }
for r in $(seq 1 "$RUNS"); do
  for p in 1 2; do
    c=$(ls_time $p cold); w=$(ls_time $p warm)
    echo "round $r partition $p: ls cold $c s, warm $w s"
    best "ls-cold-$p" "$c"; best "ls-warm-$p" "$w"
    rm -rf "$W/get"; mkdir "$W/get"
    t0=$(now); "$HF" ilr get hv/vm -d "$W/ds" --partition $p /big.bin --to-folder "$W/get" >/dev/null; t1=$(now)
    g=$(secs "$t0" "$t1"); best "get-$p" "$g"
    cmp -s "$W/get/big.bin" "$W/src/big.bin" || { echo "ilr.sh: extracted file differs" >&2; exit 1; }
    echo "round $r partition $p: get 1 GiB $g s"
  done
  rm -f "$W/restored.raw"
  t0=$(now); "$HF" restore -q -d "$W/ds" --source hv/vm -o "$W/restored.raw" -f raw; t1=$(now)
  rs=$(secs "$t0" "$t1"); best restore "$rs"
  echo "round $r: whole-disk restore $rs s"
done
cmp -s "$W/restored.raw" "$W/disk.raw" || { echo "ilr.sh: restored disk differs" >&2; exit 1; }

python3 - "$OUT/summary.md" "$BYTES" "$DATA" "${BEST[ls-cold-1]}" "${BEST[ls-warm-1]}" "${BEST[ls-cold-2]}" "${BEST[ls-warm-2]}" "${BEST[get-1]}" "${BEST[get-2]}" "${BEST[restore]}" <<'PY'
import sys
out, virt, data, lc1, lw1, lc2, lw2, g1, g2, rs = sys.argv[1:]
virt, data = int(virt), int(data)
lc1, lw1, lc2, lw2, g1, g2, rs = map(float, (lc1, lw1, lc2, lw2, g1, g2, rs))
gib = 1 << 30
mib = 1 << 20
rv, rd = virt / rs / mib, data / rs / mib
lines = [
    f"# ILR benchmark (best of runs)",
    f"disk: {virt/gib:.1f} GiB virtual, {data/gib:.2f} GiB allocated",
    "",
    "| | ext4 (p1) | NTFS (p2) | bar |",
    "|---|---:|---:|---|",
    f"| `ilr ls /`, page cache dropped | {lc1*1000:.0f} ms | {lc2*1000:.0f} ms | < 200 ms |",
    f"| `ilr ls /`, warm | {lw1*1000:.0f} ms | {lw2*1000:.0f} ms | |",
    f"| `ilr get` 1 GiB file | {g1:.2f} s, {gib/g1/mib:.0f} MiB/s | {g2:.2f} s, {gib/g2/mib:.0f} MiB/s | |",
    f"| ratio to whole-disk restore (allocated bytes: {rd:.0f} MiB/s) | {gib/g1/mib/rd:.2f}x | {gib/g2/mib/rd:.2f}x | >= 0.5x |",
    f"| ratio to whole-disk restore (virtual bytes: {rv:.0f} MiB/s) | {gib/g1/mib/rv:.2f}x | {gib/g2/mib/rv:.2f}x | |",
    "",
    f"whole-disk restore: {rs:.2f} s",
]
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
