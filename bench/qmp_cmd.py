#!/usr/bin/env python3
"""QMP helper for bench/qemu.sh (stdlib only).

  qmp_cmd.py SOCK CMD [ARGS-JSON]
      runs one QMP command, prints its "return" as JSON (exit 1 on an error reply).
  qmp_cmd.py SOCK --replay SOURCE RANGES DRIVE
      replays the changed ranges ("offset length" per line, from gen_disk.py mutate
      --ranges-out) as guest writes: the bytes of SOURCE at each range are written to
      the BlockBackend DRIVE with HMP `qemu-io DRIVE "write -s FILE OFF LEN"`. Prints
      {"writes", "bytes_written", "dirty_bytes"} (dirty = the 64 KiB blocks touched).
"""
import json, os, socket, sys, tempfile, time


class QMP:
    def __init__(self, path, timeout=60.0):
        deadline = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.s.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.02)
        self.s.settimeout(timeout)
        self.f = self.s.makefile("rwb")
        self._read()
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.f.readline()
        if not line:
            raise EOFError("QMP socket closed")
        return json.loads(line)

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = self._read()
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']}")
            return r["return"]


def replay(q, source, ranges, drive):
    block = 64 << 10
    dirty, writes, written = set(), 0, 0
    with open(source, "rb") as src, tempfile.TemporaryDirectory() as tmp:
        chunk = os.path.join(tmp, "chunk")
        for line in open(ranges):
            off, ln = map(int, line.split())
            src.seek(off)
            with open(chunk, "wb") as f:
                f.write(src.read(ln))
            out = q.cmd("human-monitor-command",
                        {"command-line": f'qemu-io {drive} "write -s {chunk} {off} {ln}"'})
            if out.strip():
                sys.exit(f"qemu-io write at {off}+{ln} failed: {out}")
            writes += 1
            written += ln
            dirty.update(range(off // block, (off + ln - 1) // block + 1))
    print(json.dumps({"writes": writes, "bytes_written": written, "dirty_bytes": len(dirty) * block}))


def main():
    q = QMP(sys.argv[1])
    if sys.argv[2] == "--replay":
        replay(q, *sys.argv[3:6])
        return
    args = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
    try:
        print(json.dumps(q.cmd(sys.argv[2], args)))
    except RuntimeError as e:
        sys.exit(f"QMP error: {e}")


if __name__ == "__main__":
    main()
