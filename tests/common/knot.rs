//! A real knotd (Debian package `knot`) on a free loopback port, with one
//! zone that takes TSIG-signed RFC 2136 updates, in a short temp dir (the
//! control socket path must fit in `sun_path`). Killed on drop.
//!
//! If knotd is missing, [`Knot::start`] returns `None` after a loud message
//! so the test can skip — except under `CI=true`, where it panics: CI must
//! install it (scripts/test.sh does).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};

/// The TSIG key knotd accepts updates with.
pub const KEY_NAME: &str = "mtasts-key";

pub struct Knot {
    child: Child,
    dir: tempfile::TempDir,
    pub addr: SocketAddr,
    /// Base64 HMAC-SHA256 secret, fresh per server.
    pub secret: String,
}

/// knotd's path, or `None` (after saying so) when tests may skip.
pub fn knotd() -> Option<PathBuf> {
    match super::find_binary("knotd") {
        Some(p) => Some(p),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!(
                "knotd is not installed but CI=true: install Debian package `knot` (scripts/test.sh does)"
            )
        }
        None => {
            eprintln!(
                "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                 SKIPPING: knotd not found (apt-get install knot). This test did not run.\n\
                 !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
            );
            None
        }
    }
}

fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("/dev/urandom");
    data_encoding::BASE64.encode(&bytes)
}

impl Knot {
    /// A TSIG signer with this server's key (HMAC-SHA256, 300 s fudge) and
    /// the current time to sign at, for UPDATEs the test sends itself.
    pub fn signer(&self) -> (hickory_proto::rr::TSigner, u64) {
        let secret = data_encoding::BASE64
            .decode(self.secret.as_bytes())
            .expect("base64");
        let signer = hickory_proto::rr::TSigner::new(
            secret,
            hickory_proto::rr::rdata::tsig::TsigAlgorithm::HmacSha256,
            Name::from_ascii(KEY_NAME).expect("key"),
            300,
        )
        .expect("signer");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        (signer, now)
    }

    /// Starts knotd serving `zone`, whose file holds an SOA, an NS and the
    /// `extra` lines (names relative to the zone). `None`: knotd is missing.
    pub fn start(zone: &str, extra: &str) -> Option<Knot> {
        let knotd = knotd()?;
        let mut last = String::new();
        // A port picked as free may be taken before knotd binds it: retry.
        for _ in 0..3 {
            match Self::try_start(&knotd, zone, extra) {
                Ok(k) => return Some(k),
                Err(e) => last = e,
            }
        }
        panic!("knotd did not start: {last}");
    }

    fn try_start(knotd: &Path, zone: &str, extra: &str) -> Result<Knot, String> {
        let dir = tempfile::Builder::new()
            .prefix("knot")
            .tempdir_in("/tmp")
            .map_err(|e| e.to_string())?;
        let d = dir.path().display().to_string();
        let port = super::free_port();
        let secret = random_secret();
        std::fs::create_dir_all(dir.path().join("db")).map_err(|e| e.to_string())?;
        let zone_file = format!(
            "$ORIGIN {zone}.\n$TTL 300\n@ SOA ns1.{zone}. hostmaster.{zone}. 1 3600 600 86400 300\n@ NS ns1.{zone}.\nns1 A 127.0.0.1\n{extra}\n"
        );
        std::fs::write(dir.path().join(format!("{zone}.zone")), zone_file)
            .map_err(|e| e.to_string())?;
        // No `user:` (runs as us), no journal, never writes the zone back.
        let conf = format!(
            "server:\n  rundir: \"{d}\"\n  listen: 127.0.0.1@{port}\n\
             log:\n  - target: stderr\n    any: info\n\
             database:\n  storage: \"{d}/db\"\n\
             key:\n  - id: {KEY_NAME}\n    algorithm: hmac-sha256\n    secret: {secret}\n\
             acl:\n  - id: update-acl\n    key: {KEY_NAME}\n    action: update\n\
             template:\n  - id: default\n    storage: \"{d}\"\n    file: \"%s.zone\"\n    zonefile-sync: -1\n    zonefile-load: whole\n    journal-content: none\n\
             zone:\n  - domain: {zone}\n    acl: update-acl\n"
        );
        let conf_path = dir.path().join("knot.conf");
        std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.path().join("knotd.log")).map_err(|e| e.to_string())?;
        let child = Command::new(knotd)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn knotd: {e}"))?;
        let mut knot = Knot {
            child,
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            secret,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let apex = format!("{zone}.");
        while Instant::now() < deadline {
            if let Ok(Some(status)) = knot.child.try_wait() {
                return Err(format!("knotd exited ({status}): {}", knot.log()));
            }
            if knot
                .query(&apex, RecordType::SOA)
                .is_some_and(|m| !m.answers.is_empty())
            {
                return Ok(knot);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("knotd not answering after 5 s: {}", knot.log()))
    }

    /// Rewrites `zone`'s file with `extra` records and SOA `serial` and
    /// tells knotd to reload it (SIGHUP); the caller waits for the change.
    pub fn replace_records(&self, zone: &str, extra: &str, serial: u32) {
        let zone_file = format!(
            "$ORIGIN {zone}.\n$TTL 300\n@ SOA ns1.{zone}. hostmaster.{zone}. {serial} 3600 600 86400 300\n@ NS ns1.{zone}.\nns1 A 127.0.0.1\n{extra}\n"
        );
        std::fs::write(self.dir.path().join(format!("{zone}.zone")), zone_file)
            .expect("write zone file");
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill -HUP knotd");
        assert!(status.success(), "SIGHUP to knotd failed");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("knotd.log")).unwrap_or_default()
    }

    /// One query over TCP; `None` if the server does not answer.
    pub fn query(&self, name: &str, rtype: RecordType) -> Option<Message> {
        let mut msg = Message::query();
        msg.add_query(Query::query(Name::from_ascii(name).ok()?, rtype));
        let resp = self.exchange(&msg.to_vec().ok()?)?;
        Message::from_vec(&resp).ok()
    }

    /// Sends one DNS message over TCP and returns the answer's bytes.
    pub fn exchange(&self, wire: &[u8]) -> Option<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut framed = u16::try_from(wire.len()).ok()?.to_be_bytes().to_vec();
        framed.extend_from_slice(wire);
        s.write_all(&framed).ok()?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).ok()?;
        let mut resp = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut resp).ok()?;
        Some(resp)
    }

    /// The records at `name` of type `rtype` as `(ttl, value)`; TXT strings
    /// joined, names absolute with trailing dot.
    pub fn rrset(&self, name: &str, rtype: RecordType) -> Vec<(u32, String)> {
        let msg = self
            .query(name, rtype)
            .unwrap_or_else(|| panic!("knotd does not answer {name} {rtype}"));
        let mut out: Vec<(u32, String)> = msg
            .answers
            .iter()
            .filter(|r| r.record_type() == rtype)
            .map(|r| {
                let value = match &r.data {
                    RData::TXT(t) => t
                        .txt_data
                        .iter()
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect(),
                    RData::CNAME(c) => c.0.to_ascii(),
                    other => other.to_string(),
                };
                (r.ttl, value)
            })
            .collect();
        out.sort();
        out
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        // No state to flush (no journal, zone file never written): SIGKILL.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
