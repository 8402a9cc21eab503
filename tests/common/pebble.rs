//! Test helpers for ACME: a real `pebble` ACME server with
//! `pebble-challtestsrv` as its DNS (every name → 127.0.0.1), so pebble
//! validates challenges against our own listeners; and a small HTTPS client
//! that trusts only the roots it is given.
//!
//! Missing binaries: under `CI=true` the test fails; otherwise it is skipped
//! with a loud message (install the Debian package `pebble`).

#![allow(dead_code)]

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

/// A running pebble + challtestsrv pair; both are killed on drop.
pub struct Pebble {
    pub dir: tempfile::TempDir,
    /// `https://127.0.0.1:<port>/dir`
    pub directory: String,
    /// The test CA that signed pebble's own HTTPS certificate (`tls.ca_roots`).
    pub ca_roots: PathBuf,
    pub mgmt: SocketAddr,
    /// challtestsrv's DNS (UDP): every name → 127.0.0.1.
    pub dns: SocketAddr,
    listen: SocketAddr,
    /// The DNS server pebble resolves names with (challtestsrv's, unless
    /// [`Pebble::start_resolving_with`] named another).
    dns_port: u16,
    cts_mgmt: u16,
    config: PathBuf,
    pebble_bin: PathBuf,
    pebble: Option<Child>,
    cts: Option<Child>,
    starts: u32,
}

