#!/usr/bin/env bash
# Datastore benchmark: holdfast backup/restore vs the anchors (restic, borg, borg with a
# fixed 4 MiB chunker; rustic if RUSTIC_BIN is set) on the shared VM-disk workload, all in
# one go on this machine.
#
#   bench/datastore.sh [SIZE] [RUNS]          default 4G 4     (e.g. bench/datastore.sh 256M 1)
#
# Uses ../shared/bench/run_anchors.sh (ANCHORS=dir to override), which for every tool does
#   full     first backup of the day-0 image          noop  re-backup, image unchanged
#   incr     backup after the day-1 churn (1 % of the image in scattered 64 KiB writes)
#   restore  restore of the latest point to a file, sha256-checked against day 1
# each under /usr/bin/time -v (wall, CPU, peak RSS), with a `sync` timed right after
# (sync_s) and `du -sb` of the repository. Round r = 1..RUNS runs it twice (RUNS=1 each),
# interleaved so every tool sees the same machine state:
#   1. TOOLS="$BENCH_TOOLS [rustic] custom", the custom one named `holdfast`
#      (incremental without a change list: reads and hashes the whole image)
#   2. TOOLS=custom named `holdfast-ranges`: the incr step passes --changed-ranges with
#      the day-1 changed ranges (what hypervisor change tracking reports), precomputed
#      here with gen_disk.py mutate --ranges-out on a copy of the day-0 image.
# CSVs, logs, the ranges file and holdfast's --json backup outputs go to
# bench/results/datastore-STAMP/; datastore_summary.py then prints best-of-RUNS times,
# holdfast / best-anchor ratios against the project's bars, and saves them as summary.md.
#
# Environment:
#   HOLDFAST_BIN  binary to test (default target/release/holdfast; not built here; copied to
#                 a temp dir at start so a rebuild does not disturb the run)
#   HOLDFAST=0    skip the holdfast variants (anchors only)
#   BENCH_TOOLS   anchor variants, default "restic borg borg-fixed"; RUSTIC_BIN adds rustic
#   PERF_DIR (/tmp/perf), SEED (42), FRACTION (0.01), CACHE (hot|cold): as in run_anchors.sh
# Installs restic, borgbackup (and time, bc) with apt-get when missing.
set -euo pipefail

SIZE=${1:-4G}
RUNS=${2:-4}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
ANCHORS=$(cd "${ANCHORS:-$ROOT/../shared/bench}" && pwd)
HOLDFAST=${HOLDFAST:-1}
HOLDFAST_BIN=${HOLDFAST_BIN:-$ROOT/target/release/holdfast}
BENCH_TOOLS=${BENCH_TOOLS:-"restic borg borg-fixed"}
export PERF_DIR=${PERF_DIR:-/tmp/perf}
export SEED=${SEED:-42}
export FRACTION=${FRACTION:-0.01}
export CACHE=${CACHE:-hot}
GEN=$ANCHORS/gen_disk.py
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$HERE/results/datastore-$STAMP
DAY0=$PERF_DIR/img/day0-$SIZE-s$SEED.img                          # run_anchors.sh's names
DAY1_SHA=$PERF_DIR/img/day1-$SIZE-s$SEED-f$FRACTION.img.sha256
RANGES=$OUT/changed-ranges-day1.txt

die() { echo "datastore.sh: $*" >&2; exit 1; }
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/datastore.log" >&2; }
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, got '$RUNS'"
[[ -x $ANCHORS/run_anchors.sh && -f $GEN ]] || die "no run_anchors.sh/gen_disk.py in $ANCHORS"
mkdir -p "$OUT/json" "$PERF_DIR/img"

