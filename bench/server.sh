#!/usr/bin/env bash
# Server benchmark, same machine, same run:
#  1. Backup throughput of one image through `holdfast server` + `holdfast agent` over
#     loopback mutual TLS (a `backup-now --wait` initial replica: the agent reads,
#     hashes, asks, compresses and sends; the server re-verifies every blob and packs
#     it) against local-mode `holdfast backup` of the same image into a fresh datastore.
#     RUNS rounds, interleaved; best of each. Each round runs two layouts:
#       shared: everything on both cores (server and agent compete for them);
#       split:  a two-machine model: local mode on core 0; the agent on core 0 and the
#               server on core 1 (taskset), as when the host and the backup server
#               are separate machines with the same cores each.
#  2. 200 protected VMs (1 MiB disks) in one server: initial replicas of all, then the
#     scheduler's pass over every schedule (from /status) and the latency of the
#     catalog-backed list calls (datasources, protection groups, recovery points, jobs,
#     alerts), each timed 20 times with curl.
#
#   bench/server.sh [SIZE] [RUNS]     default 4G 3
#
# The image is the shared workload generator's day-0 image (../shared/bench/gen_disk.py,
# seed 42), reused from $PERF_DIR/img when present. Results go to
# bench/results/server-STAMP/ (summary.md). HOLDFAST_BIN: binary (default
# target/release/holdfast, not built here). SCALE=0 skips part 2.
set -euo pipefail

