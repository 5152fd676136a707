#!/usr/bin/env bash
# Whole-disk recovery benchmark, same machine, same run: `holdfast recover --copy-to`
# through `holdfast server` + `holdfast agent` over loopback mutual TLS (the agent
# fetches the point's blobs in batches, checks each against its id, writes a raw image
# under a temporary name, fsyncs, renames) against local-mode `holdfast restore` of the
# same recovery point from the server's datastore folder (raw, fsynced). RUNS rounds,
# interleaved; best of each; both outputs compared with the source once. Then instant
# recovery: `nbdcopy` reads the whole `export-nbd` export, served from the datastore
# folder (-d) and through the server's API.
#
#   bench/recover.sh [SIZE] [RUNS]     default 4G 3
#
# The image is the shared workload generator's day-0 image (../shared/bench/gen_disk.py,
# seed 42), reused from $PERF_DIR/img when present. Results go to
# bench/results/recover-STAMP/ (summary.md). HOLDFAST_BIN: binary (default
# target/release/holdfast, not built here).
set -euo pipefail

SIZE=${1:-4G}
RUNS=${2:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
NAME=recover
. "$HERE/lib.sh"
mkdir -p "$W/vms/vm1"
ln "$IMG" "$W/vms/vm1/disk0.raw" 2>/dev/null || cp --sparse=always "$IMG" "$W/vms/vm1/disk0.raw"

start_server "$W/srv" $'[scheduler]\ntick_seconds = 1\npoll_seconds = 5\n[limits]\nlow_space_percent = 0'
start_agent hv01 "$W/vms" "$W/agent"
wait_sources 1
say "backing up $IMG ($BYTES bytes)"
"$HF" backup-now hv01/vm1 --wait >/dev/null

echo "round,mode,seconds" >"$OUT/recover.csv"
for r in $(seq 1 "$RUNS"); do
  rm -f "$W/restored.raw"; sync
  t0=$(now); "$HF" restore -q -d "$W/srv/datastore" --source hv01/vm1 -o "$W/restored.raw" -f raw; t1=$(now)
  echo "$r,local restore,$(echo "$t1 - $t0" | bc)" >>"$OUT/recover.csv"
  say "round $r local restore: $(echo "$t1 - $t0" | bc) s"
  [ "$r" = 1 ] && { cmp -s "$W/restored.raw" "$IMG" || { echo "recover.sh: restored disk differs" >&2; exit 1; }; }
  rm -f "$W/restored.raw"

  rm -rf "$W/rec"; sync
  t0=$(now); "$HF" recover hv01/vm1 --copy-to "hv01:$W/rec" --wait --json >"$OUT/recover-$r.json"; t1=$(now)
  echo "$r,server+agent recover,$(echo "$t1 - $t0" | bc)" >>"$OUT/recover.csv"
  say "round $r server+agent recover: $(echo "$t1 - $t0" | bc) s"
  if [ "$r" = 1 ]; then cmp -s "$W"/rec/holdfast_*/disk0.raw "$IMG" || { echo "recover.sh: recovered disk differs" >&2; exit 1; }; fi
  rm -rf "$W/rec"
done

# Instant recovery: the whole export read by nbdcopy (to null:), served from the
# datastore folder (-d) and through the server's API.
export_read() { # MODE ARGS...
  local mode=$1; shift
  rm -f "$W/nbd.sock"
  "$HF" export-nbd hv01/vm1 "$@" --listen "unix:$W/nbd.sock" >"$W/uri" 2>"$W/export.err" &
  local epid=$!
  for _ in $(seq 1 200); do [ -s "$W/uri" ] && break; sleep 0.05; done
  t0=$(now); nbdcopy "$(head -1 "$W/uri")" null:; t1=$(now)
  kill "$epid"; wait "$epid" 2>/dev/null || true
  echo "$r,$mode,$(echo "$t1 - $t0" | bc)" >>"$OUT/recover.csv"
  say "round $r $mode: $(echo "$t1 - $t0" | bc) s"
}
for r in $(seq 1 "$RUNS"); do
  export_read "export-nbd -d" -d "$W/srv/datastore"
  export_read "export-nbd via server"
done

python3 - "$OUT/recover.csv" "$OUT/summary.md" "$BYTES" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
size = int(sys.argv[3]); mib = 1 << 20
best = {}
for r in rows:
    s = float(r["seconds"]); best[r["mode"]] = min(best.get(r["mode"], s), s)
loc, rem = best["local restore"], best["server+agent recover"]
out = [
    f"# Whole-disk recovery, {size / (1 << 30):.0f} GiB day-0 image, best of {len({r['round'] for r in rows})}",
    "",
    "| | seconds | MiB/s (virtual size) |",
    "|---|---:|---:|",
    f"| local `holdfast restore` (server's datastore folder) | {loc:.2f} | {size / mib / loc:.0f} |",
    f"| `holdfast recover --copy-to` through server + agent | {rem:.2f} | {size / mib / rem:.0f} |",
    f"| ratio | {loc / rem:.2f}x | |",
]
el, er = best.get("export-nbd -d"), best.get("export-nbd via server")
if el and er:
    out += [
        "",
        "| instant recovery: `nbdcopy URI null:` of the whole export | seconds | MiB/s |",
        "|---|---:|---:|",
        f"| `export-nbd -d` (datastore folder) | {el:.2f} | {size / mib / el:.0f} |",
        f"| `export-nbd` through the server's API | {er:.2f} | {size / mib / er:.0f} |",
        f"| ratio | {el / er:.2f}x | |",
    ]
open(sys.argv[2], "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
