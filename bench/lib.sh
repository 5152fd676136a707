# Shared by the benchmarks that run `holdfast server` and `holdfast agent`. Sourced
# with NAME, SIZE and HERE set; sets ROOT, ANCHORS, OUT (results folder), W (scratch,
# removed at exit), HF (a copy of the binary), IMG (the shared generator's day-0 image,
# made when missing) and BYTES, and kills every pid in PIDS at exit.

ROOT=$(cd "$HERE/.." && pwd)
ANCHORS=$(cd "${ANCHORS:-$ROOT/../shared/bench}" && pwd)
HF_SRC=${HOLDFAST_BIN:-$ROOT/target/release/holdfast}
PERF_DIR=${PERF_DIR:-/tmp/perf}
OUT=$HERE/results/$NAME-$(date -u +%Y%m%dT%H%M%SZ)
IMG=$PERF_DIR/img/day0-$SIZE-s42.img
[ -x "$HF_SRC" ] || { echo "$NAME.sh: no binary at $HF_SRC (cargo build --release -p holdfast)" >&2; exit 1; }
mkdir -p "$OUT" "$PERF_DIR/img"
W=$(mktemp -d "/tmp/hf-$NAME-bench.XXXXXX")
cp "$HF_SRC" "$W/holdfast"
HF=$W/holdfast
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/bench.log" >&2; }
now() { date +%s.%N; }

# NO_IMAGE=1: the benchmark makes its own disks.
if [ -z "${NO_IMAGE:-}" ]; then
  [ -f "$IMG" ] || { say "generating $IMG"; python3 "$ANCHORS/gen_disk.py" gen --size "$SIZE" --seed 42 "$IMG"; }
  BYTES=$(stat -c %s "$IMG")
fi

# start_server DIR TOML -> sets URL, SPID
start_server() {
  local dir=$1
  mkdir -p "$dir"
  printf '%s\n' "$2" >"$dir/holdfast.toml"
  ${SERVER_PIN:-} "$HF" server --data-dir "$dir" --listen 127.0.0.1:0 >"$dir/stdout" 2>"$dir/stderr" &
  SPID=$!
  PIDS+=("$SPID")
  for _ in $(seq 1 200); do
    URL=$(sed -n 's/^holdfast server listening on //p' "$dir/stdout" 2>/dev/null | head -1)
    [ -n "$URL" ] && break
    sleep 0.05
  done
  [ -n "$URL" ] || { cat "$dir/stderr" >&2; exit 1; }
  export HOLDFAST_SERVER=$URL HOLDFAST_TOKEN_FILE=$dir/admin.token HOLDFAST_CA_FILE=$dir/ca.pem
}

start_agent() { # HOST VMDIR AGENTDIR
  local tok
  tok=$("$HF" agent-token create --host "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  ${AGENT_PIN:-} "$HF" agent --enroll "$tok" --data-dir "$3" --files-root "$2" --inventory-seconds 1 ${AGENT_ARGS:-} 2>"$3.stderr" &
  APID=$!
  PIDS+=("$APID")
}

wait_sources() { # N
  for _ in $(seq 1 600); do
    n=$("$HF" datasources list --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
    [ "$n" -ge "$1" ] && return 0
    sleep 0.2
  done
  echo "bench: only $n of $1 data sources appeared" >&2
  exit 1
}

stop() { kill "$@" 2>/dev/null || true; wait "$@" 2>/dev/null || true; }
