//! Load generator for bench/run.sh: the same client for mtasts and nginx.
//!
//! wrk takes its TLS server name from the URL, so it cannot spread SNI over
//! thousands of domains or open a new TLS connection per request with a
//! different name; this tool does both, over loopback only.
//!
//! ```text
//! loadgen --addr 127.0.0.1:8443 --tls --ca ca.pem --domains 10000 \
//!         --connections 32 --seconds 5 [--new-conn] [--prefix d]
//! ```
//! Prints one line: `requests=… seconds=… rps=… p50_us=… p99_us=… errors=…`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

struct Args {
    addr: SocketAddr,
    tls: Option<TlsConnector>,
    domains: usize,
    prefix: String,
    suffix: String,
    connections: usize,
    seconds: f64,
    new_conn: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut addr = None;
    let mut ca = None;
    let mut tls = false;
    let mut domains = 1;
    let mut prefix = "d".to_owned();
    let mut suffix = ".bench.test".to_owned();
    let mut connections = 32;
    let mut seconds = 5.0;
    let mut new_conn = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--addr" => addr = Some(val()?.parse().map_err(|e| format!("--addr: {e}"))?),
            "--ca" => ca = Some(val()?),
            "--tls" => tls = true,
            "--domains" => domains = val()?.parse().map_err(|e| format!("--domains: {e}"))?,
            "--prefix" => prefix = val()?,
            "--suffix" => suffix = val()?,
            "--connections" => {
                connections = val()?.parse().map_err(|e| format!("--connections: {e}"))?
            }
            "--seconds" => seconds = val()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--new-conn" => new_conn = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let addr: SocketAddr = addr.ok_or("--addr is required")?;
    if !addr.ip().is_loopback() {
        return Err("only loopback targets are allowed".to_owned());
    }
    let tls = if tls {
        let ca = ca.ok_or("--tls needs --ca")?;
        let pem = std::fs::read(&ca).map_err(|e| format!("{ca}: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots
                .add(cert.map_err(|e| format!("{ca}: {e}"))?)
                .map_err(|e| format!("{ca}: {e}"))?;
        }
        let mut cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Every new connection does a full handshake, like a sender's first fetch.
        cfg.resumption = rustls::client::Resumption::disabled();
        Some(TlsConnector::from(Arc::new(cfg)))
    } else {
        None
    };
    Ok(Args {
        addr,
        tls,
        domains: domains.max(1),
        prefix,
        suffix,
        connections: connections.max(1),
        seconds,
        new_conn,
    })
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn connect(args: &Args, host: &str) -> std::io::Result<Box<dyn Io>> {
    let tcp = TcpStream::connect(args.addr).await?;
    tcp.set_nodelay(true)?;
    match &args.tls {
        None => Ok(Box::new(tcp)),
        Some(c) => {
            let name = ServerName::try_from(host.to_owned())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            Ok(Box::new(c.connect(name, tcp).await?))
        }
    }
}

/// Sends one GET and reads one Content-Length framed response; returns the status.
async fn one_request(
    io: &mut Box<dyn Io>,
    host: &str,
    close: bool,
    buf: &mut Vec<u8>,
) -> std::io::Result<u16> {
    let conn = if close { "close" } else { "keep-alive" };
    let req = format!(
        "GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\nConnection: {conn}\r\n\r\n"
    );
    io.write_all(req.as_bytes()).await?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = io.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(status);
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
}

async fn worker(args: Arc<Args>, id: usize, stop: Arc<AtomicBool>) -> Tally {
    let mut t = Tally {
        latencies_us: Vec::with_capacity(1 << 16),
        errors: 0,
    };
    let mut buf = Vec::with_capacity(1024);
    let mut n = id;
    let host_for = |n: usize| format!("mta-sts.{}{}{}", args.prefix, n % args.domains, args.suffix);
    let mut conn: Option<Box<dyn Io>> = None;
    while !stop.load(Ordering::Relaxed) {
        let host = host_for(n);
        n += args.connections;
        let start = Instant::now();
        if conn.is_none() || args.new_conn {
            match connect(&args, &host).await {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    t.errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(io) = conn.as_mut() else { continue };
        // Keep-alive connections keep their first SNI; the Host must match it.
        let host = if args.new_conn || args.tls.is_none() {
            host
        } else {
            host_for(id)
        };
        match one_request(io, &host, args.new_conn, &mut buf).await {
            Ok(200) => t
                .latencies_us
                .push(u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX)),
            Ok(_) | Err(_) => {
                t.errors += 1;
                conn = None;
            }
        }
        if args.new_conn {
            conn = None;
        }
    }
    t
}

fn main() {
    let args = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // One client thread, like `wrk -t1`, leaving the other core to the server.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    rt.block_on(async move {
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let handles: Vec<_> = (0..args.connections)
            .map(|i| tokio::spawn(worker(Arc::clone(&args), i, Arc::clone(&stop))))
            .collect();
        tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        let mut errors = 0;
        for h in handles {
            if let Ok(t) = h.await {
                all.extend(t.latencies_us);
                errors += t.errors;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        all.sort_unstable();
        let pct = |p: f64| {
            all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        println!(
            "requests={} seconds={secs:.2} rps={:.0} p50_us={} p99_us={} errors={errors}",
            all.len(),
            all.len() as f64 / secs,
            pct(0.50),
            pct(0.99)
        );
    });
}
