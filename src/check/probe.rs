//! The network side of `check`: the policy fetch over HTTPS (RFC 8461 §3.3)
//! and the STARTTLS probe of an MX (RFC 8461 §4.2, RFC 3207). Every read is
//! bounded in size, and every exchange in time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::http::POLICY_PATH;

/// Senders cap policy bodies around 64 KiB (RFC 8461 §3.3 leaves the limit
/// to them); a bigger one is as good as absent.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;

/// Longest SMTP reply line read. RFC 5321 §4.5.3.1.5 allows 512 octets
/// with the CRLF; real servers stay well below this.
pub const MAX_REPLY_LINE: usize = 2048;

/// Most bytes of one (multi-line) SMTP reply; an EHLO answer lists a few
/// dozen extensions at most.
pub const MAX_REPLY_BYTES: usize = 16 * 1024;

/// The HTTP part of a policy fetch.
pub struct Fetched {
    pub status: u16,
    pub content_type: Option<String>,
    pub location: Option<String>,
    pub body: Result<Bytes, String>,
}

/// GETs the policy from `addr`, verifying the certificate for `host` and
/// sending `host` as Host; redirects are returned, not followed.
pub async fn fetch_policy(
    host: &str,
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<Fetched, String> {
    let server_name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?;
    let work = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS with {host} at {addr}: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("HTTP: {e}"))?;
        let driver = tokio::spawn(conn);
        let req = hyper::Request::get(POLICY_PATH)
            .header(hyper::header::HOST, host)
            .header(hyper::header::USER_AGENT, "mtasts-check")
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| format!("HTTP request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let header = |name| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let status = resp.status().as_u16();
        let content_type = header(hyper::header::CONTENT_TYPE);
        let location = header(hyper::header::LOCATION);
        let body = http_body_util::Limited::new(resp.into_body(), MAX_POLICY_BYTES)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| e.to_string());
        driver.abort();
        Ok(Fetched {
            status,
            content_type,
            location,
            body,
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no answer from {addr} within {timeout:?}"))?
}

/// One SMTP reply (RFC 5321 §4.2): its code and the text of each line.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

/// Reads one (possibly multi-line) SMTP reply. A line is `code-text`
/// (more follow) or `code text` / `code` alone (the last one); every line
/// is at most [`MAX_REPLY_LINE`] bytes and the reply [`MAX_REPLY_BYTES`].
pub async fn read_reply<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Reply, String> {
    let mut total = 0;
    let mut code = None;
    let mut lines = Vec::new();
    loop {
        let mut line = Vec::new();
        // +1 so that a line of exactly the limit still shows its LF.
        let limit = u64::try_from(MAX_REPLY_LINE + 1).unwrap_or(u64::MAX);
        (&mut *r)
            .take(limit)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| format!("reading the SMTP reply: {e}"))?;
        if line.last() != Some(&b'\n') {
            return Err(if line.len() > MAX_REPLY_LINE {
                format!("an SMTP reply line longer than {MAX_REPLY_LINE} bytes")
            } else {
                format!(
                    "the connection closed inside an SMTP reply ({:?})",
                    String::from_utf8_lossy(&line)
                )
            });
        }
        total += line.len();
        if total > MAX_REPLY_BYTES {
            return Err(format!("an SMTP reply longer than {MAX_REPLY_BYTES} bytes"));
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        let bad = || format!("unexpected SMTP reply line {text:?}");
        // RFC 5321 §4.2: the first digit is 2..5, the second 0..5.
        let this: u16 = text
            .get(..3)
            .filter(|c| {
                let b = c.as_bytes();
                (b'2'..=b'5').contains(&b[0])
                    && (b'0'..=b'5').contains(&b[1])
                    && b[2].is_ascii_digit()
            })
            .and_then(|c| c.parse().ok())
            .ok_or_else(bad)?;
        if *code.get_or_insert(this) != this {
            return Err(format!(
                "an SMTP reply whose lines have different codes ({text:?})"
            ));
        }
        let (last, rest) = match text.as_bytes().get(3) {
            None => (true, ""),
            Some(b' ') => (true, text.get(4..).unwrap_or("")),
            Some(b'-') => (false, text.get(4..).unwrap_or("")),
            Some(_) => return Err(bad()),
        };
        lines.push(rest.to_owned());
        if last {
            return Ok(Reply { code: this, lines });
        }
    }
}

/// Connects to an MX at `addr`, upgrades with STARTTLS and verifies that its
/// certificate chains to a trusted root and is valid for `host` — what an
/// enforcing sender needs (RFC 8461 §4.2).
pub async fn starttls(
    host: &str,
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<(), String> {
    let server_name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?;
    let work = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let mut stream = BufReader::new(tcp);
        let reply = read_reply(&mut stream).await?;
        if reply.code != 220 {
            return Err(format!("greeting {}", reply.code));
        }
        send(&mut stream, b"EHLO mtasts-check.invalid\r\n").await?;
        let reply = read_reply(&mut stream).await?;
        if reply.code != 250 {
            return Err(format!("EHLO answered {}", reply.code));
        }
        // The first line names the server; the others are extensions.
        let offers = reply.lines.iter().skip(1).any(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case("STARTTLS"))
        });
        if !offers {
            return Err("does not offer STARTTLS".into());
        }
        send(&mut stream, b"STARTTLS\r\n").await?;
        let reply = read_reply(&mut stream).await?;
        if reply.code != 220 {
            return Err(format!("STARTTLS answered {}", reply.code));
        }
        if !stream.buffer().is_empty() {
            return Err("sent more bytes after its STARTTLS answer, before TLS".into());
        }
        let mut tls_stream = tokio_rustls::TlsConnector::from(tls)
            .connect(server_name, stream.into_inner())
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let _ = tls_stream.write_all(b"QUIT\r\n").await;
        Ok(())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no answer from {addr} within {timeout:?}"))?
}

async fn send(stream: &mut BufReader<TcpStream>, line: &[u8]) -> Result<(), String> {
    stream
        .get_mut()
        .write_all(line)
        .await
        .map_err(|e| format!("writing to the MX: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn reply(input: &[u8]) -> Result<Reply, String> {
        read_reply(&mut BufReader::new(input)).await
    }

    #[tokio::test]
    async fn replies() {
        assert_eq!(
            reply(b"250-mx.example\r\n250-PIPELINING\r\n250 STARTTLS\r\n").await,
            Ok(Reply {
                code: 250,
                lines: vec!["mx.example".into(), "PIPELINING".into(), "STARTTLS".into()]
            })
        );
        let r = reply(b"250-mx.example\r\n250-STARTTLS\r\n250\r\nnext").await;
        assert_eq!(
            r.map(|r| r.lines.len()),
            Ok(3),
            "a bare code ends the reply"
        );
        assert!(reply(b"250-a\r\n251 b\r\n").await.is_err());
        assert!(reply(b"25x a\r\n").await.is_err());
        assert!(reply(b"250+a\r\n").await.is_err());
        // Found by tests/fuzz.rs: codes outside RFC 5321's 2yz..5yz.
        for bad in [
            &b"000 a\r\n"[..],
            b"099\r\n",
            b"600 x\r\n",
            b"270 x\r\n",
            b"1\r\n",
        ] {
            assert!(reply(bad).await.is_err(), "{bad:?}");
        }
        assert_eq!(reply(b"554 no\r\n").await.map(|r| r.code), Ok(554));
        assert!(
            reply(b"250-a\r\n").await.is_err(),
            "closed inside the reply"
        );
        let long = format!("220 {}\r\n", "A".repeat(MAX_REPLY_LINE));
        assert!(
            reply(long.as_bytes())
                .await
                .expect_err("over the limit")
                .contains("longer than")
        );
        let many = "250-x\r\n".repeat(MAX_REPLY_BYTES / 7 + 1);
        assert!(
            reply(many.as_bytes())
                .await
                .expect_err("over the limit")
                .contains("longer than")
        );
    }
}
