#!/usr/bin/env python3
"""Summarize one bench/datastore.sh invocation: holdfast's datastore vs the anchors.

  datastore_summary.py DIR [--changed-bytes N]

DIR holds the run_anchors.sh CSVs of one invocation (one per round and variant), plus what
datastore.sh writes beside them: changed_bytes (sum of the day-1 changed-range lengths;
--changed-bytes overrides it), meta.txt, json/*.json (holdfast backup --json outputs).

Times: best (minimum) over rounds, wall and wall+sync (sync_s = a `sync` timed right after
the step: tools that fsync pay inside wall, the others leave dirty pages for that sync).
Peak RSS: maximum over rounds. Repo sizes (du -sb): minimum over rounds; incr growth is
repo after incr - repo after noop of the same run. Ratios compare holdfast with the best
anchor of the same invocation (any tool not named holdfast*), each side at its best.
"""
import argparse
import csv
import glob
import json
import os
import re
import sys
from collections import defaultdict

PHASES = ("full", "noop", "incr", "restore")
HF, HF_RANGES = "holdfast", "holdfast-ranges"
MiB = 1 << 20


def is_holdfast(tool):
    return tool.startswith("holdfast")


def num(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def fmt(x, nd=2, unit=""):
    return "n/a" if x is None else f"{x:.{nd}f}{unit}"


def mb(b):
    return "n/a" if b is None else f"{b / 1e6:,.1f}"


def load(d):
    paths = sorted(glob.glob(os.path.join(d, "*.csv")))
    steps = defaultdict(list)     # (tool, phase) -> [dict(round, wall, sync, cpu, rss, repo)]
    verify = defaultdict(list)    # tool -> ["OK", ...]
    repo = {}                     # (round, run, tool, phase) -> repo bytes
    seen = set()
    for i, p in enumerate(paths, 1):
        with open(p, newline="") as f:
            for r in csv.DictReader(f):
                tool, phase = r["tool"], r["phase"]
                seen.add((r["size_arg"], r["cache"]))
                if phase == "verify":
                    verify[tool].append((r["note"] or "?").split()[0])
                    continue
                if phase not in PHASES or num(r["wall_s"]) is None:
                    continue
                e = dict(round=i, wall=num(r["wall_s"]), sync=num(r["sync_s"]) or 0.0,
                         cpu=(num(r["user_s"]) or 0.0) + (num(r["sys_s"]) or 0.0),
                         rss=num(r["maxrss_kb"]), repo=num(r["repo_bytes"]))
                steps[tool, phase].append(e)
                if e["repo"] is not None:
                    repo[i, r["run"], tool, phase] = e["repo"]
    growth = defaultdict(list)    # tool -> [incr - noop bytes] per run
    for (i, run, tool, phase), b in repo.items():
        if phase == "incr" and (i, run, tool, "noop") in repo:
            growth[tool].append(b - repo[i, run, tool, "noop"])
    return paths, steps, verify, growth, seen


def read_kv(path):
    kv = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if "=" in line:
                    k, v = line.rstrip("\n").split("=", 1)
                    kv[k] = v
    return kv


def read_json_outputs(d):
    """json/<variant>-r<round>-<label>.json -> {(variant, label): [obj, ...]}"""
    out = defaultdict(list)
    for p in sorted(glob.glob(os.path.join(d, "json", "*.json"))):
        m = re.match(r"(.+)-r\d+-(\w+)\.json$", os.path.basename(p))
        if not m:
            continue
        try:
            with open(p) as f:
                obj = json.load(f)
        except (OSError, ValueError):
            obj = None
        out[m.group(1), m.group(2)].append(obj if isinstance(obj, dict) else None)
    return out


def main(argv):
    ap = argparse.ArgumentParser(description="Summarize one bench/datastore.sh invocation.")
    ap.add_argument("dir", help="bench/results/datastore-STAMP")
    ap.add_argument("--changed-bytes", type=int, help="default: DIR/changed_bytes")
    a = ap.parse_args(argv)
    d, changed = a.dir, a.changed_bytes
    if not os.path.isdir(d):
        sys.exit(f"not a directory: {d}")
    if changed is None and os.path.exists(os.path.join(d, "changed_bytes")):
        with open(os.path.join(d, "changed_bytes")) as f:
            changed = int(f.read().strip() or 0) or None
    meta = read_kv(os.path.join(d, "meta.txt"))
    paths, steps, verify, growth, seen = load(d)
    if not paths:
        sys.exit(f"no CSV files in {d}")
    tools = []
    for (tool, _ph) in steps:
        if tool not in tools:
            tools.append(tool)
    for tool in verify:
        if tool not in tools:
            tools.append(tool)
    tools.sort(key=lambda t: (is_holdfast(t), t == HF_RANGES))   # anchors first, stable
    anchors = [t for t in tools if not is_holdfast(t)]

    def best(tool, phase, key):
        v = [key(e) for e in steps.get((tool, phase), [])]
        return min(v) if v else None

    wall = lambda e: e["wall"]
    wsync = lambda e: e["wall"] + e["sync"]

    def repo_full(tool):
        return best(tool, "full", lambda e: e["repo"])

    def grow(tool):
        return min(growth[tool]) if growth.get(tool) else None

    def peak_rss(tools_):
        v = [e["rss"] for t in tools_ for ph in PHASES for e in steps.get((t, ph), []) if e["rss"]]
        return max(v) / 1024 if v else None

    def best_anchor(phase, key):
        c = [(best(t, phase, key), t) for t in anchors]
        c = [x for x in c if x[0] is not None]
        return min(c) if c else (None, None)

    # ---------- header ----------
    print(f"# Datastore benchmark: {os.path.basename(os.path.normpath(d))}")
    print()
    if meta:
        print(f"- image {meta.get('size', '?')} ({meta.get('img_bytes', '?')} B), seed {meta.get('seed', '?')}, "
              f"cache {meta.get('cache', '?')}, rounds {meta.get('rounds', '?')}, {len(paths)} CSV files; "
              f"{meta.get('machine', '')}")
        print(f"- day-1 churn: fraction {meta.get('fraction', '?')}, {meta.get('changed_ranges', '?')} changed ranges, "
              f"{changed if changed is not None else '?'} B changed; ranges file vs run_anchors' day-1 image: "
              f"{meta.get('day1_vs_run_anchors', 'not checked')}")
        hf = meta.get("holdfast_bin", "?")
        if hf != "skipped":
            hf += f" ({meta.get('holdfast_version', '?')}, sha256 {meta.get('holdfast_sha256', '?')[:16]})"
        print(f"- holdfast: {hf}; git {meta.get('git', '?')}; {meta.get('restic', '')}; {meta.get('borg', '')}")
    else:
        print(f"- {len(paths)} CSV files; changed bytes: {changed if changed is not None else 'unknown'}")
    if meta.get("failed"):
        print(f"- FAILED run_anchors.sh invocations (rows from the failed step on are missing): {meta['failed']}")
    if len(seen) > 1:
        print(f"- WARNING: CSVs mix image sizes / cache modes: {sorted(seen)}")
    print()

    # ---------- per tool, per phase ----------
    print("## Per step (best of rounds)")
    print()
    print("| tool | phase | rounds | best wall s | sync s (min-max) | best wall+sync s | CPU s at best wall "
          "| peak RSS MiB | repo MB after |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for t in tools:
        for ph in PHASES:
            es = steps.get((t, ph), [])
            if not es:
                print(f"| {t} | {ph} | 0 | n/a | n/a | n/a | n/a | n/a | n/a |")
                continue
            b = min(es, key=wall)
            syncs = [e["sync"] for e in es]
            rss = max((e["rss"] for e in es if e["rss"]), default=None)
            rp = min((e["repo"] for e in es if e["repo"] is not None), default=None)
            sy = f"{min(syncs):.2f}" if f"{min(syncs):.2f}" == f"{max(syncs):.2f}" else f"{min(syncs):.2f}-{max(syncs):.2f}"
            print(f"| {t} | {ph} | {len(es)} | {b['wall']:.2f} | {sy} "
                  f"| {min(map(wsync, es)):.2f} | {b['cpu']:.1f} | {fmt(rss and rss / 1024, 0)} | {mb(rp)} |")
    print()

    # ---------- per tool: storage, memory, restore check ----------
    print("## Per tool")
    print()
    print("| tool | repo after full MB | incr growth MB (incr - noop) | growth / changed bytes "
          "| peak RSS MiB (all steps) | restore verify |")
    print("|---|---:|---:|---:|---:|---|")
    for t in tools:
        g = grow(t)
        gx = f"{g / changed:.2f}x" if g is not None and changed else "n/a"
        v = verify.get(t, [])
        vs = ", ".join(f"{s} {v.count(s)}/{len(v)}" for s in sorted(set(v))) if v else "n/a"
        print(f"| {t} | {mb(repo_full(t))} | {mb(g)} | {gx} | {fmt(peak_rss([t]), 0)} | {vs} |")
    print()

    # ---------- bars ----------
    print("## holdfast vs the best anchor (bars)")
    print()
    print("| metric | holdfast | best anchor | ratio (wall) | ratio (wall+sync) | bar |")
    print("|---|---:|---:|---:|---:|---|")

    def verdict(x, bar):
        if x is None:
            return "n/a"
        if bar is None:
            return f"{x:.2f}"
        return f"{x:.2f} {'ok' if x <= bar else 'MISSES'}"

    def ratio(a, b):
        return a / b if a is not None and b else None

    for label, tool, ph, bar in (("full backup", HF, "full", 0.4),
                                 ("incr, with changed ranges", HF_RANGES, "incr", 0.1),
                                 ("incr, without ranges", HF, "incr", 0.35),
                                 ("restore", HF, "restore", 0.4),
                                 ("unchanged re-backup (no bar)", HF, "noop", None)):
        h, hs = best(tool, ph, wall), best(tool, ph, wsync)
        a, at = best_anchor(ph, wall)
        as_, ast = best_anchor(ph, wsync)
        hcell = "n/a" if h is None else f"{tool}: {h:.2f} s / {hs:.2f} s"
        acell = "n/a" if a is None else f"{at} {a:.2f} s / {ast} {as_:.2f} s"
        print(f"| {label} | {hcell} | {acell} | {verdict(ratio(h, a), bar)} | {verdict(ratio(hs, as_), bar)} "
              f"| {'<= ' + str(bar) if bar is not None else '-'} |")

    rf = repo_full(HF)
    ra = [(repo_full(t), t) for t in anchors if repo_full(t) is not None]
    ra_b, ra_t = min(ra) if ra else (None, None)
    print(f"| repo after full / smallest anchor | {mb(rf) + ' MB' if rf is not None else 'n/a'} "
          f"| {'n/a' if ra_b is None else f'{ra_t} {mb(ra_b)} MB'} "
          f"| {verdict(ratio(rf, ra_b), 1.1)} | | <= 1.1 |")
    ag = [(grow(t) / changed, t) for t in anchors if grow(t) is not None and changed]
    ag_b, ag_t = min(ag) if ag else (None, None)
    for tool in (HF, HF_RANGES):
        g = grow(tool)
        acell = "n/a" if ag_b is None else f"{ag_t} {ag_b:.2f}x"
        hcell = "n/a" if g is None else f"{mb(g)} MB / {mb(changed)} MB"
        print(f"| incr growth / changed bytes ({tool}) | {hcell} | {acell} "
              f"| {verdict(ratio(g, changed), 3)} | | <= 3 |")
    pr = peak_rss([HF, HF_RANGES])
    pa = [(peak_rss([t]), t) for t in anchors if peak_rss([t]) is not None]
    pa_b, pa_t = min(pa) if pa else (None, None)
    pverdict = "n/a" if pr is None else f"{pr:.0f} MiB {'ok' if pr <= 160 else 'MISSES'}"
    print(f"| peak RSS, any step | {fmt(pr, 0, ' MiB')} | {'n/a' if pa_b is None else f'{pa_t} {pa_b:.0f} MiB'} "
          f"| {pverdict} | | <= 160 MiB |")
    hv = [s for t in (HF, HF_RANGES) for s in verify.get(t, [])]
    print(f"| restore verified (sha256 = day 1) | {'n/a' if not hv else ', '.join(f'{s} {hv.count(s)}/{len(hv)}' for s in sorted(set(hv)))} "
          f"| | | | all OK |")
    print()
    print("Ratios: holdfast's best time / the best anchor's best time (wall; and wall+sync, each side's own best).")

    # ---------- holdfast's own accounting ----------
    js = read_json_outputs(d)
    if js:
        print()
        print("## holdfast backup --json (min-max over rounds)")
        print()
        print("| variant | step | outputs | bytes_read MB | bytes_stored MB |")
        print("|---|---|---:|---:|---:|")
        for (variant, label), objs in sorted(js.items(), key=lambda kv: (kv[0][0], PHASES.index(kv[0][1])
                                                                         if kv[0][1] in PHASES else 9)):
            def rng(key):
                v = [o[key] for o in objs if o and isinstance(o.get(key), (int, float))]
                if not v:
                    return "n/a"
                return mb(min(v)) if min(v) == max(v) else f"{mb(min(v))}-{mb(max(v))}"
            ok = sum(1 for o in objs if o)
            print(f"| {variant} | {label} | {ok}/{len(objs)} parsed | {rng('bytes_read')} | {rng('bytes_stored')} |")


if __name__ == "__main__":
    main(sys.argv[1:])