fn wait_tcp(addr: SocketAddr, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if StdStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{what} did not start listening on {addr}; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

impl Pebble {
    /// Starts pebble validating HTTP-01 against 127.0.0.1:`http_port` and
    /// TLS-ALPN-01 against 127.0.0.1:`tls_port`, issuing certificates valid
    /// for `validity` seconds (0 = pebble's default of 5 years).
    /// `None` when pebble is not installed and we are not in CI.
    pub fn start(http_port: u16, tls_port: u16, validity: u64) -> Option<Pebble> {
        Self::launch(http_port, tls_port, validity, None, None)
    }

    /// Like [`Pebble::start`], with pebble resolving names through the DNS
    /// server at `resolver` instead of challtestsrv. challtestsrv does not
    /// compress its answers, and pebble cannot read an answer for a name
    /// near 253 characters ("dns: buffer size too small"); knotd's are fine.
    pub fn start_resolving_with(
        http_port: u16,
        tls_port: u16,
        resolver: SocketAddr,
    ) -> Option<Pebble> {
        Self::launch(http_port, tls_port, 0, None, Some(resolver))
    }

    /// Like [`Pebble::start`], but pebble requires external account binding
    /// with this key id and base64url HMAC key.
    pub fn start_eab(http_port: u16, tls_port: u16, kid: &str, hmac_b64: &str) -> Option<Pebble> {
        Self::launch(http_port, tls_port, 0, Some((kid, hmac_b64)), None)
    }

    fn launch(
        http_port: u16,
        tls_port: u16,
        validity: u64,
        eab: Option<(&str, &str)>,
        resolver: Option<SocketAddr>,
    ) -> Option<Pebble> {
        let (Some(pebble_bin), Some(cts_bin)) = (
            super::find_binary("pebble"),
            super::find_binary("pebble-challtestsrv"),
        ) else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "pebble / pebble-challtestsrv not found and CI=true: install the Debian package `pebble` (scripts/test.sh does)"
                );
            }
            eprintln!(
                "\n**************** SKIPPING ACME TEST: pebble is not installed (apt-get install pebble) ****************\n"
            );
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca_roots, cert, key) = write_tls_files(dir.path());
        let listen: SocketAddr = format!("127.0.0.1:{}", super::free_port())
            .parse()
            .expect("addr");
        let mgmt: SocketAddr = format!("127.0.0.1:{}", super::free_port())
            .parse()
            .expect("addr");
        let dns_port = super::free_port();
        let cts_mgmt = super::free_port();
        let config = dir.path().join("pebble.json");
        let json = serde_json::json!({"pebble": {
            "listenAddress": listen.to_string(),
            "managementListenAddress": mgmt.to_string(),
            "certificate": cert,
            "privateKey": key,
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": eab.is_some(),
            "externalAccountMACKeys": eab
                .map(|(kid, key)| serde_json::json!({ kid: key }))
                .unwrap_or_else(|| serde_json::json!({})),
            "certificateValidityPeriod": validity,
        }});
        std::fs::write(&config, json.to_string()).expect("pebble config");

        let cts_log = dir.path().join("challtestsrv.log");
        let cts = Command::new(cts_bin)
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-management", &format!("127.0.0.1:{cts_mgmt}")])
            .args(["-http01", "", "-tlsalpn01", "", "-https01", ""])
            .stdin(Stdio::null())
            .stdout(log_file(&cts_log))
            .stderr(log_file(&cts_log))
            .spawn()
            .expect("start pebble-challtestsrv");
        let mut me = Pebble {
            directory: format!("https://{listen}/dir"),
            ca_roots,
            mgmt,
            dns: SocketAddr::from(([127, 0, 0, 1], dns_port)),
            listen,
            dns_port: resolver.map_or(dns_port, |r| r.port()),
            cts_mgmt,
            config,
            pebble_bin,
            pebble: None,
            cts: Some(cts),
            starts: 0,
            dir,
        };
        wait_tcp(
            format!("127.0.0.1:{cts_mgmt}").parse().expect("addr"),
            "pebble-challtestsrv",
            &cts_log,
        );
        me.resume();
        Some(me)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("pebble{}.log", self.starts))
    }

    /// Starts pebble (again) with the same config and ports. A restarted
    /// pebble has a new root and forgets every account and order.
    pub fn resume(&mut self) {
        assert!(self.pebble.is_none(), "pebble already running");
        self.starts += 1;
        let log = self.log_path();
        let child = Command::new(&self.pebble_bin)
            .arg("-config")
            .arg(&self.config)
            .args(["-dnsserver", &format!("127.0.0.1:{}", self.dns_port)])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdin(Stdio::null())
            .stdout(log_file(&log))
            .stderr(log_file(&log))
            .spawn()
            .expect("start pebble");
        self.pebble = Some(child);
        wait_tcp(self.listen, "pebble", &log);
        wait_tcp(self.mgmt, "pebble management", &log);
    }

    /// Stops pebble (challtestsrv keeps running).
    pub fn pause(&mut self) {
        if let Some(mut child) = self.pebble.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The pebble process id (to stop and continue it).
    pub fn pid(&self) -> Option<u32> {
        self.pebble.as_ref().map(Child::id)
    }

    /// Everything pebble logged since its last start.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// How many new orders pebble received since its last start.
    pub fn orders(&self) -> usize {
        self.log().matches("POST /order-plz").count()
    }

    /// A `[tls]` section for ACME against this pebble with HTTP-01,
    /// 1 s first retry and no DNS precheck (test names do not resolve
    /// through the system resolver), followed by `extra` lines (order
    /// limits, retry_max) that differ between tests.
    pub fn tls_section(&self, extra: &str) -> String {
        format!(
            "[tls]\nmode = \"acme\"\ndirectory = \"{}\"\nca_roots = \"{}\"\ncontact = \"hostmaster@example.com\"\nchallenge = \"http-01\"\nretry_initial = \"1s\"\nprecheck_dns = false\n{extra}\n",
            self.directory,
            self.ca_roots.display()
        )
    }

    /// The root that issues certificates now (`/roots/0`, new per start).
    pub async fn root(&self) -> Vec<u8> {
        let roots = std::fs::read(&self.ca_roots).expect("ca roots");
        let resp = https_get(self.mgmt, "127.0.0.1", "/roots/0", &roots, &[])
            .await
            .expect("GET /roots/0");
        assert_eq!(resp.status, 200, "{}", resp.body);
        resp.body.into_bytes()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.pause();
        if let Some(mut child) = self.cts.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn log_file(path: &Path) -> Stdio {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("log file");
    Stdio::from(f)
}

/// A test CA and a leaf for pebble's HTTPS (SAN localhost + 127.0.0.1,
/// CA:FALSE, which webpki insists on). Returns (ca, cert, key) paths.
fn write_tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "mtasts test CA for pebble");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("leaf key");
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    leaf.is_ca = IsCa::ExplicitNoCa;
    let leaf_cert = leaf.signed_by(&key, &issuer).expect("leaf");
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).expect("write");
    std::fs::write(&paths.1, leaf_cert.pem()).expect("write");
    let mut f = std::fs::File::create(&paths.2).expect("key");
    f.write_all(key.serialize_pem().as_bytes()).expect("write");
    paths
}

/// An HTTP response read by [`https_get`].
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
    /// DER of the certificate chain the server showed.
    pub chain: Vec<Vec<u8>>,
}

/// `GET path` over TLS to `addr` with SNI `name`, trusting only the PEM
/// certificates in `roots`; `alpn` protocols offered (empty = none). The
/// tests' one HTTPS client (`common::client`) with the chain kept.
pub async fn https_get(
    addr: SocketAddr,
    name: &str,
    path: &str,
    roots: &[u8],
    alpn: &[&[u8]],
) -> Result<Response, String> {
    let client = super::client::TlsClient::trusting(roots, alpn)?;
    let fut = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut tls = client
            .handshake(tcp, name)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let chain: Vec<Vec<u8>> = tls
            .get_ref()
            .1
            .peer_certificates()
            .unwrap_or_default()
            .iter()
            .map(|c| c.to_vec())
            .collect();
        let resp = super::client::exchange(&mut tls, "GET", name, path)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Response {
            status: resp.status,
            body: String::from_utf8_lossy(&resp.body).into_owned(),
            chain,
        })
    };
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// The leaf serial (uppercase hex) of a DER certificate.
pub fn serial(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse leaf");
    cert.raw_serial_as_string()
        .replace(':', "")
        .to_ascii_uppercase()
}
