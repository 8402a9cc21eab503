#!/usr/bin/env python3
"""Queries per second of mtasts' authoritative DNS for the delegation zone
([delegation] dns_listen) beside knot serving the same zone, with dnsperf
(Debian packages dnsperf, knot), and the memory the DNS listener adds.

    python3 bench/dns.py --customers 100000 --seconds 10

Both servers run on loopback in the same run. The zone knot serves is
exactly `mtasts records --for provider --format bind` plus an SOA and NS.
Queries: every customer's TXT at <customer>.<zone>, in random order, plus
10% names that do not exist (NXDOMAIN with the SOA).
"""

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

from common import free_port, rss_mb, write_domain_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MTASTS = os.path.join(ROOT, "target/release/mtasts")
ZONE = "sts.provider.example"



def write_config(work, n, dns_port):
    https, http = free_port(), free_port()
    dd = os.path.join(work, "domains.d")
    os.makedirs(dd)
    listen = f'dns_listen = "127.0.0.1:{dns_port}"\n' if dns_port else ""
    with open(os.path.join(work, "mtasts.toml"), "w") as f:
        f.write(f"""domains_dir = "domains.d"
[server]
https = "127.0.0.1:{https}"
http = "127.0.0.1:{http}"
state_dir = "state"
[delegation]
zone = "{ZONE}"
policy_host = "mta-sts.provider.example"
{listen}nameservers = ["ns1.provider.example"]
# One client address sends everything here: no rate limit in the bench.
dns_rate_limit = 0
[defaults]
mode = "enforce"
max_age = "1w"
mx = ["mx1.provider.example", "*.mx.provider.example"]
""")
    write_domain_files(dd, n, "c")
    return https, http


def wait_dns(port, name, limit=120):
    t0 = time.time()
    while time.time() - t0 < limit:
        out = subprocess.run(["kdig", "@127.0.0.1", "-p", str(port), "+norec", "+timeout=1",
                              "+retry=0", name, "TXT"], capture_output=True, text=True).stdout
        if "status: NOERROR" in out and "v=STSv1" in out:
            return time.time() - t0
        time.sleep(0.2)
    raise SystemExit(f"DNS on {port} never answered {name}")


def dnsperf(port, queries, seconds):
    out = subprocess.run(["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", queries,
                          "-l", str(seconds), "-c", "10", "-Q", "200000", "-q", "200"],
                         capture_output=True, text=True).stdout
    qps = re.search(r"Queries per second:\s+([\d.]+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    return (float(qps.group(1)) if qps else float("nan"),
            int(lost.group(1)) if lost else -1, out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--mtasts", default=MTASTS)
    args = ap.parse_args()
    n = args.customers
    work = tempfile.mkdtemp(prefix="mtasts-dns-")
    procs = []
    rows = []
    try:
        # Memory without and with the DNS listener (after answering once
        # for every name, so the zone is built).
        base = os.path.join(work, "base")
        os.makedirs(base)
        bh, bp = write_config(base, n, None)
        dns_port = free_port()
        with_dns = os.path.join(work, "dns")
        os.makedirs(with_dns)
        write_config(with_dns, n, dns_port)
        time.sleep(2.5)
        p0 = subprocess.Popen([args.mtasts, "serve", "--config", "mtasts.toml"], cwd=base,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p0)
        p1 = subprocess.Popen([args.mtasts, "serve", "--config", "mtasts.toml"], cwd=with_dns,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p1)
        wait_dns(dns_port, f"c{n - 1}.bench.test.{ZONE}")
        # The zone text for knot, from the same config.
        zone_text = subprocess.run([args.mtasts, "records", "--config", "mtasts.toml", "--for",
                                    "provider", "--format", "bind"], cwd=with_dns,
                                   capture_output=True, text=True, check=True).stdout
        kd = os.path.join(work, "knot")
        os.makedirs(os.path.join(kd, "db"))
        with open(os.path.join(kd, f"{ZONE}.zone"), "w") as f:
            f.write(f"$ORIGIN {ZONE}.\n$TTL 3600\n@ SOA ns1.provider.example. hostmaster.{ZONE}. 1 3600 600 1209600 300\n"
                    f"@ NS ns1.provider.example.\n")
            for line in zone_text.splitlines():
                if line.strip() and not line.startswith(";") and f".{ZONE}." in line:
                    f.write(line + "\n")
        knot_port = free_port()
        with open(os.path.join(kd, "knot.conf"), "w") as f:
            f.write(f"server:\n  rundir: \"{kd}\"\n  listen: 127.0.0.1@{knot_port}\n  udp-workers: 2\n"
                    f"log:\n  - target: stderr\n    any: error\n"
                    f"database:\n  storage: \"{kd}/db\"\n"
                    f"template:\n  - id: default\n    storage: \"{kd}\"\n    file: \"%s.zone\"\n"
                    f"    zonefile-sync: -1\n    journal-content: none\n"
                    f"zone:\n  - domain: {ZONE}\n")
        knotd = shutil.which("knotd") or "/usr/sbin/knotd"
        pk = subprocess.Popen([knotd, "-c", os.path.join(kd, "knot.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(pk)
        wait_dns(knot_port, f"c{n - 1}.bench.test.{ZONE}")
        # Queries: every customer once in random order, 10% unknown names.
        names = [f"c{i}.bench.test.{ZONE} TXT" for i in range(n)]
        names += [f"missing{i}.bench.test.{ZONE} TXT" for i in range(n // 10)]
        random.seed(1)
        random.shuffle(names)
        qfile = os.path.join(work, "queries.txt")
        with open(qfile, "w") as f:
            f.write("\n".join(names) + "\n")
        # Touch every name once so the zone is built before measuring.
        time.sleep(1.0)
        rss_base = rss_mb(p0.pid)
        rss_dns_before = rss_mb(p1.pid)
        m_qps, m_lost, m_out = dnsperf(dns_port, qfile, args.seconds)
        k_qps, k_lost, k_out = dnsperf(knot_port, qfile, args.seconds)
        rss_dns_after = rss_mb(p1.pid)
        rows.append(("mtasts queries/s", f"{m_qps:,.0f}", f"lost {m_lost}"))
        rows.append(("knot queries/s (same zone, 2 UDP workers)", f"{k_qps:,.0f}", f"lost {k_lost}"))
        rows.append(("ratio mtasts/knot", f"{m_qps / k_qps:.2f}x" if k_qps else "-", ""))
        rows.append(("RSS without dns_listen", f"{rss_base:.0f} MB", ""))
        rows.append(("RSS with dns_listen, after the run", f"{rss_dns_after:.0f} MB",
                     f"before the run {rss_dns_before:.0f} MB"))
        rows.append(("RSS knot", f"{rss_mb(pk.pid):.0f} MB", ""))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(work, ignore_errors=True)
    print(f"| DNS for the delegation zone, {n} customers, dnsperf {args.seconds} s, 2 cores | value | note |")
    print("|---|---:|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    sys.exit(main())
