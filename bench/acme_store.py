#!/usr/bin/env python3
"""ACME mode with N certificates already in the store: start-up, memory, and
the lazy certificate loader, without a CA (docs/PERFORMANCE.md).

    cargo build --release --bin mtasts --example acme_store --example loadgen
    target/release/examples/acme_store --dir /tmp/acme100k --domains 100000
    python3 bench/acme_store.py --dir /tmp/acme100k --domains 100000

Measures, for the server started in --dir (ports from its mtasts.toml):
  serving_s   process start until the LAST domain's policy is served over
              HTTPS (its certificate comes from the store);
  scanned_s   process start until the certificate manager has read the
              store ("read the certificate store" log line; the old build,
              which read everything before serving, has no such line);
  rss_*_mb    RSS when serving, once the store is read, and after one new
              TLS connection to every domain (loadgen --once);
  touch_s     time for that pass, and its errors.
Only addresses on loopback are used; the server is stopped at the end.
"""

import argparse
import json
import os
import re
import signal
import ssl
import socket
import subprocess
import sys
import time

from common import rss_mb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def https_ok(port, host, ctx):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                tls.sendall(
                    f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                return tls.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--domains", type=int, required=True)
    ap.add_argument("--mtasts", default=os.path.join(ROOT, "target/release/mtasts"))
    ap.add_argument("--loadgen", default=os.path.join(ROOT, "target/release/examples/loadgen"))
    ap.add_argument("--label", default="")
    ap.add_argument("--touch", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    conf = open(os.path.join(args.dir, "mtasts.toml")).read()
    port = int(re.search(r'https = "127\.0\.0\.1:(\d+)"', conf).group(1))
    ctx = ssl.create_default_context(cafile=os.path.join(args.dir, "ca.pem"))
    last = f"mta-sts.d{args.domains - 1}.bench.test"
    log_path = os.path.join(args.dir, f"serve{args.label}.log")
    log = open(log_path, "w")
    t0 = time.monotonic()
    proc = subprocess.Popen([args.mtasts, "serve", "--config", "mtasts.toml"], cwd=args.dir,
                            stdout=subprocess.DEVNULL, stderr=log)
    out = {"label": args.label, "domains": args.domains}
    try:
        while not https_ok(port, last, ctx):
            if proc.poll() is not None:
                sys.exit(f"server exited: see {log_path}")
            if time.monotonic() - t0 > 600:
                sys.exit("not serving within 600 s")
            time.sleep(0.01)
        out["serving_s"] = round(time.monotonic() - t0, 3)
        out["rss_serving_mb"] = round(rss_mb(proc.pid), 1)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if "read the certificate store" in open(log_path).read():
                out["scanned_s"] = round(time.monotonic() - t0, 3)
                break
            if "certificate store" not in open(log_path).read() and args.label == "old":
                break
            time.sleep(0.05)
        time.sleep(2)
        out["rss_scanned_mb"] = round(rss_mb(proc.pid), 1)
        if args.touch:
            t1 = time.monotonic()
            res = subprocess.run(
                [args.loadgen, "--addr", f"127.0.0.1:{port}", "--tls", "--ca",
                 os.path.join(args.dir, "ca.pem"), "--domains", str(args.domains),
                 "--connections", "32", "--once"],
                capture_output=True, text=True, timeout=900)
            out["touch_s"] = round(time.monotonic() - t1, 2)
            m = re.search(r"errors=(\d+)", res.stdout)
            out["touch_errors"] = int(m.group(1)) if m else res.stdout + res.stderr
            m = re.search(r"rps=([\d.]+)", res.stdout)
            out["touch_rps"] = float(m.group(1)) if m else None
            out["rss_touched_mb"] = round(rss_mb(proc.pid), 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
