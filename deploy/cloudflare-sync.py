#!/usr/bin/env python3
"""Make Cloudflare DNS hold exactly the records `mtasts records --format
cloudflare` prints, replacing the ones mtasts published before.

    mtasts records -c mtasts.toml --format cloudflare [DOMAIN...] \\
      | CLOUDFLARE_API_TOKEN=... python3 cloudflare-sync.py [--dry-run]

Posting the `posts` bodies again after an id change would leave two
`v=STSv1` TXT records at `_mta-sts`, and senders then apply no policy at
all (RFC 8461 §3.1). This script reads each zone's records, and sends one
`POST /zones/{zone_id}/dns_records/batch` per zone that deletes, overwrites
(PUT, keeping the record id) and creates records so that, per owner name,
the records mtasts manages are exactly the wanted ones. Cloudflare runs a
batch in one database transaction, deletes before puts before posts.

Managed at a name mtasts publishes: TXT records starting with `v=STSv1`
(where it publishes one) or `v=TLSRPTv1` (likewise), and A/AAAA/CNAME
records where it publishes a host record or a CNAME. Anything else at those
names (a verification token, an SPF record) is left alone.

Environment: CLOUDFLARE_API_TOKEN (required), CLOUDFLARE_API_BASE (default
https://api.cloudflare.com/client/v4). `--zone-id NAME=ID` skips the zone
lookup. Python 3 standard library only.
"""

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_BASE = "https://api.cloudflare.com/client/v4"
TIMEOUT = 30  # seconds per request
MAX_RESPONSE = 64 * 1024 * 1024  # bytes read from one response
PER_PAGE = 1000
# Operations per batch: Cloudflare's smallest plan limit.
MAX_BATCH = 200
HOST_TYPES = ("A", "AAAA", "CNAME")


class ApiError(Exception):
    pass


