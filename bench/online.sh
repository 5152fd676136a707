#!/usr/bin/env bash
# Online-copy benchmark: `holdfast copy` of a local datastore into object storage
# (Azurite for Azure Blob, moto for S3, both started here), against `rclone copy` of the
# same datastore folder to moto. (rclone 1.60, Debian 12's, takes no Azure endpoint URL,
# only a host suffix after ACCOUNT. over https, and its emulator mode builds URLs with no
# scheme, "unsupported protocol scheme", retrying forever: the anchor is S3 only.)
#
#   bench/online.sh [SIZE]          default 4G   (e.g. bench/online.sh 1G)
#
# Workload (the shared generator's day-0 image, ../shared/bench/gen_disk.py):
#   backup      local `holdfast backup` of day 0 into a plain folder datastore
#   copy-full   `holdfast copy --create` into an encrypted datastore on Azurite and on moto
#   rclone-full `rclone copy` of the datastore folder to moto (the anchor)
#   incr        day-1 churn (gen_disk.py mutate --day 1 --ranges-out), local backup with
#               --changed-ranges: its bytes stored are the bar's reference
#   copy-incr   `holdfast copy` again: bytes uploaded, requests; the bar is <= 1.5x the
#               local incremental's stored bytes
#   rclone-incr `rclone copy` again (new files only)
#   restore     whole-disk `holdfast restore -d az://...`, checked against day 1
#   ilr         a 64 MiB ext4 image holding a 1 MiB random file, backed up, copied to
#               Azurite, then `holdfast ilr get -d az://...` of that file: requests and
#               bytes fetched (bar: under 4 MiB)
# Every request goes through bench/objproxy.py (a counting proxy), so holdfast and rclone
# are counted by the same meter (requests by method, body bytes each way); holdfast's
# own counts (`copy --json`) are recorded beside. The proxy is in every path, so times
# include its overhead for both tools alike.
#
# Results go to bench/results/online-STAMP/ (results.json, summary.md, logs).
# Environment: HOLDFAST_BIN (default target/release/holdfast, copied first), PERF_DIR
# (/tmp/perf, where the day-0 image is kept). Needs azurite-blob, moto_server, rclone
# (apt-get install -y rclone), mkfs.ext4, python3.
set -euo pipefail

SIZE=${1:-4G}
NAME=online
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"
GEN=$ANCHORS/gen_disk.py
AZ_ACCOUNT=devstoreaccount1
AZ_KEY='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='
RESULTS=$OUT/results.jsonl
for tool in azurite-blob moto_server rclone mkfs.ext4; do
  command -v "$tool" >/dev/null || { say "missing $tool"; exit 1; }
done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 300); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),1)" 2>/dev/null && return 0
    sleep 0.1
  done
  say "nothing listens on port $1 after 30 s"; exit 1
}

# ---------- servers, each behind a counting proxy ----------
AZ_PORT=$(free_port)
mkdir -p "$W/azurite"
azurite-blob --blobHost 127.0.0.1 --blobPort "$AZ_PORT" --location "$W/azurite" \
  --disableTelemetry --skipApiVersionCheck >"$OUT/azurite.log" 2>&1 &
PIDS+=($!)
MOTO_PORT=$(free_port)
moto_server -H 127.0.0.1 -p "$MOTO_PORT" >"$OUT/moto.log" 2>&1 &
PIDS+=($!)
wait_port "$AZ_PORT"
wait_port "$MOTO_PORT"
AZP=$(free_port)
python3 "$HERE/objproxy.py" "$AZP" "$AZ_PORT" &
PIDS+=($!)
S3P=$(free_port)
python3 "$HERE/objproxy.py" "$S3P" "$MOTO_PORT" &
PIDS+=($!)
wait_port "$AZP"
wait_port "$S3P"
AZ_ENDPOINT=http://127.0.0.1:$AZP/$AZ_ACCOUNT
S3_ENDPOINT=http://127.0.0.1:$S3P

# A container on Azurite (SharedKey-signed PUT, as testkit's create_container does).
create_container() {
  python3 - "$AZ_PORT" "$1" "$AZ_ACCOUNT" "$AZ_KEY" <<'EOF'
import base64, hashlib, hmac, http.client, sys
from email.utils import formatdate
port, name, acct, key = sys.argv[1:]
date = formatdate(usegmt=True)
ver = "2021-08-06"
sts = f"PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{ver}\n/{acct}/{acct}/{name}\nrestype:container"
sig = base64.b64encode(hmac.new(base64.b64decode(key), sts.encode(), hashlib.sha256).digest()).decode()
c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
c.request("PUT", f"/{acct}/{name}?restype=container", headers={
    "x-ms-date": date, "x-ms-version": ver, "Authorization": f"SharedKey {acct}:{sig}",
    "Content-Length": "0"})
r = c.getresponse()
sys.exit(0 if r.status == 201 else f"Azurite: container {name}: HTTP {r.status}")
EOF
}
create_bucket() {
  python3 -c "import http.client,sys; c=http.client.HTTPConnection('127.0.0.1',$MOTO_PORT,timeout=30); c.request('PUT','/$1',headers={'Content-Length':'0'}); s=c.getresponse().status; sys.exit(0 if s==200 else f'moto: bucket $1: HTTP {s}')"
}
for c in holdfast rclone ilrfs; do create_container "$c"; create_bucket "$c"; done

