//! Shared helpers for the integration tests.
#![allow(dead_code)]

pub mod client;
pub mod inproc;
pub mod knot;
pub mod pebble;
pub mod postgres;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Installs the process-wide rustls provider (aws-lc-rs), as `main` does.
pub fn init_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A loopback port, free for TCP and UDP a moment ago, for a server that
/// binds by itself (the binary, pebble, knotd).
///
/// Taken below the kernel's ephemeral range (32768-60999 on Linux) so that
/// no client connection of a concurrent test can grab it as its source port
/// between this check and the server's bind (that race made a pebble test
/// fail with "address already in use"), and handed out once per process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + (start + n) % SPAN).expect("port range");
        let addr = ("127.0.0.1", port);
        if TcpListener::bind(addr).is_ok() && std::net::UdpSocket::bind(addr).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {LOW} and {}", LOW + SPAN);
}

/// An installed program: `cmd` on `PATH`, else in the sbin and bin
/// directories Debian packages use (knotd lives in /usr/sbin).
pub fn find_binary(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// A policy's id as the docs define it, computed here independently of
/// the library: lowercase hex of the first 16 bytes of SHA-256 of the body.
pub fn policy_id(body: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(body)[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs `mtasts` with `args` to completion.
pub fn mtasts(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().expect("run mtasts")
}

/// A finished command's stdout and stderr as text.
pub fn output_text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `mtasts` binary built for these tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mtasts"))
}

/// A `mtasts serve` child process, killed when dropped.
pub struct ServeProc {
    pub child: Child,
    pub https: SocketAddr,
    pub http: SocketAddr,
    pub stderr: PathBuf,
}

impl ServeProc {
    /// Starts `mtasts serve --config <config>` and waits until both
    /// listeners accept connections.
    pub fn start(config: &Path, https: SocketAddr, http: SocketAddr) -> ServeProc {
        Self::start_with(config, https, http, &[])
    }

    /// Like `start`, with global options (e.g. `--log-format json`) first.
    pub fn start_with(
        config: &Path,
        https: SocketAddr,
        http: SocketAddr,
        global: &[&str],
    ) -> ServeProc {
        Self::start_args(config, https, http, global, &[])
    }

    /// Like `start_with`, with options of `serve` itself (after `--config`).
    pub fn start_args(
        config: &Path,
        https: SocketAddr,
        http: SocketAddr,
        global: &[&str],
        serve: &[&str],
    ) -> ServeProc {
        let mut proc = Self::spawn(config, https, http, global, serve);
        proc.wait_ready();
        proc
    }

    /// Starts the process and returns the moment its https port accepts a
    /// connection, as early as any client could reach it (`start` waits for
    /// both ports and polls every 50 ms): for what must hold from then on.
    pub fn start_at_first_accept(config: &Path, https: SocketAddr, http: SocketAddr) -> ServeProc {
        let proc = Self::spawn(config, https, http, &[], &[]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(https).is_err() {
            assert!(Instant::now() < deadline, "never listened: {}", proc.log());
            std::thread::sleep(Duration::from_millis(1));
        }
        proc
    }

    /// Starts the process and returns at once, before it listens.
    fn spawn(
        config: &Path,
        https: SocketAddr,
        http: SocketAddr,
        global: &[&str],
        serve: &[&str],
    ) -> ServeProc {
        let stderr = config.with_extension("stderr.log");
        let child = Command::new(bin())
            .args(global)
            .args(["serve", "--config"])
            .arg(config)
            .args(serve)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr log"))
            .spawn()
            .expect("spawn mtasts");
        ServeProc {
            child,
            https,
            http,
            stderr,
        }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("mtasts exited early with {status}: {}", self.log());
            }
            let up = [self.https, self.http].iter().all(|a| {
                std::net::TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok()
            });
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "mtasts did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends a Unix signal to the process.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }
}

impl Drop for ServeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write test file");
    path
}

/// A `[server]` section on the given ports with state in `state_dir`.
pub fn server_section(https: SocketAddr, http: SocketAddr, state_dir: &Path) -> String {
    format!(
        "[server]\nhttps = \"{https}\"\nhttp = \"{http}\"\nstate_dir = \"{}\"\n",
        state_dir.display()
    )
}

/// Loopback address with a free port.
pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// The policy body served over plain HTTP on `http_port` for `domain`
/// (the policy listener answers HTTP too), or `None` unless 200.
pub fn served_body(http_port: u16, domain: &str) -> Option<Vec<u8>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", http_port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-sts.{domain}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n")?;
    resp.starts_with(b"HTTP/1.1 200")
        .then(|| resp[split + 4..].to_vec())
}

/// The id of the policy `addr` serves for `domain` over HTTPS.
pub async fn served_id(client: &client::TlsClient, addr: SocketAddr, domain: &str) -> String {
    let resp = client.get_policy(addr, domain).await.expect("policy");
    assert_eq!(resp.status, 200);
    policy_id(&resp.body)
}

/// Polls the async `f` every 50 ms for up to `limit`; on timeout fails the
/// test naming `what`, with `log()` (a server's log, say) in the message.
/// The one polling loop of the async tests (each file wraps it with its
/// own budget and log).
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, log: impl Fn() -> String, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of one series (name and labels exactly) in a Prometheus text
/// exposition; `None` when it is not there.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Polls `done` every 50 ms for up to 15 s; fails the test naming `what`.
pub fn wait_for(what: &str, done: impl FnMut() -> bool) {
    wait_for_logged(what, Duration::from_secs(15), String::new, done);
}

/// [`wait_for`] with its own budget, and `log()` in the failure message.
pub fn wait_for_logged(
    what: &str,
    limit: Duration,
    log: impl Fn() -> String,
    mut done: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `kdig @server -p port +norec +timeout=3 +retry=0 ARGS…` (knot-dnsutils):
/// its stdout and stderr (a refused transfer is reported on stderr).
pub fn kdig(server: SocketAddr, args: &[&str]) -> String {
    let Some(kdig) = find_binary("kdig") else {
        panic!("kdig is missing: install knot-dnsutils (scripts/test.sh does)");
    };
    let out = std::process::Command::new(kdig)
        .arg(format!("@{}", server.ip()))
        .args([
            "-p",
            &server.port().to_string(),
            "+norec",
            "+timeout=3",
            "+retry=0",
        ])
        .args(args)
        .output()
        .expect("run kdig");
    // kdig reports a refused transfer on stderr.
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The `status:` of a kdig answer (`NOERROR`, `NXDOMAIN`, …).
pub fn dns_status(out: &str) -> String {
    out.lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(';').next().unwrap_or("").trim().to_owned())
        .unwrap_or_default()
}

/// The admin listener's `/metrics` text, asked with `token` (200 expected).
pub async fn admin_metrics(admin: SocketAddr, token: &str) -> String {
    let resp = client::http_call(
        admin,
        "GET",
        "/metrics",
        &[("Authorization", &format!("Bearer {token}"))],
        None,
    )
    .await
    .expect("metrics");
    assert_eq!(resp.status, 200);
    String::from_utf8_lossy(&resp.body).into_owned()
}
