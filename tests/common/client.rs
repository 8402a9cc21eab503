//! A small HTTPS/HTTP client for tests: a real rustls handshake (with the SNI
//! we choose, trusting only the CA we name) and a raw HTTP/1.1 exchange, so
//! tests see exactly the bytes and headers a sender would.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Lowercased names, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A TLS client trusting exactly the roots given.
#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
}

impl TlsClient {
    pub fn trusting_pem_file(ca: &Path) -> TlsClient {
        let pem = std::fs::read(ca).expect("read CA file");
        Self::trusting_pem(&pem)
    }

    pub fn trusting_pem(pem: &[u8]) -> TlsClient {
        Self::trusting(pem, &[b"http/1.1"]).expect("CA PEM")
    }

    /// Trusting the PEM certificates in `pem`, offering the `alpn`
    /// protocols (none when empty); an error for a PEM that does not parse.
    pub fn trusting(pem: &[u8], alpn: &[&[u8]]) -> Result<TlsClient, String> {
        super::init_crypto();
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            roots
                .add(cert.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    /// Connects and completes the handshake with `sni` as server name.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        sni: &str,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        self.handshake(tcp, sni).await
    }

    /// The TLS handshake on a connected `tcp`, with `sni` as server name.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        sni: &str,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = ServerName::try_from(sni.to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        self.connector.connect(name, tcp).await
    }

    /// GET (or another method) over a fresh connection with `Connection: close`.
    pub async fn request(
        &self,
        addr: SocketAddr,
        sni: &str,
        method: &str,
        host: &str,
        path: &str,
    ) -> std::io::Result<Response> {
        let mut tls = self.connect(addr, sni).await?;
        exchange(&mut tls, method, host, path).await
    }

    /// POSTs `body` to `path` on `host` (the SNI too) over a fresh
    /// connection. A body the server refuses early may be cut off: the
    /// answer is read anyway.
    pub async fn post(
        &self,
        addr: SocketAddr,
        host: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> std::io::Result<Response> {
        let mut tls = self.connect(addr, host).await?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).await?;
        let _ = tls.write_all(body).await;
        let mut raw = Vec::new();
        let _ = tls.read_to_end(&mut raw).await;
        Ok(parse_response(&raw, false))
    }

    pub async fn get_policy(&self, addr: SocketAddr, domain: &str) -> std::io::Result<Response> {
        let host = format!("mta-sts.{domain}");
        self.request(addr, &host, "GET", &host, "/.well-known/mta-sts.txt")
            .await
    }
}

/// Plain HTTP request over a fresh TCP connection.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
) -> std::io::Result<Response> {
    let mut tcp = TcpStream::connect(addr).await?;
    exchange(&mut tcp, method, host, path).await
}

/// Writes one request with `Connection: close` and reads the whole response.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    method: &str,
    host: &str,
    path: &str,
) -> std::io::Result<Response> {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    // A TLS peer may close without close_notify after Connection: close.
    match stream.read_to_end(&mut raw).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    Ok(parse_response(&raw, method == "HEAD"))
}

/// Parses a complete HTTP/1.1 response (Content-Length framed or to EOF).
pub fn parse_response(raw: &[u8], head: bool) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head_text = std::str::from_utf8(&raw[..split]).expect("ASCII headers");
    let mut lines = head_text.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header line");
            (n.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if head {
        assert!(body.is_empty(), "HEAD response carried a body");
    } else if let Some(len) = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        assert_eq!(body.len(), len, "Content-Length does not match the body");
        body.truncate(len);
    }
    Response {
        status,
        headers,
        body,
    }
}

/// A plain HTTP request with extra headers and an optional JSON body.
pub async fn http_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> std::io::Result<Response> {
    let mut tcp = TcpStream::connect(addr).await?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    tcp.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await?;
    Ok(parse_response(&raw, method == "HEAD"))
}
