//! Real sending-side MTA-STS libraries against the delegation setup, in a
//! network namespace of their own (`unshare`: user, network and mount
//! namespaces, no root needed), where ports 53 and 443 are ours:
//!
//! - knotd serves the customer's zone (`customers.example`): the two
//!   CNAMEs into the provider and the MX;
//! - mtasts answers the delegation zone (`sts.provider.example`, also
//!   holding the policy host's address) and serves the policy on 443,
//!   onboarding the customer on demand at its first ClientHello;
//! - unbound, the recursive resolver of the namespace (its
//!   /etc/resolv.conf is bind-mounted), follows the CNAMEs between them;
//! - postfix-mta-sts-resolver (PyPI, Postfix's MTA-STS resolver) and
//!   mailauth (npm, used by Node.js MTAs) resolve `_mta-sts.<customer>`
//!   through the CNAME into mtasts' zone, fetch the policy and validate it;
//!   their ids must equal the id mtasts serves.
//!
//! Tools come from scripts/test.sh: MTASTS_STS_RESOLVER_PYTHON (a venv's
//! python with postfix-mta-sts-resolver) and MTASTS_MAILAUTH_DIR (a
//! node_modules holding mailauth). Under CI=true anything missing fails.

mod common;

use std::path::{Path, PathBuf};

const CUSTOMER: &str = "good.customers.example";

fn tool(var: &str, check: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    let found = std::env::var_os(var)
        .map(PathBuf::from)
        .filter(|p| check(p));
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{var} is not set to an installed tool and CI=true (scripts/test.sh sets it)"
        );
        eprintln!("SKIPPING: {var} not set (scripts/test.sh sets it)");
    }
    found
}

