//! `[delegation] dns_listen`: mtasts answers the delegation zone itself.
//! Checked with `kdig` (Debian's knot-dnsutils) against the running server:
//! SOA and NS with the AA bit, each customer's TXT equal to what `records
//! --for provider` prints and what is served, NXDOMAIN and NODATA with the
//! SOA, REFUSED outside the zone, TC over UDP then the full answer over
//! TCP, and a new id and serial after a reload.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::ServeProc;

/// The transfer key of the secondary test (32 random bytes, base64).
const XFR_SECRET: &str = "q83vEjRWeJq8AQIDBAUGBwgJCgsMDQ4PEBESExQVFhc=";

fn flags(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(";; Flags: "))
        .map(|l| l.split(';').next().unwrap_or("").trim().to_owned())
        .unwrap_or_default()
}

/// Records of `rtype` in the answer or authority sections.
fn records(out: &str, rtype: &str) -> Vec<String> {
    out.lines()
        .filter(|l| !l.starts_with(';'))
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let at = fields.iter().position(|f| *f == rtype)?;
            (at >= 2 && fields.get(at - 1) == Some(&"IN")).then(|| fields[at + 1..].join(" "))
        })
        .collect()
}

/// A server config in `dir` answering the delegation zone on `dns`, with
/// `extra` lines in `[delegation]`; returns it and its https and http
/// listeners.
struct Setup {
    config: std::path::PathBuf,
    https: SocketAddr,
    http: SocketAddr,
}

fn config(dir: &Path, dns: SocketAddr, nameservers: &[String], extra: &str) -> Setup {
    let (https, http) = (common::loopback(), common::loopback());
    let ns: Vec<String> = nameservers.iter().map(|n| format!("\"{n}\"")).collect();
    let mut text = common::server_section(https, http, &dir.join("state"));
    text.push_str(&format!(
        "behind_proxy = true\n[delegation]\nzone = \"sts.provider.example\"\npolicy_host = \"mta-sts.provider.example\"\ndns_listen = \"{dns}\"\nnameservers = [{}]\n{extra}[defaults]\nmode = \"testing\"\nmx = [\"mx.provider.example\"]\n[[domain]]\nname = \"customer-a.example\"\n[[domain]]\nname = \"customer-b.example\"\n",
        ns.join(", ")
    ));
    Setup {
        config: common::write(dir, "mtasts.toml", &text),
        https,
        http,
    }
}

