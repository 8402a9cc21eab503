#!/usr/bin/env python3
"""Replicas on PostgreSQL: propagation time and database load.

Starts a throw-away PostgreSQL (initdb + postgres on a free loopback port,
as `nobody` when run as root), two release `mtasts serve` replicas sharing
it (`[store] backend = "postgres"`, self-signed certificates), each with the
same N config-file domains (1,000 per file), and measures:

  start-a, start-b     process start until the last domain is served (s)
  rss-a, rss-b         resident memory once serving (MB)
  put-on-a             one admin PUT on replica A, answered (ms)
  put-a-served-by-b    admin PUT on A until replica B serves the new policy
                       (ms; min / median / max over --samples PUTs)
  delete-a-gone-on-b   admin DELETE on A until B refuses the domain (ms)
  idle-queries/s       statements per second per idle replica (heartbeat
                       and catch-up), from pg_stat_database over --idle s

    python3 bench/replicas.py --domains 100000

nginx has no counterpart: a change there is a config rollout and a reload
per machine (bench/run.py measures nginx's reload at 100,000 domains).
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from common import free_port, rss_mb, write_domain_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MTASTS = os.path.join(ROOT, "target/release/mtasts")
TOKEN = "bench-token-0123456789abcdef"
POLICY_PATH = "/.well-known/mta-sts.txt"


def pg_bin():
    for v in sorted(os.listdir("/usr/lib/postgresql"), reverse=True):
        d = f"/usr/lib/postgresql/{v}/bin"
        if os.path.exists(f"{d}/initdb"):
            return d
    raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")


def as_user(cmd):
    return (["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
            if os.geteuid() == 0 else cmd)


def start_postgres(work):
    bindir = pg_bin()
    pgdir = os.path.join(work, "pg")
    os.makedirs(pgdir)
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "65534:65534", pgdir], check=True)
    subprocess.run(as_user([f"{bindir}/initdb", "-D", f"{pgdir}/data", "-U", "mtasts",
                            "--auth=trust", "--no-sync", "-E", "UTF8"]),
                   check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    log = open(os.path.join(work, "postgres.log"), "w")
    proc = subprocess.Popen(as_user([f"{bindir}/postgres", "-D", f"{pgdir}/data", "-p", str(port),
                                     "-c", "listen_addresses=127.0.0.1",
                                     "-c", f"unix_socket_directories={pgdir}",
                                     "-c", "fsync=off"]),
                            stdout=log, stderr=log)
    for _ in range(300):
        if subprocess.run([f"{bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(port)],
                          stdout=subprocess.DEVNULL).returncode == 0:
            break
        time.sleep(0.1)
    subprocess.run([f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "mtasts",
                    "mtasts"], check=True)
    return proc, port, bindir


def psql(bindir, port, query):
    out = subprocess.run([f"{bindir}/psql", "-h", "127.0.0.1", "-p", str(port), "-U", "mtasts",
                          "-d", "mtasts", "-X", "-A", "-t", "-c", query],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def write_replica(work, name, n, pg_port):
    d = os.path.join(work, name)
    dd = os.path.join(d, "domains.d")
    os.makedirs(dd)
    https, http, admin = free_port(), free_port(), free_port()
    with open(os.path.join(d, "admin.token"), "w") as f:
        f.write(TOKEN + "\n")
    with open(os.path.join(d, "mtasts.toml"), "w") as f:
        f.write(f"""domains_dir = "domains.d"