#[test]
fn sender_libraries_validate_a_delegated_customer_in_a_network_namespace() {
    let Some(python) = tool("MTASTS_STS_RESOLVER_PYTHON", |p| p.is_file()) else {
        return;
    };
    let Some(mailauth) = tool("MTASTS_MAILAUTH_DIR", |p| {
        p.join("node_modules/mailauth/lib/mta-sts.js").is_file()
    }) else {
        return;
    };
    let mut missing = Vec::new();
    let mut bin = |name: &str| {
        common::find_binary(name).unwrap_or_else(|| {
            missing.push(name.to_owned());
            PathBuf::new()
        })
    };
    let (knotd, unbound, unshare, node, curl) = (
        bin("knotd"),
        bin("unbound"),
        bin("unshare"),
        bin("node"),
        bin("curl"),
    );
    if !missing.is_empty() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "missing {missing:?} and CI=true"
        );
        eprintln!("SKIPPING: {missing:?} not installed");
        return;
    }

    let dir = tempfile::Builder::new()
        .prefix("senders")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let d = dir.path();
    let w = |name: &str, text: String| common::write(d, name, &text);
    std::fs::create_dir_all(d.join("knot/db")).expect("knot dir");
    std::fs::create_dir_all(d.join("domains.d")).expect("domains.d");
    w(
        "knot/customers.example.zone",
        "$ORIGIN customers.example.\n$TTL 60\n\
         @ SOA ns1 hostmaster 1 3600 600 86400 60\n@ NS ns1\nns1 A 127.0.0.1\n\
         good MX 10 a.mx.provider.example.\n\
         mta-sts.good CNAME mta-sts.sts.provider.example.\n\
         _mta-sts.good CNAME good.customers.example.sts.provider.example.\n"
            .to_owned(),
    );
    w(
        "knot/knot.conf",
        format!(
            "server:\n  rundir: \"{k}\"\n  listen: 127.0.0.1@5301\n\
             log:\n  - target: stderr\n    any: info\n\
             database:\n  storage: \"{k}/db\"\n\
             template:\n  - id: default\n    storage: \"{k}\"\n    zonefile-sync: -1\n    journal-content: none\n\
             zone:\n  - domain: customers.example\n",
            k = d.join("knot").display()
        ),
    );
    w(
        "unbound.conf",
        format!(
            "server:\n  interface: 127.0.0.1\n  port: 53\n  do-ip6: no\n  do-not-query-localhost: no\n\
             \x20 username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"\"\n\
             \x20 use-syslog: no\n  logfile: \"\"\n  module-config: \"iterator\"\n  verbosity: 1\n\
             \x20 domain-insecure: \"example\"\n\
             stub-zone:\n  name: \"customers.example\"\n  stub-addr: 127.0.0.1@5301\n\
             stub-zone:\n  name: \"sts.provider.example\"\n  stub-addr: 127.0.0.1@5302\n",
            d = d.display()
        ),
    );
    w("resolv.conf", "nameserver 127.0.0.1\n".to_owned());
    let config = w(
        "mtasts.toml",
        format!(
            "domains_dir = \"domains.d\"\n\
             [server]\nhttps = \"127.0.0.1:443\"\nhttp = \"127.0.0.1:80\"\nstate_dir = \"{d}/state\"\n\
             [delegation]\nzone = \"sts.provider.example\"\npolicy_host = \"mta-sts.sts.provider.example\"\n\
             host_a = [\"127.0.0.1\"]\ndns_listen = \"127.0.0.1:5302\"\nnameservers = [\"ns1.sts.provider.example\"]\n\
             [on_demand]\nenabled = true\nmode = \"enforce\"\nallowed_mx = [\"*.mx.provider.example\"]\n\
             resolver = \"127.0.0.1:53\"\n\
             [defaults]\nmax_age = \"1d\"\n",
            d = d.display()
        ),
    );
    w(
        "sts.py",
        "import asyncio, json, sys\n\
         from postfix_mta_sts_resolver.resolver import STSResolver\n\
         async def main():\n\
         \x20   r = STSResolver(loop=asyncio.get_running_loop(), timeout=10)\n\
         \x20   status, found = await r.resolve(sys.argv[1])\n\
         \x20   print(json.dumps({'status': status.name, 'id': found[0] if found else None,\n\
         \x20                     'policy': found[1] if found else None}))\n\
         asyncio.run(main())\n"
            .to_owned(),
    );
    w(
        "mailauth.js",
        "const { getPolicy, validateMx } = require('mailauth/lib/mta-sts');\n\
         (async () => {\n\
         \x20 const r = await getPolicy(process.argv[2], false, { strict: true });\n\
         \x20 const ok = validateMx('a.mx.provider.example', r.policy);\n\
         \x20 const bad = validateMx('mx.elsewhere.example', r.policy);\n\
         \x20 console.log(JSON.stringify({ status: r.status, id: r.policy.id, policy: r.policy, ok, bad, warnings: r.warnings || [] }));\n\
         })().catch(e => { console.log(JSON.stringify({ error: String(e) })); process.exit(1); });\n"
            .to_owned(),
    );
    let script = w(
        "run.sh",
        format!(
            r#"set -u
ip link set lo up
mount --bind {d}/resolv.conf /etc/resolv.conf
{knotd} -c {d}/knot/knot.conf 2>{d}/knot.log &
{unbound} -d -c {d}/unbound.conf 2>{d}/unbound.log &
{mtasts} serve --config {config} 2>{d}/mtasts.log &
ca={d}/state/ca/ca.pem
# First contact: the customer is onboarded at its first ClientHello.
for i in $(seq 1 100); do
  if {curl} -sf --cacert "$ca" -o {d}/served.txt https://mta-sts.{CUSTOMER}/.well-known/mta-sts.txt; then break; fi
  sleep 0.2
done
echo "served: $(tr -d '\r' < {d}/served.txt | tr '\n' ' ')"
echo "python: $(SSL_CERT_FILE=$ca {python} {d}/sts.py {CUSTOMER} 2>{d}/python.log)"
echo "node: $(cd {mailauth} && NODE_EXTRA_CA_CERTS=$ca NODE_PATH={mailauth}/node_modules {node} {d}/mailauth.js {CUSTOMER} 2>{d}/node.log)"
kill $(jobs -p) 2>/dev/null
wait
"#,
            d = d.display(),
            knotd = knotd.display(),
            unbound = unbound.display(),
            mtasts = common::bin().display(),
            config = config.display(),
            curl = curl.display(),
            python = python.display(),
            node = node.display(),
            mailauth = mailauth.display(),
        ),
    );
    let out = std::process::Command::new(unshare)
        .args(["--user", "--map-root-user", "--net", "--mount", "bash"])
        .arg(&script)
        .output()
        .expect("run unshare");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let logs = || {
        [
            "mtasts.log",
            "unbound.log",
            "knot.log",
            "python.log",
            "node.log",
        ]
        .iter()
        .map(|f| {
            format!(
                "--- {f}:\n{}",
                std::fs::read_to_string(d.join(f)).unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
    };
    let line = |prefix: &str| -> String {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_default()
            .to_owned()
    };
    let served = std::fs::read(d.join("served.txt")).unwrap_or_default();
    assert!(
        served.starts_with(b"version: STSv1\r\nmode: enforce\r\n"),
        "policy not served after onboarding:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    let id = common::policy_id(&served);

    let python: serde_json::Value = serde_json::from_str(&line("python: "))
        .unwrap_or_else(|e| panic!("python output ({e}):\n{stdout}\n{}", logs()));
    assert_eq!(python["status"], "VALID", "{python}\n{}", logs());
    assert_eq!(python["id"], id, "{python}");
    assert_eq!(python["policy"]["mode"], "enforce", "{python}");
    assert_eq!(
        python["policy"]["mx"],
        serde_json::json!(["*.mx.provider.example"]),
        "{python}"
    );
    assert_eq!(python["policy"]["max_age"], 86400, "{python}");

    let node: serde_json::Value = serde_json::from_str(&line("node: "))
        .unwrap_or_else(|e| panic!("node output ({e}):\n{stdout}\n{}", logs()));
    assert_eq!(node["status"], "found", "{node}\n{}", logs());
    assert_eq!(node["id"], id, "{node}");
    assert_eq!(node["policy"]["mode"], "enforce", "{node}");
    assert_eq!(node["ok"]["valid"], true, "{node}");
    assert_eq!(node["bad"]["valid"], false, "{node}");
    assert_eq!(node["warnings"], serde_json::json!([]), "{node}");
    let mtasts_log = std::fs::read_to_string(d.join("mtasts.log")).unwrap_or_default();
    assert!(
        mtasts_log.contains("on-demand: onboarded") && mtasts_log.contains("via=\"sni\"")
            || mtasts_log.contains("via=sni"),
        "{mtasts_log}"
    );
}