#[test]
fn the_delegation_zone_is_answered_from_what_is_served() {
    if common::find_binary("kdig").is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "kdig is missing and CI=true"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let dns = common::loopback();
    // Enough long nameserver names that the NS answer exceeds 512 bytes.
    let nameservers: Vec<String> = (0..20)
        .map(|i| format!("ns{i}-{}.provider{i}.example", "x".repeat(40)))
        .collect();
    let Setup {
        config: cfg,
        https,
        http,
    } = config(dir.path(), dns, &nameservers, "");
    // A customer whose name is too long to keep every label below the
    // zone: its TXT lives at the hashed name `records` prints.
    let long_customer = format!(
        "{}.{}.{}.{}.example",
        "a".repeat(60),
        "b".repeat(60),
        "c".repeat(60),
        "d".repeat(54)
    );
    let mut text = std::fs::read_to_string(&cfg).expect("config");
    text.push_str(&format!("[[domain]]\nname = \"{long_customer}\"\n"));
    std::fs::write(&cfg, text).expect("config");
    let serve = ServeProc::start(&cfg, https, http);
    common::wait_for("the DNS listener", || {
        common::dns_status(&common::kdig(dns, &["sts.provider.example", "SOA"])) == "NOERROR"
    });

    // SOA and NS at the apex, authoritative.
    let soa = common::kdig(dns, &["+edns", "sts.provider.example", "SOA"]);
    assert!(flags(&soa).split_whitespace().any(|f| f == "aa"), "{soa}");
    assert!(!flags(&soa).split_whitespace().any(|f| f == "ra"), "{soa}");
    let serial1: u64 = records(&soa, "SOA")[0]
        .split_whitespace()
        .nth(2)
        .expect("serial")
        .parse()
        .expect("number");
    let ns = common::kdig(dns, &["+tcp", "sts.provider.example", "NS"]);
    assert_eq!(records(&ns, "NS").len(), 20, "{ns}");

    // Each customer's TXT is the id served and the one `records` prints.
    let printed = common::mtasts(&[
        "records",
        "--config",
        cfg.to_str().expect("utf-8"),
        "--for",
        "provider",
        "--format",
        "json",
    ]);
    let printed: serde_json::Value = serde_json::from_slice(&printed.stdout).expect("records JSON");
    for customer in ["customer-a.example", "customer-b.example"] {
        let owner = format!("{customer}.sts.provider.example");
        let txt = common::kdig(dns, &[&owner, "TXT"]);
        assert_eq!(common::dns_status(&txt), "NOERROR", "{txt}");
        let answered = records(&txt, "TXT");
        let id = common::policy_id(&common::served_body(http.port(), customer).expect("served"));
        assert_eq!(answered, [format!("\"v=STSv1; id={id};\"")], "{txt}");
        let want = printed
            .as_array()
            .expect("records")
            .iter()
            .find(|r| r["name"] == format!("{owner}.") && r["type"] == "TXT")
            .expect("printed TXT");
        assert_eq!(
            format!("\"{}\"", want["value"].as_str().expect("value")),
            answered[0]
        );
    }

    let hashed = printed
        .as_array()
        .expect("records")
        .iter()
        .find(|r| r["domain"] == long_customer.as_str() && r["type"] == "TXT")
        .expect("the long customer's TXT");
    let hashed_name = hashed["name"].as_str().expect("name");
    assert!(hashed_name.starts_with("h-"), "{hashed}");
    let txt = common::kdig(dns, &[hashed_name, "TXT"]);
    let id = common::policy_id(&common::served_body(http.port(), &long_customer).expect("served"));
    assert_eq!(
        records(&txt, "TXT"),
        [format!("\"v=STSv1; id={id};\"")],
        "{txt}"
    );

    // Names that do not exist, and types a name does not have: the SOA
    // for negative caching.
    let nx = common::kdig(dns, &["unknown.example.sts.provider.example", "TXT"]);
    assert_eq!(common::dns_status(&nx), "NXDOMAIN", "{nx}");
    assert_eq!(records(&nx, "SOA").len(), 1, "{nx}");
    let nodata = common::kdig(dns, &["customer-a.example.sts.provider.example", "A"]);
    assert_eq!(common::dns_status(&nodata), "NOERROR", "{nodata}");
    assert!(records(&nodata, "A").is_empty());
    assert_eq!(records(&nodata, "SOA").len(), 1, "{nodata}");
    // Outside the zone: refused, no recursion.
    let outside = common::kdig(dns, &["example.com", "A"]);
    assert_eq!(common::dns_status(&outside), "REFUSED", "{outside}");

    // A big answer over UDP without EDNS is truncated; TCP gets it whole.
    let udp = common::kdig(
        dns,
        &["+notcp", "+noedns", "+ignore", "sts.provider.example", "NS"],
    );
    assert!(flags(&udp).split_whitespace().any(|f| f == "tc"), "{udp}");
    assert!(records(&udp, "NS").is_empty(), "{udp}");

    // A policy change: new id and a higher serial.
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .expect("read")
            .replace("mx.provider.example", "mx2.provider.example"),
    )
    .expect("write");
    serve.signal("HUP");
    common::wait_for("the new policy served", || {
        common::served_body(http.port(), "customer-a.example")
            .is_some_and(|b| String::from_utf8_lossy(&b).contains("mx2.provider.example"))
    });
    let id =
        common::policy_id(&common::served_body(http.port(), "customer-a.example").expect("served"));
    let txt = common::kdig(dns, &["customer-a.example.sts.provider.example", "TXT"]);
    assert_eq!(
        records(&txt, "TXT"),
        [format!("\"v=STSv1; id={id};\"")],
        "{txt}"
    );
    let soa = common::kdig(dns, &["sts.provider.example", "SOA"]);
    let serial2: u64 = records(&soa, "SOA")[0]
        .split_whitespace()
        .nth(2)
        .expect("serial")
        .parse()
        .expect("number");
    assert!(serial2 > serial1, "{serial1} -> {serial2}");
}

