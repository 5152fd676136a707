# Shared by the benchmarks that run `holdfast server` and `holdfast agent`. Expects
# HF (the binary), PIDS (an array the caller's cleanup kills) and OUT (results folder).

say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/bench.log" >&2; }
now() { date +%s.%N; }

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