# ---------- tools ----------
need=()
command -v restic >/dev/null || need+=(restic)
command -v borg >/dev/null || need+=(borgbackup)
[[ -x /usr/bin/time ]] || need+=(time)
command -v bc >/dev/null || need+=(bc)
if ((${#need[@]})); then
  say "installing ${need[*]}"
  apt-get install -y "${need[@]}" >>"$OUT/datastore.log" 2>&1 ||
    { apt-get update >>"$OUT/datastore.log" 2>&1 && apt-get install -y "${need[@]}" >>"$OUT/datastore.log" 2>&1; } ||
    die "apt-get install ${need[*]} failed (see $OUT/datastore.log)"
fi

TMPD=$(mktemp -d /tmp/holdfast-datastore-bench.XXXXXX)
trap 'rm -rf "$TMPD"' EXIT
tools1=$BENCH_TOOLS
if [[ -n ${RUSTIC_BIN:-} ]]; then
  [[ -x $RUSTIC_BIN ]] || die "RUSTIC_BIN=$RUSTIC_BIN is not executable"
  export RUSTIC_BIN
  tools1="$tools1 rustic"
fi
hf_version=none hf_sha=none
if [[ $HOLDFAST == 1 ]]; then
  [[ -x $HOLDFAST_BIN ]] ||
    die "no holdfast binary at $HOLDFAST_BIN (cargo build --release -p holdfast, set HOLDFAST_BIN, or HOLDFAST=0)"
  cp "$HOLDFAST_BIN" "$TMPD/holdfast"
  export HFB_BIN=$TMPD/holdfast HFB_RANGES=$RANGES
  hf_version=$("$HFB_BIN" --version 2>/dev/null | head -1 || true)
  hf_sha=$(sha256sum "$HFB_BIN" | cut -d' ' -f1)
  tools1="$tools1 custom"   # last, so a holdfast failure does not cost the anchors' rows
  # Snippets for run_anchors.sh: CUSTOM_INIT is eval'ed there with $REPO set;
  # CUSTOM_BACKUP/RESTORE run under `bash -c` with REPO SRC DEST LABEL in the environment.
  # HFB_* are exported from here; HFB_JSON (per round and variant) names the --json output.
  # shellcheck disable=SC2016  # expanded later, by run_anchors.sh
  {
    HF_INIT='"$HFB_BIN" datastore create "$REPO"'
    HF_BACKUP='"$HFB_BIN" backup --datastore "$REPO" --source disk --json "$SRC" >"$HFB_JSON-$LABEL.json" && cat "$HFB_JSON-$LABEL.json"'
    HF_BACKUP_RANGES='if [[ $LABEL == incr ]]; then set -- --changed-ranges "$HFB_RANGES"; fi
"$HFB_BIN" backup --datastore "$REPO" --source disk --json "$@" "$SRC" >"$HFB_JSON-$LABEL.json" && cat "$HFB_JSON-$LABEL.json"'
    HF_RESTORE='"$HFB_BIN" restore --datastore "$REPO" --source disk --point latest --output "$DEST/disk.img"'
  }
fi

# ---------- images and the day-1 changed ranges ----------
if [[ ! -f $DAY0 ]]; then   # the command run_anchors.sh uses; written under a temporary name
  say "generating $DAY0"
  python3 "$GEN" gen "$DAY0.part" --size "$SIZE" --seed "$SEED" --manifest "${DAY0%.img}.json" >>"$OUT/datastore.log"
  mv "$DAY0.part" "$DAY0"
fi
say "day-1 changed ranges: mutating a copy of $DAY0"
COPY=$TMPD/day1-copy.img
python3 "$GEN" copy "$DAY0" "$COPY"
python3 "$GEN" mutate "$COPY" --seed "$SEED" --day 1 --fraction "$FRACTION" --ranges-out "$RANGES" >"$OUT/day1-mutate.json"
our_sha=$(sha256sum "$COPY" | cut -d' ' -f1)
rm -f "$COPY"
CHANGED=$(awk '{s += $2} END {printf "%d", s}' "$RANGES")
echo "$CHANGED" >"$OUT/changed_bytes"
day1_check() {  # compares our mutated copy with run_anchors.sh's day-1 sha256, once it exists
  if [[ ! -f $DAY1_SHA ]]; then echo pending; return; fi
  if [[ $(cat "$DAY1_SHA") == "$our_sha" ]]; then echo OK; else echo MISMATCH; fi
}
say "changed ranges: $(wc -l <"$RANGES") ranges, $CHANGED bytes; day-1 sha256 vs run_anchors: $(day1_check)"

dirty=
if [[ -n $(git -C "$ROOT" status --porcelain 2>/dev/null || true) ]]; then dirty=+dirty; fi
{
  echo "size=$SIZE"
  echo "img_bytes=$(stat -c %s "$DAY0")"
  echo "rounds=$RUNS"
  echo "seed=$SEED"
  echo "fraction=$FRACTION"
  echo "cache=$CACHE"
  echo "tools=$tools1"
  echo "changed_bytes=$CHANGED"
  echo "changed_ranges=$(wc -l <"$RANGES")"
  echo "day1_sha256=$our_sha"
  echo "holdfast_bin=$([[ $HOLDFAST == 1 ]] && echo "$HOLDFAST_BIN" || echo skipped)"
  echo "holdfast_version=$hf_version"
  echo "holdfast_sha256=$hf_sha"
  echo "git=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo ?)${dirty}"
  echo "restic=$(restic version 2>/dev/null | head -1 || true)"
  echo "borg=$(borg --version 2>/dev/null || true)"
  echo "machine=$(nproc) cores, $(free -g | awk '/^Mem/{print $2}') GiB, $(uname -r)"
} >"$OUT/meta.txt"

# ---------- rounds ----------
failed=()
anchors() {  # anchors LABEL ENV=VALUE...: one run_anchors.sh invocation with RUNS=1
  local label=$1; shift
  sleep 1   # run_anchors.sh names its CSV by the second it starts in; also lets the VM settle
  say "=== $label ==="
  if ! env OUT="$OUT" "$@" "$ANCHORS/run_anchors.sh" "$SIZE" 1 >>"$OUT/run_anchors.stdout"; then
    say "FAILED: $label (continuing)"
    failed+=("$label")
  fi
}
for r in $(seq 1 "$RUNS"); do
  if [[ $HOLDFAST == 1 ]]; then
    anchors "round $r/$RUNS: $tools1" TOOLS="$tools1" CUSTOM_NAME=holdfast HFB_JSON="$OUT/json/holdfast-r$r" \
      CUSTOM_INIT="$HF_INIT" CUSTOM_BACKUP="$HF_BACKUP" CUSTOM_RESTORE="$HF_RESTORE"
    anchors "round $r/$RUNS: holdfast-ranges" TOOLS=custom CUSTOM_NAME=holdfast-ranges HFB_JSON="$OUT/json/holdfast-ranges-r$r" \
      CUSTOM_INIT="$HF_INIT" CUSTOM_BACKUP="$HF_BACKUP_RANGES" CUSTOM_RESTORE="$HF_RESTORE"
  else
    anchors "round $r/$RUNS: $tools1" TOOLS="$tools1"
  fi
  if [[ $r == 1 ]]; then
    check=$(day1_check)
    echo "day1_vs_run_anchors=$check" >>"$OUT/meta.txt"
    say "day-1 image vs run_anchors.sh's: $check"
    if [[ $check == MISMATCH ]]; then
      say "WARNING: the changed-ranges file does not describe run_anchors.sh's day-1 image"
    fi
  fi
done

if ((${#failed[@]})); then
  (IFS=';'; echo "failed=${failed[*]}") >>"$OUT/meta.txt"
fi
python3 "$HERE/datastore_summary.py" "$OUT" | tee "$OUT/summary.md"
{
  echo
  echo "run_anchors summarize.py over all rounds (its growth is incr - full):"
  echo
  python3 "$ANCHORS/summarize.py" "$OUT"/*.csv
} >>"$OUT/summary.md" 2>&1 || true
say "results: $OUT (summary.md)"
if ((${#failed[@]})); then
  say "failed invocations (see their logs in $OUT): $(IFS=';'; echo "${failed[*]}")"
  exit 1
fi