SIZE=${1:-4G}
RUNS=${2:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
NAME=server
. "$HERE/lib.sh"

# ---------- 1. throughput ----------
mkdir -p "$W/vms/vm1"
ln "$IMG" "$W/vms/vm1/disk0.raw" 2>/dev/null || cp --sparse=always "$IMG" "$W/vms/vm1/disk0.raw"
echo "round,layout,mode,seconds,bytes_read,bytes_stored" >"$OUT/throughput.csv"
round() { # ROUND LAYOUT LOCAL_PIN AGENT_PIN SERVER_PIN
  local r=$1 layout=$2 tag=$1-$2
  cat "$IMG" >/dev/null
  rm -rf "$W/local" && "$HF" datastore create "$W/local" >/dev/null
  t0=$(now)
  $3 "$HF" backup -d "$W/local" --source vm1 --json "$W/vms/vm1/disk0.raw" >"$OUT/local-$tag.json"
  t1=$(now)
  read -r rd st < <(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); s=s.get("stats", s); print(s["bytes_read"], s["bytes_stored"])' "$OUT/local-$tag.json")
  echo "$r,$layout,local,$(echo "$t1 - $t0" | bc),$rd,$st" >>"$OUT/throughput.csv"
  say "round $r $layout local: $(echo "$t1 - $t0" | bc) s"

  rm -rf "$W/srv" "$W/agent"
  SERVER_PIN=$5 start_server "$W/srv" $'[scheduler]\ntick_seconds = 1\npoll_seconds = 5'
  AGENT_PIN=$4 start_agent hv01 "$W/vms" "$W/agent"
  wait_sources 1
  cat "$IMG" >/dev/null
  t0=$(now)
  "$HF" backup-now hv01/vm1 --wait --json >"$OUT/remote-$tag.json"
  t1=$(now)
  read -r rd st < <(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["bytes_read"], j["bytes_sent"])' "$OUT/remote-$tag.json")
  echo "$r,$layout,server+agent,$(echo "$t1 - $t0" | bc),$rd,$st" >>"$OUT/throughput.csv"
  say "round $r $layout server+agent: $(echo "$t1 - $t0" | bc) s"
  stop "$APID" "$SPID"
}
for r in $(seq 1 "$RUNS"); do
  round "$r" shared "" "" ""
  round "$r" split "taskset -c 0" "taskset -c 0" "taskset -c 1"
done

# ---------- 2. 200 VMs ----------
if [ "${SCALE:-1}" = 0 ]; then column -ts, "$OUT/throughput.csv"; exit 0; fi
say "200 VMs"
for i in $(seq -w 1 200); do
  mkdir -p "$W/vms200/vm$i"
  truncate -s 1M "$W/vms200/vm$i/disk0.raw"
  printf 'vm%s' "$i" | dd of="$W/vms200/vm$i/disk0.raw" conv=notrunc status=none
done
rm -rf "$W/srv200" "$W/agent200"
start_server "$W/srv200" $'[scheduler]\ntick_seconds = 1\npoll_seconds = 5\nmax_jobs = 16\nmax_jobs_per_host = 8'
start_agent hv01 "$W/vms200" "$W/agent200"
AGENT200=$APID
wait_sources 200
for g in $(seq 0 9); do
  args=()
  for k in $(seq 1 20); do args+=(--member "hv01/vm$(printf %03d $((g * 20 + k)))"); done
  "$HF" pg create "group$g" "${args[@]}" --retention-days 7 --sync-frequency 60 --recovery-point-times 20:00 --json >/dev/null
done
t0=$(now)
for _ in $(seq 1 1200); do
  n=$("$HF" recovery-points list --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
  [ "$n" -ge 200 ] && break
  sleep 0.5
done
t1=$(now)
say "initial replicas of 200 VMs: $n recovery points in $(echo "$t1 - $t0" | bc) s"
sleep 3
ticks=()
for _ in $(seq 1 10); do
  ticks+=("$(curl -s --cacert "$HOLDFAST_CA_FILE" -H "Authorization: Bearer $(cat "$HOLDFAST_TOKEN_FILE")" "$HOLDFAST_SERVER/api/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["scheduler_tick_ms"])')")
  sleep 1.1
done
echo "scheduler_tick_ms,${ticks[*]}" >"$OUT/scale.csv"
echo "call,median_ms,max_ms" >>"$OUT/scale.csv"
for path in datasources protection-groups recovery-points "jobs?limit=200" alerts status; do
  ts=()
  for _ in $(seq 1 20); do
    ts+=("$(curl -s -o /dev/null -w '%{time_total}' --cacert "$HOLDFAST_CA_FILE" -H "Authorization: Bearer $(cat "$HOLDFAST_TOKEN_FILE")" "$HOLDFAST_SERVER/api/v1/$path")")
  done
  python3 - "$path" "${ts[@]}" >>"$OUT/scale.csv" <<'EOF'
import statistics, sys
t = [float(x) * 1000 for x in sys.argv[2:]]
print(f"{sys.argv[1]},{statistics.median(t):.2f},{max(t):.2f}")
EOF
done
stop "$AGENT200" "$SPID"

python3 - "$OUT" "$BYTES" >"$OUT/summary.md" <<'EOF'
import csv, sys, statistics
out, size = sys.argv[1], int(sys.argv[2])
rows = list(csv.DictReader(open(f"{out}/throughput.csv")))
rounds = len(rows) // 4
for layout, what in (("shared", "server, agent and local mode all on both cores"),
                     ("split", "two-machine model: local mode and the agent on core 0, the server on core 1")):
    best = {}
    for r in rows:
        if r["layout"] != layout:
            continue
        s = float(r["seconds"])
        if r["mode"] not in best or s < best[r["mode"]][0]:
            best[r["mode"]] = (s, r)
    l, rm = best["local"][0], best["server+agent"][0]
    print(f"## Backup throughput, {size / 2**30:.1f} GiB image, best of {rounds}: {layout} ({what})\n")
    print("| | wall | throughput | bytes read | bytes stored/sent |\n|---|---:|---:|---:|---:|")
    for k in ("local", "server+agent"):
        s, r = best[k]
        print(f"| {k} | {s:.2f} s | {size / s / 2**20:.0f} MiB/s | {int(r['bytes_read']):,} | {int(r['bytes_stored']):,} |")
    print(f"\nserver+agent / local throughput: **{l / rm:.2f}x** (bar: at least 0.8x)\n")
lines = open(f"{out}/scale.csv").read().splitlines()
ticks = [float(x) for x in lines[0].split(",", 1)[1].split()]
print(f"## 200 protected VMs\n\nscheduler pass over all schedules: median {statistics.median(ticks):.1f} ms, max {max(ticks):.1f} ms (bar: under 50 ms)\n")
print("| call | median | max |\n|---|---:|---:|")
for row in csv.DictReader(lines[1:]):
    print(f"| GET /api/v1/{row['call']} | {row['median_ms']} ms | {row['max_ms']} ms |")
EOF
cat "$OUT/summary.md"