/// A knot secondary of the delegation zone: it transfers the zone from
/// mtasts (AXFR, `allow_transfer`, TSIG-signed with
/// `[delegation.transfer_tsig]`, over several messages each signed), and
/// after a policy change the NOTIFY mtasts sends brings the new id to it.
/// A client not allowed, an unsigned request and one signed with another
/// key are refused.
#[test]
fn knot_as_secondary_transfers_the_zone_and_follows_notify() {
    let Some(knotd) = common::knot::knotd() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let dns = common::loopback();
    let knot_port = common::free_port();
    let Setup {
        config: cfg,
        https,
        http,
    } = config(
        dir.path(),
        dns,
        &["ns1.provider.example".to_owned()],
        &format!(
            "allow_transfer = [\"127.0.0.1\"]\nnotify = [\"127.0.0.1:{knot_port}\"]\n\
             [delegation.transfer_tsig]\nkey_name = \"xfr-key\"\nsecret = \"{XFR_SECRET}\"\n"
        ),
    );
    // Enough customers that the transfer takes several messages.
    let mut text = std::fs::read_to_string(&cfg).expect("config");
    for i in 0..400 {
        text.push_str(&format!("[[domain]]\nname = \"c{i}.example\"\n"));
    }
    std::fs::write(&cfg, &text).expect("config");
    let serve = ServeProc::start(&cfg, https, http);
    common::wait_for("the DNS listener", || {
        common::dns_status(&common::kdig(dns, &["sts.provider.example", "SOA"])) == "NOERROR"
    });
    // Not in allow_transfer (another loopback source address): refused.
    let refused = common::kdig(dns, &["-b", "127.0.0.2", "sts.provider.example", "AXFR"]);
    assert!(
        refused.contains("replied with error 'REFUSED'"),
        "{refused}"
    );
    assert!(records(&refused, "TXT").is_empty(), "{refused}");
    // Allowed address, but unsigned, or signed with another key: refused.
    let unsigned = common::kdig(dns, &["-b", "127.0.0.1", "sts.provider.example", "AXFR"]);
    assert!(unsigned.contains("REFUSED"), "{unsigned}");
    assert!(records(&unsigned, "TXT").is_empty(), "{unsigned}");
    let other_key = "hmac-sha256:xfr-key:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let wrong = common::kdig(
        dns,
        &[
            "-b",
            "127.0.0.1",
            "-y",
            other_key,
            "sts.provider.example",
            "AXFR",
        ],
    );
    assert!(records(&wrong, "TXT").is_empty(), "{wrong}");
    assert!(
        wrong.contains("NOTAUTH") || wrong.contains("BADSIG"),
        "{wrong}"
    );
    // Signed with the key from an allowed address: every customer's TXT
    // between two SOAs, each message's TSIG verified by kdig.
    let key = format!("hmac-sha256:xfr-key:{XFR_SECRET}");
    let axfr = common::kdig(
        dns,
        &[
            "-b",
            "127.0.0.1",
            "-y",
            &key,
            "sts.provider.example",
            "AXFR",
        ],
    );
    assert_eq!(records(&axfr, "SOA").len(), 2, "{axfr}");
    assert_eq!(records(&axfr, "TXT").len(), 402, "{axfr}");
    assert!(
        axfr.contains(";; Received") && !axfr.contains("WARNING"),
        "{axfr}"
    );

    let kd = tempfile::Builder::new()
        .prefix("knot2")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let d = kd.path().display().to_string();
    std::fs::create_dir_all(kd.path().join("db")).expect("db");
    let conf = format!(
        "server:\n  rundir: \"{d}\"\n  listen: 127.0.0.1@{knot_port}\n\
         log:\n  - target: stderr\n    any: info\n\
         database:\n  storage: \"{d}/db\"\n\
         key:\n  - id: xfr-key\n    algorithm: hmac-sha256\n    secret: {XFR_SECRET}\n\
         remote:\n  - id: primary\n    address: 127.0.0.1@{}\n    key: xfr-key\n\
         acl:\n  - id: notify-from-primary\n    address: 127.0.0.1\n    action: notify\n\
         template:\n  - id: default\n    storage: \"{d}\"\n    zonefile-sync: -1\n    journal-content: none\n\
         zone:\n  - domain: sts.provider.example\n    master: primary\n    acl: notify-from-primary\n",
        dns.port()
    );
    std::fs::write(kd.path().join("knot.conf"), conf).expect("conf");
    let log = std::fs::File::create(kd.path().join("knotd.log")).expect("log");
    let mut knot = std::process::Command::new(knotd)
        .arg("-c")
        .arg(kd.path().join("knot.conf"))
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("knotd");
    let secondary = SocketAddr::from(([127, 0, 0, 1], knot_port));
    let knot_log = || std::fs::read_to_string(kd.path().join("knotd.log")).unwrap_or_default();
    let served = |customer: &str| {
        common::policy_id(&common::served_body(http.port(), customer).expect("served"))
    };
    let first = served("customer-a.example");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let txt = common::kdig(
            secondary,
            &["customer-a.example.sts.provider.example", "TXT"],
        );
        if records(&txt, "TXT") == [format!("\"v=STSv1; id={first};\"")] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no transfer:\n{}\n{}",
            knot_log(),
            serve.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // A policy change: mtasts NOTIFYs, knot transfers again.
    std::fs::write(
        &cfg,
        text.replace("mx.provider.example", "mx2.provider.example"),
    )
    .expect("write");
    serve.signal("HUP");
    common::wait_for("the new policy served", || {
        served("customer-a.example") != first
    });
    let second = served("customer-a.example");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let txt = common::kdig(
            secondary,
            &["customer-a.example.sts.provider.example", "TXT"],
        );
        if records(&txt, "TXT") == [format!("\"v=STSv1; id={second};\"")] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "NOTIFY did not bring the new id:\n{}\n{}",
            knot_log(),
            serve.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        serve.log().contains("NOTIFY acknowledged"),
        "{}",
        serve.log()
    );
    let _ = knot.kill();
    let _ = knot.wait();
}

