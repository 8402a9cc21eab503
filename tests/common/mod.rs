//! Shared helpers for the integration tests.
#![allow(dead_code)]

pub mod client;
pub mod knot;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Installs the process-wide rustls provider (aws-lc-rs), as `main` does.
pub fn init_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A loopback port that was free a moment ago (for the binary, which binds
/// by itself; in-process tests bind port 0 directly).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
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
        let stderr = config.with_extension("stderr.log");
        let child = Command::new(bin())
            .args(global)
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr log"))
            .spawn()
            .expect("spawn mtasts");
        let mut proc = ServeProc {
            child,
            https,
            http,
            stderr,
        };
        proc.wait_ready();
        proc
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