class Api:
    def __init__(self, base, token):
        self.base = base.rstrip("/")
        self.token = token

    def call(self, method, path, query=None, body=None):
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", "Bearer " + self.token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
                raw = resp.read(MAX_RESPONSE + 1)
        except urllib.error.HTTPError as e:
            detail = e.read(64 * 1024).decode("utf-8", "replace")
            raise ApiError(f"{method} {path}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ApiError(f"{method} {path}: {e}") from None
        if len(raw) > MAX_RESPONSE:
            raise ApiError(f"{method} {path}: response over {MAX_RESPONSE} bytes")
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise ApiError(f"{method} {path}: not JSON: {e}") from None
        if not doc.get("success"):
            raise ApiError(f"{method} {path}: {json.dumps(doc.get('errors'))}")
        return doc

    def zone_id(self, name):
        found = self.call("GET", "/zones", {"name": name})["result"]
        if len(found) != 1:
            raise ApiError(f"zone {name}: {len(found)} zones of that name visible to the token")
        return found[0]["id"]

    def records(self, zone_id):
        out, page = [], 1
        while True:
            doc = self.call(
                "GET",
                f"/zones/{zone_id}/dns_records",
                {"page": page, "per_page": PER_PAGE},
            )
            out.extend(doc["result"])
            info = doc.get("result_info") or {}
            if page >= int(info.get("total_pages") or 1):
                return out
            page += 1


def txt_text(content):
    """TXT content as one string: quoted strings ("a" "b") joined, unescaped."""
    s = content.strip()
    if not s.startswith('"'):
        return s
    out, i, inside = [], 0, False
    while i < len(s):
        c = s[i]
        if c == '"':
            inside = not inside
        elif inside and c == "\\" and i + 1 < len(s):
            nxt = s[i + 1 : i + 4]
            if nxt.isdigit() and len(nxt) == 3:
                out.append(chr(int(nxt)))
                i += 3
            else:
                out.append(s[i + 1])
                i += 1
        elif inside:
            out.append(c)
        i += 1
    return "".join(out)


def key(rec):
    """What makes two records the same data: type and normalised content."""
    content = rec["content"]
    if rec["type"] == "TXT":
        content = txt_text(content)
    elif rec["type"] == "CNAME":
        content = content.rstrip(".").lower()
    return (rec["type"], content)


def managed(existing, wanted_at_name):
    """Whether `existing` is a record mtasts manages at a name where it
    publishes `wanted_at_name`."""
    t = existing["type"]
    types = {w["type"] for w in wanted_at_name}
    texts = [txt_text(w["content"]) for w in wanted_at_name if w["type"] == "TXT"]
    if t == "TXT":
        text = txt_text(existing["content"])
        for prefix in ("v=STSv1", "v=TLSRPTv1"):
            if text.startswith(prefix) and (
                any(x.startswith(prefix) for x in texts) or "CNAME" in types
            ):
                return True
        return False
    if t in HOST_TYPES:
        # A CNAME may replace a TXT (delegation) or host records, and the
        # reverse; host records are one set.
        return bool(types & set(HOST_TYPES)) or (t == "CNAME" and "TXT" in types)
    return False


def body(rec):
    return {k: rec[k] for k in ("type", "name", "content", "ttl", "comment")}


def plan_name(wanted, existing):
    """Operations for one owner name: (deletes, puts, posts, kept)."""
    mine = [e for e in existing if managed(e, wanted)]
    deletes, puts, posts, kept = [], [], [], []
    left = list(mine)
    unmatched = []
    for w in wanted:
        same = next((e for e in left if key(e) == key(w)), None)
        if same is None:
            unmatched.append(w)
            continue
        left.remove(same)
        if same.get("ttl") != w["ttl"] or same.get("comment") != w["comment"]:
            puts.append(dict(body(w), id=same["id"]))
        else:
            kept.append(w)
    for w in unmatched:
        # Overwrite an old record of the same type in place (its id stays),
        # else create one.
        old = next((e for e in left if e["type"] == w["type"]), None)
        if old is not None:
            left.remove(old)
            puts.append(dict(body(w), id=old["id"]))
        else:
            posts.append(body(w))
    deletes = [{"id": e["id"]} for e in left]
    return deletes, puts, posts, kept, left


def describe(op, rec):
    return f"  {op} {rec['type']} {rec['name']} {rec['content']}"


def sync_zone(api, zone, wanted, zone_id, dry_run):
    existing = api.records(zone_id)
    by_name = {}
    for w in wanted:
        by_name.setdefault(w["name"].lower(), []).append(w)
    batches, current = [], {"deletes": [], "puts": [], "posts": []}
    lines = []
    for name, want in by_name.items():
        here = [e for e in existing if e["name"].lower() == name]
        deletes, puts, posts, kept, gone = plan_name(want, here)
        lines += [describe("delete", e) for e in gone]
        lines += [describe("replace", p) for p in puts]
        lines += [describe("create", p) for p in posts]
        lines += [describe("unchanged", k) for k in kept]
        size = len(deletes) + len(puts) + len(posts)
        used = sum(len(v) for v in current.values())
        # One name's operations stay in one batch (one transaction).
        if used and used + size > MAX_BATCH:
            batches.append(current)
            current = {"deletes": [], "puts": [], "posts": []}
        current["deletes"] += deletes
        current["puts"] += puts
        current["posts"] += posts
    batches.append(current)
    batches = [{k: v for k, v in b.items() if v} for b in batches]
    batches = [b for b in batches if b]
    print(f"{zone} (zone id {zone_id}): {len(batches)} batch(es){' (dry run)' if dry_run else ''}")
    for line in lines:
        print(line)
    if not dry_run:
        for b in batches:
            api.call("POST", f"/zones/{zone_id}/dns_records/batch", body=b)
    return len(batches)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    ap.add_argument("--zone-id", action="append", default=[], metavar="NAME=ID")
    ap.add_argument("input", nargs="?", help="mtasts records output (default: stdin)")
    args = ap.parse_args()
    token = os.environ.get("CLOUDFLARE_API_TOKEN")
    if not token:
        print("error: CLOUDFLARE_API_TOKEN is not set", file=sys.stderr)
        return 2
    api = Api(os.environ.get("CLOUDFLARE_API_BASE", DEFAULT_BASE), token)
    ids = {}
    for z in args.zone_id:
        name, sep, zid = z.partition("=")
        if not sep or not zid:
            print(f"error: --zone-id {z!r}: expected NAME=ID", file=sys.stderr)
            return 2
        ids[name.rstrip(".").lower()] = zid
    try:
        if args.input:
            with open(args.input, encoding="utf-8") as f:
                doc = json.load(f)
        else:
            doc = json.load(sys.stdin)
    except (OSError, ValueError) as e:
        print(f"error: reading the mtasts records output: {e}", file=sys.stderr)
        return 2
    failed = 0
    for zone, batch in doc.items():
        try:
            zid = ids.get(zone.lower()) or api.zone_id(zone)
            sync_zone(api, zone, batch.get("posts", []), zid, args.dry_run)
        except ApiError as e:
            print(f"error: {zone}: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