printf '%s\n' "$AZ_KEY" >"$W/az.cred"
printf 'AKIDHOLDFAST\nmoto-accepts-any-secret\n' >"$W/s3.cred"
az_env() { env HOLDFAST_STORAGE_KEY_FILE="$W/az.cred" HOLDFAST_STORAGE_ENDPOINT="$AZ_ENDPOINT" "$@"; }
s3_env() { env HOLDFAST_STORAGE_KEY_FILE="$W/s3.cred" HOLDFAST_STORAGE_ENDPOINT="$S3_ENDPOINT" "$@"; }
export RCLONE_CONFIG_S3_TYPE=s3 RCLONE_CONFIG_S3_PROVIDER=Other \
  RCLONE_CONFIG_S3_ACCESS_KEY_ID=AKIDHOLDFAST RCLONE_CONFIG_S3_SECRET_ACCESS_KEY=x \
  RCLONE_CONFIG_S3_ENDPOINT=$S3_ENDPOINT RCLONE_CONFIG_S3_REGION=us-east-1 \
  RCLONE_CONFIG_S3_FORCE_PATH_STYLE=true

proxy_reset() { python3 -c "import urllib.request; urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:$1/__reset', method='POST'), timeout=10)"; }
proxy_stats() { python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$1/__stats', timeout=10).read().decode())"; }

# record STEP TARGET SECONDS PROXY_STATS_JSON [EXTRA_JSON]: one line of results.jsonl.
record() {
  python3 - "$@" >>"$RESULTS" <<'EOF'
import json, sys
step, target, secs, proxy = sys.argv[1:5]
extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[5] else {}
print(json.dumps({"step": step, "target": target, "seconds": float(secs),
                  "proxy": json.loads(proxy) if proxy else None, **extra}))
EOF
}

# ---------- day 0: local backup ----------
DISK=$W/disk.img
python3 "$GEN" copy "$IMG" "$DISK"
"$HF" datastore create "$W/local" >/dev/null
say "backup of day 0 ($SIZE) into a local folder datastore"
t=$(now)
"$HF" backup -d "$W/local" --source bench/vm --json -q "$DISK" >"$OUT/backup-day0.json"
record backup local "$(echo "$(now) - $t" | bc)" "" "$(cat "$OUT/backup-day0.json")"

# copy TARGET_NAME URL ENV_FN PROXY_PORT STEP [copy args...]
copy() {
  local name=$1 url=$2 envfn=$3 port=$4 step=$5
  shift 5
  proxy_reset "$port"
  say "$step: holdfast copy to $url"
  local t
  t=$(now)
  "$envfn" "$HF" copy -d "$W/local" --to "$url" --to-key-file "$W/$name.key" --json -q "$@" \
    >"$OUT/$step-$name.json"
  local secs
  secs=$(echo "$(now) - $t" | bc)
  record "$step" "$name" "$secs" "$(proxy_stats "$port")" "$(cat "$OUT/$step-$name.json")"
}

# rclone_copy REMOTE PROXY_PORT STEP
rclone_copy() {
  local remote=$1 port=$2 step=$3
  proxy_reset "$port"
  say "$step: rclone copy to $remote:rclone"
  local t
  t=$(now)
  # A CA bundle from the environment makes rclone refuse its own HTTP transport.
  env -u AWS_CA_BUNDLE rclone copy "$W/local" "$remote:rclone" --stats-one-line --stats 10s -v --transfers 4 \
    >"$OUT/$step-$remote.log" 2>&1
  record "$step" "rclone-$remote" "$(echo "$(now) - $t" | bc)" "$(proxy_stats "$port")"
}

copy az "az://$AZ_ACCOUNT/holdfast" az_env "$AZP" copy-full --create
copy s3 "s3://holdfast" s3_env "$S3P" copy-full --create
rclone_copy s3 "$S3P" rclone-full

# ---------- day 1: churn, incremental backup, incremental copy ----------
python3 "$GEN" mutate "$DISK" --seed 42 --day 1 --ranges-out "$W/ranges.txt" >"$OUT/day1-mutate.json"
say "incremental backup of day 1 with --changed-ranges"
t=$(now)
"$HF" backup -d "$W/local" --source bench/vm --changed-ranges "$W/ranges.txt" --json -q "$DISK" \
  >"$OUT/backup-day1.json"
record incr local "$(echo "$(now) - $t" | bc)" "" "$(cat "$OUT/backup-day1.json")"
copy az "az://$AZ_ACCOUNT/holdfast" az_env "$AZP" copy-incr
copy s3 "s3://holdfast" s3_env "$S3P" copy-incr
rclone_copy s3 "$S3P" rclone-incr

# ---------- whole-disk restore from Azurite ----------
proxy_reset "$AZP"
say "restore of day 1 from az://"
t=$(now)
az_env "$HF" restore -d "az://$AZ_ACCOUNT/holdfast" --key-file "$W/az.key" --source bench/vm \
  -o "$W/restored.img" >/dev/null
secs=$(echo "$(now) - $t" | bc)
same=$(cmp -s "$DISK" "$W/restored.img" && echo true || echo false)
record restore az "$secs" "$(proxy_stats "$AZP")" "{\"identical\": $same}"
rm -f "$W/restored.img"
[ "$same" = true ] || { say "the restored disk differs from day 1"; exit 1; }

# ---------- item-level recovery of one file from Azurite ----------
mkdir -p "$W/fs-src"
head -c $((1 << 20)) /dev/urandom >"$W/fs-src/file.bin"
mkfs.ext4 -q -F -d "$W/fs-src" "$W/fs.img" 64M
"$HF" datastore create "$W/fslocal" >/dev/null
"$HF" backup -d "$W/fslocal" --source bench/fs -q "$W/fs.img" >/dev/null
az_env "$HF" copy -d "$W/fslocal" --to "az://$AZ_ACCOUNT/ilrfs" --to-key-file "$W/fs.key" --create -q \
  >/dev/null
proxy_reset "$AZP"
say "ilr get of a 1 MiB file from az://"
t=$(now)
az_env "$HF" ilr get bench/fs -d "az://$AZ_ACCOUNT/ilrfs" --key-file "$W/fs.key" /file.bin \
  --to-folder "$W/ilr-out" >/dev/null
secs=$(echo "$(now) - $t" | bc)
same=$(cmp -s "$W/fs-src/file.bin" "$W/ilr-out/file.bin" && echo true || echo false)
record ilr az "$secs" "$(proxy_stats "$AZP")" "{\"identical\": $same}"

# ---------- summary ----------
python3 - "$RESULTS" "$BYTES" "$SIZE" >"$OUT/summary.md" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
disk, size = int(sys.argv[2]), sys.argv[3]
MiB, GiB = 1 << 20, 1 << 30
get = lambda step, target: next(r for r in rows if r["step"] == step and r["target"] == target)
print(f"# Online copy, {size} disk ({disk / GiB:.2f} GiB virtual)\n")
print("| step | target | s | MB/s (disk) | uploaded MiB | requests (proxy) | PUT | GET | req/GiB up | holdfast's count |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    p = r.get("proxy") or {}
    up = p.get("bytes_up", 0)
    req = p.get("requests", 0)
    m = p.get("by_method", {})
    own = ""
    if r.get("requests"):
        own = str(r["requests"].get("total"))
    rate = disk / 1e6 / r["seconds"] if r["step"] in ("backup", "copy-full", "restore") else None
    per = f"{req / (up / GiB):.0f}" if up > 0 else ""
    print(f"| {r['step']} | {r['target']} | {r['seconds']:.1f} | {'' if rate is None else f'{rate:.0f}'} "
          f"| {up / MiB:.1f} | {req} | {m.get('PUT', 0)} | {m.get('GET', 0)} | {per} | {own} |")
incr = get("incr", "local")["bytes_stored"]
print(f"\nLocal incremental stored {incr / MiB:.1f} MiB.")
for t in ("az", "s3"):
    c = get("copy-incr", t)
    up = c["copies"][0]["bytes_uploaded"]
    wire = (c.get("proxy") or {}).get("bytes_up", 0)
    print(f"- copy-incr to {t}: bytes_uploaded {up / MiB:.1f} MiB, {wire / MiB:.1f} MiB on the wire "
          f"= {wire / incr:.2f}x the local incremental (bar <= 1.5x): "
          f"{'PASS' if wire <= 1.5 * incr else 'FAIL'}")
i = get("ilr", "az")
p = i["proxy"]
print(f"- ilr get of 1 MiB from az: {p['requests']} requests, {p['bytes_down'] / MiB:.2f} MiB fetched "
      f"(bar < 4 MiB): {'PASS' if p['bytes_down'] < 4 * MiB else 'FAIL'}; identical: {i['identical']}")
print(f"- restore from az: {get('restore', 'az')['seconds']:.1f} s; identical: {get('restore', 'az')['identical']}")
EOF
cat "$OUT/summary.md"
say "results in $OUT"