/// Beyond `dns_rate_limit` answers per second to one client network, UDP
/// answers stop carrying data: every second query gets an empty truncated
/// answer (retry over TCP), the others none. TCP is not limited.
#[test]
fn udp_answers_are_rate_limited_per_client_network() {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let dir = tempfile::tempdir().expect("tempdir");
    let dns = common::loopback();
    let setup = config(
        dir.path(),
        dns,
        &["ns1.provider.example".to_owned()],
        "dns_rate_limit = 5\n",
    );
    let _serve = ServeProc::start(&setup.config, setup.https, setup.http);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .expect("timeout");
    // Wait for the listener (these answers count towards the limit, so
    // let the second pass).
    common::wait_for("the DNS listener", || {
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("sts.provider.example.").expect("name"),
            RecordType::SOA,
        ));
        socket.send_to(&q.to_vec().expect("wire"), dns).is_ok() && {
            let mut buf = [0u8; 1500];
            socket.recv_from(&mut buf).is_ok()
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (mut full, mut truncated) = (0, 0);
    for i in 0..40u16 {
        let mut q = Message::query();
        q.metadata.id = i;
        q.add_query(Query::query(
            Name::from_ascii("customer-a.example.sts.provider.example.").expect("name"),
            RecordType::TXT,
        ));
        socket
            .send_to(&q.to_vec().expect("wire"), dns)
            .expect("send");
    }
    let mut buf = [0u8; 1500];
    while let Ok((n, _)) = socket.recv_from(&mut buf) {
        let m = Message::from_vec(&buf[..n]).expect("answer");
        if m.metadata.truncation {
            assert!(m.answers.is_empty());
            truncated += 1;
        } else if !m.answers.is_empty() {
            full += 1;
        }
    }
    assert!(full <= 5, "{full} full answers over the limit of 5");
    assert!(full >= 1, "some answers within the limit");
    assert!(truncated >= 10, "{truncated} truncated answers");
    assert!(full + truncated < 40, "some queries get no answer");
    // TCP still answers in full.
    let tcp = common::kdig(
        dns,
        &["+tcp", "customer-a.example.sts.provider.example", "TXT"],
    );
    assert_eq!(records(&tcp, "TXT").len(), 1, "{tcp}");
}
