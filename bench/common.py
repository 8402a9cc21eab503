"""Helpers shared by the benchmark scripts (run as `python3 bench/X.py`,
so this directory is on the import path)."""

import os
import socket


def free_port():
    """A loopback TCP port free at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid):
    """Resident memory of one process, in MB (NaN once it is gone)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_domain_files(dd, n, prefix, per=1000):
    """`n` domains `<prefix><i>.bench.test`, `per` to a file, in `dd`."""
    for j in range((n + per - 1) // per):
        with open(os.path.join(dd, f"part{j:04}.toml"), "w") as f:
            f.write("".join(f'[[domain]]\nname = "{prefix}{i}.bench.test"\n'
                            for i in range(j * per, min(n, (j + 1) * per))))
