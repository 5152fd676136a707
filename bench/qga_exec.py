#!/usr/bin/env python3
"""Guest-agent helper for bench/guest.sh (stdlib only).

  qga_exec.py SOCK ping [SECONDS]   waits up to SECONDS (default 300) for guest-ping
  qga_exec.py SOCK CMD...           runs `/bin/sh -c CMD` in the guest (guest-exec),
                                    waits for it, prints its stdout, exits with its code
The socket serves one client at a time: each call connects, asks, and disconnects.
"""
import base64, json, socket, sys, time


def call(path, cmd, args=None, timeout=30.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    f = s.makefile("rwb")
    # guest-sync first: drops whatever an earlier client left unread.
    tag = int(time.time() * 1000) % 2**31
    f.write(json.dumps({"execute": "guest-sync", "arguments": {"id": tag}}).encode() + b"\n")
    f.flush()
    while True:
        line = f.readline()
        if not line:
            raise EOFError("guest agent closed the socket")
        if json.loads(line).get("return") == tag:
            break
    msg = {"execute": cmd}
    if args is not None:
        msg["arguments"] = args
    f.write(json.dumps(msg).encode() + b"\n")
    f.flush()
    r = json.loads(f.readline())
    s.close()
    if "error" in r:
        raise RuntimeError(f"{cmd}: {r['error']}")
    return r.get("return")


def main():
    path = sys.argv[1]
    if sys.argv[2] == "ping":
        limit = float(sys.argv[3]) if len(sys.argv) > 3 else 300.0
        deadline = time.time() + limit
        while True:
            try:
                call(path, "guest-ping", timeout=2.0)
                return 0
            except Exception:
                if time.time() > deadline:
                    print(f"no guest-ping answer within {limit:.0f} s", file=sys.stderr)
                    return 1
                time.sleep(0.5)
    cmd = " ".join(sys.argv[2:])
    pid = call(path, "guest-exec", {"path": "/bin/sh", "arg": ["-c", cmd], "capture-output": True})["pid"]
    deadline = time.time() + 600
    while True:
        st = call(path, "guest-exec-status", {"pid": pid})
        if st.get("exited"):
            sys.stdout.write(base64.b64decode(st.get("out-data", "")).decode(errors="replace"))
            sys.stderr.write(base64.b64decode(st.get("err-data", "")).decode(errors="replace"))
            return st.get("exitcode", 128 + st.get("signal", 0))
        if time.time() > deadline:
            print(f"`{cmd}` still running after 600 s", file=sys.stderr)
            return 1
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