[server]
https = "127.0.0.1:{https}"
http = "127.0.0.1:{http}"
state_dir = "state"
behind_proxy = true
[admin]
listen = "127.0.0.1:{admin}"
token_file = "admin.token"
[store]
backend = "postgres"
url = "postgres://mtasts@127.0.0.1:{pg_port}/mtasts"
[defaults]
mode = "enforce"
max_age = "1w"
mx = ["mx1.provider.example", "*.mx.provider.example"]
""")
    write_domain_files(dd, n, "d")
    return {"dir": d, "https": https, "http": http, "admin": admin}


def http_call(port, method, path, host="127.0.0.1", body=None, timeout=10.0):
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        payload = (body or "").encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(payload)}\r\n")
        if body is not None:
            head += "Content-Type: application/json\r\n"
        sock.sendall(head.encode() + b"\r\n" + payload)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return (int(head.split(b" ", 2)[1]) if head else 0), rest


def policy(replica, domain):
    try:
        return http_call(replica["http"], "GET", POLICY_PATH, host=f"mta-sts.{domain}", timeout=1.0)
    except OSError:
        return 0, b""


def wait_for(pred, what, limit=120.0, pause=0.001):
    t0 = time.time()
    while time.time() - t0 < limit:
        if pred():
            return time.time() - t0
        time.sleep(pause)
    raise SystemExit(f"timed out waiting for {what}")



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domains", type=int, default=100_000)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idle load measured")
    ap.add_argument("--mtasts", default=MTASTS)
    args = ap.parse_args()
    n = args.domains
    work = tempfile.mkdtemp(prefix="mtasts-replicas-")
    procs = []
    rows = []
    try:
        if os.geteuid() == 0:
            os.chmod(work, 0o755)
        pg, pg_port, bindir = start_postgres(work)
        procs.append(pg)
        a = write_replica(work, "a", n, pg_port)
        b = write_replica(work, "b", n, pg_port)
        time.sleep(2.5)  # older than the loader's racy-stamp window
        for name, r in (("a", a), ("b", b)):
            log = open(os.path.join(r["dir"], "stderr.log"), "w")
            t0 = time.time()
            p = subprocess.Popen([args.mtasts, "serve", "--config", "mtasts.toml"], cwd=r["dir"],
                                 stdout=subprocess.DEVNULL, stderr=log,
                                 env=dict(os.environ, MTASTS_REPLICA=name))
            procs.append(p)
            r["proc"] = p
            wait_for(lambda: policy(r, f"d{n - 1}.bench.test")[0] == 200, f"start {name}")
            rows.append((f"start-{name}", "s", time.time() - t0))
        time.sleep(1.0)
        rows.append(("rss-a", "MB", rss_mb(a["proc"].pid)))
        rows.append(("rss-b", "MB", rss_mb(b["proc"].pid)))

        puts, lags, gone = [], [], []
        for k in range(args.samples):
            domain = f"api{k}.bench.test"
            mx = f"mx{k}.api.bench.test"
            t0 = time.time()
            status, body = http_call(a["admin"], "PUT", f"/v1/domains/{domain}",
                                     body=f'{{"mx":["{mx}"]}}', timeout=60)
            puts.append(time.time() - t0)
            if status not in (200, 201):
                raise SystemExit(f"PUT {domain}: {status} {body!r}")
            wait_for(lambda: mx.encode() in policy(b, domain)[1], f"B serving {domain}", limit=30)
            lags.append(time.time() - t0)
        for k in range(min(5, args.samples)):
            domain = f"api{k}.bench.test"
            t0 = time.time()
            http_call(a["admin"], "DELETE", f"/v1/domains/{domain}", timeout=60)
            wait_for(lambda: policy(b, domain)[0] == 404, f"B refusing {domain}", limit=30)
            gone.append(time.time() - t0)

        def stats(name, xs):
            xs = sorted(x * 1000 for x in xs)
            rows.append((f"{name} min", "ms", xs[0]))
            rows.append((f"{name} median", "ms", statistics.median(xs)))
            rows.append((f"{name} max", "ms", xs[-1]))

        stats("put-on-a", puts)
        stats("put-a-served-by-b", lags)
        stats("delete-a-gone-on-b", gone)

        q = ("SELECT xact_commit + xact_rollback FROM pg_stat_database "
             "WHERE datname = 'mtasts'")
        time.sleep(2.0)
        before = int(psql(bindir, pg_port, q))
        time.sleep(args.idle)
        after = int(psql(bindir, pg_port, q))
        # The two psql calls are transactions too (one each).
        per_replica = max(0, after - before - 1) / args.idle / 2
        rows.append(("idle-queries/s per replica", "1/s", per_replica))
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(2)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(work, ignore_errors=True)
    print(f"| replicas on PostgreSQL, {n} domains each | unit | value |")
    print("|---|---|---:|")
    for name, unit, value in rows:
        print(f"| {name} | {unit} | {value:.2f} |" if isinstance(value, float)
              else f"| {name} | {unit} | {value} |")


if __name__ == "__main__":
    sys.exit(main())
