//! A throw-away PostgreSQL server for tests: `initdb` into a temporary
//! directory, `postgres` on a free loopback port, stopped on drop. Run as
//! an unprivileged user (PostgreSQL refuses root): `nobody` when the tests
//! run as root.
//!
//! Missing binaries: under `CI=true` the test fails; otherwise it is
//! skipped with a notice (Debian package `postgresql`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Postgres {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// With TLS only: the CA that signed the server's certificate.
    pub ca: Option<PathBuf>,
    bin: PathBuf,
    child: Option<Child>,
    starts: u32,
}

/// The directory holding `initdb` and `postgres` (Debian keeps them in
/// /usr/lib/postgresql/<version>/bin, off PATH).
fn bin_dir() -> Option<PathBuf> {
    if let Some(initdb) = super::find_binary("initdb") {
        let dir = std::fs::canonicalize(&initdb).ok()?.parent()?.to_owned();
        if dir.join("postgres").is_file() {
            return Some(dir);
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|d| d.join("initdb").is_file() && d.join("postgres").is_file())
        .collect();
    versions.sort();
    versions.pop()
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `cmd` run as `nobody` when we are root.
fn unprivileged(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    /// `None` when PostgreSQL is not installed and we are not in CI.
    pub fn start() -> Option<Postgres> {
        Self::launch(false)
    }

    /// Like [`Postgres::start`], accepting TCP connections over TLS only
    /// (`hostssl` in pg_hba.conf), with a certificate for `localhost`
    /// signed by a test CA ([`Postgres::ca`]).
    pub fn start_tls() -> Option<Postgres> {
        Self::launch(true)
    }

    fn launch(tls: bool) -> Option<Postgres> {
        let Some(bin) = bin_dir() else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "PostgreSQL (initdb, postgres) not found and CI=true: install the Debian package `postgresql` (scripts/test.sh does)"
                );
            }
            eprintln!(
                "\n**************** SKIPPING TEST: PostgreSQL is not installed (apt-get install postgresql) ****************\n"
            );
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "65534:65534"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success());
        }
        let data = dir.path().join("data");
        let out = unprivileged(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "mtasts", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut ca = None;
        if tls {
            let ca_key = rcgen::KeyPair::generate().expect("key");
            let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("params");
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "mtasts test database CA");
            let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let key = rcgen::KeyPair::generate().expect("key");
            let params =
                rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
            let cert = params.signed_by(&key, &issuer).expect("server cert");
            std::fs::write(data.join("server.crt"), cert.pem()).expect("cert");
            std::fs::write(data.join("server.key"), key.serialize_pem()).expect("key");
            let ca_path = dir.path().join("db-ca.pem");
            std::fs::write(&ca_path, ca_cert.pem()).expect("ca");
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n",
            )
            .expect("pg_hba");
            if is_root() {
                let status = Command::new("chown")
                    .args(["-R", "65534:65534"])
                    .arg(&data)
                    .status()
                    .expect("chown");
                assert!(status.success());
            }
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                data.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .expect("chmod");
            ca = Some(ca_path);
        }
        let mut me = Postgres {
            port: super::free_port(),
            ca,
            dir,
            bin,
            child: None,
            starts: 0,
        };
        me.resume();
        let out = Command::new(me.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &me.port.to_string(),
                "-U",
                "mtasts",
                "mtasts",
            ])
            .output()
            .expect("createdb");
        assert!(
            out.status.success(),
            "createdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(me)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `postgres://mtasts@127.0.0.1:<port>/mtasts`
    pub fn url(&self) -> String {
        format!("postgres://mtasts@127.0.0.1:{}/mtasts", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("postgres{}.log", self.starts))
    }

    /// Starts the server (again, on the same port and data).
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "postgres already running");
        self.starts += 1;
        let log = self.log_path();
        let file = std::fs::File::create(&log).expect("log");
        let child = unprivileged(&self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .args(if self.ca.is_some() {
                &["-c", "ssl=on"][..]
            } else {
                &[][..]
            })
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-t", "1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server (fast shutdown: open connections are cut).
    pub fn pause(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs one SQL statement with `psql` and returns its unaligned output.
    pub fn sql(&self, query: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "mtasts",
            ])
            .args([
                "-d",
                "mtasts",
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                query,
            ])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {query:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.pause();
    }
}
