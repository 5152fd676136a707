#!/usr/bin/env bash
# Conversion benchmark: holdfast vs qemu-img on the shared 4 GiB VM-disk workload, in
# one run on one machine (hot page cache, best of RUNS).
#
#   bench/convert.sh [SIZE] [RUNS]        default 4G 3
#
# Cases: raw -> VHDX, VHDX -> raw, qcow2 -> raw. Each tool converts the same input
# file; the VHDX and qcow2 inputs are made once by qemu-img.
# Durability differs: holdfast fsyncs its output before renaming it into place;
# qemu-img convert does not fsync (strace shows no fsync/fdatasync), leaving gigabytes
# of dirty pages for the kernel to flush later. So both are timed at both durabilities:
# qemu-img against holdfast --no-fsync, and qemu-img followed by `sync` against
# holdfast's default (fsync before rename). Before each timed run the output
# is removed, everything is synced, the input is read once (hot cache) and the machine
# idles SETTLE seconds (default 4; this microVM's freed memory is slow to touch again
# for a moment, which otherwise favours whichever tool runs right after a delete).
# Prints a table of best wall times (variants interleaved round by round), ratios and
# the highest peak RSS seen, and writes it to
# bench/results/convert-SIZE-STAMP.md.
# Needs ../shared/bench/gen_disk.py (or GEN=path/to/gen_disk.py).
set -euo pipefail
SIZE=${1:-4G}
RUNS=${2:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
GEN=${GEN:-$ROOT/../shared/bench/gen_disk.py}
WORK=${PERF_DIR:-/tmp/perf}/convert
OUT=$HERE/results
mkdir -p "$WORK" "$OUT"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
REPORT=$OUT/convert-$SIZE-$STAMP.md

cargo build --release --locked -p holdfast --quiet --manifest-path "$ROOT/Cargo.toml"
HF=$ROOT/target/release/holdfast

SRC=$WORK/disk-$SIZE.raw
[ -f "$SRC" ] || python3 "$GEN" gen "$SRC" --size "$SIZE" --seed 42 >/dev/null
[ -f "$WORK/in.vhdx" ] || qemu-img convert -f raw -O vhdx "$SRC" "$WORK/in.vhdx"
[ -f "$WORK/in.qcow2" ] || qemu-img convert -f raw -O qcow2 "$SRC" "$WORK/in.qcow2"

# once INPUT OUTPUT CMD...: one timed run; sets t (seconds) and rss (KiB)
t=0 rss=0
once() {
  local input=$1 output=$2; shift 2
  rm -f "$output"; sync
  cat "$input" >/dev/null
  sleep "${SETTLE:-4}"
  local tf t0 t1; tf=$(mktemp)
  t0=$(date +%s.%N)
  /usr/bin/time -f '%M' -o "$tf" "$@" >/dev/null 2>&1
  t1=$(date +%s.%N)
  t=$(echo "$t1 - $t0" | bc)
  rss=$(tail -1 "$tf"); rm -f "$tf"
}
min() { if (($(echo "$1 < $2" | bc))); then echo "$1"; else echo "$2"; fi; }

{
  echo "# holdfast image convert vs qemu-img convert ($SIZE workload, best of $RUNS, $(date -u +%F))"
  echo
  echo "| case | qemu-img | holdfast --no-fsync | ratio | qemu-img + sync | holdfast (fsynced) | ratio | qemu-img RSS | holdfast RSS |"
  echo "|---|---|---|---|---|---|---|---|---|"
} >"$REPORT"

bench_case() {  # NAME INPUT QEMU_IN_FMT QEMU_OUT_FMT HF_FORMAT EXT
  local name=$1 input=$2 qin=$3 qout=$4 hfmt=$5 ext=$6
  local oq=$WORK/out-q.$ext oh=$WORK/out-h.$ext
  local qt=999 qst=999 hnt=999 ht=999 qr=0 hr=0
  # The four variants take turns in every round, so that none always runs right
  # after another tool's output was deleted (which changes page-cache speed here).
  for _ in $(seq "$RUNS"); do
    once "$input" "$oq" qemu-img convert -f "$qin" -O "$qout" "$input" "$oq"
    qt=$(min "$t" "$qt"); ((rss > qr)) && qr=$rss
    once "$input" "$oh" "$HF" image convert --quiet --overwrite --no-fsync "$input" "$oh" --format "$hfmt"
    hnt=$(min "$t" "$hnt")
    once "$input" "$oq" sh -c "qemu-img convert -f $qin -O $qout '$input' '$oq' && sync"
    qst=$(min "$t" "$qst")
    once "$input" "$oh" "$HF" image convert --quiet --overwrite "$input" "$oh" --format "$hfmt"
    ht=$(min "$t" "$ht"); ((rss > hr)) && hr=$rss
  done
  qemu-img compare -q -f raw -F "$qout" "$SRC" "$oh" || { echo "MISMATCH in $name" >&2; exit 1; }
  printf '| %s | %.2f s | %.2f s | %.2fx | %.2f s | %.2f s | %.2fx | %d MiB | %d MiB |\n' "$name" \
    "$qt" "$hnt" "$(echo "$hnt / $qt" | bc -l)" "$qst" "$ht" "$(echo "$ht / $qst" | bc -l)" \
    $((qr / 1024)) $((hr / 1024)) | tee -a "$REPORT"
  rm -f "$oq" "$oh"
}

bench_case "raw -> vhdx" "$SRC" raw vhdx vhdx vhdx
bench_case "vhdx -> raw" "$WORK/in.vhdx" vhdx raw raw raw
bench_case "qcow2 -> raw" "$WORK/in.qcow2" qcow2 raw raw raw
echo
echo "report: $REPORT"
