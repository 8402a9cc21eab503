//! DNS over TCP to the `[dns.update]` primary, with retries and backoff.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use hickory_proto::op::{Message, ResponseCode};

use super::{BACKOFF_MAX, BACKOFF_START, PushError};

/// DNS over TCP (RFC 7766): 2-byte length prefix each way; one connection
/// is reused for all messages of a push and reopened after a failure.
pub struct Transport {
    server: SocketAddr,
    timeout: Duration,
    retries: u32,
    stream: Option<TcpStream>,
}

impl Transport {
    pub fn new(server: SocketAddr, timeout: Duration, retries: u32) -> Self {
        Self {
            server,
            timeout,
            retries,
            stream: None,
        }
    }

    /// One exchange, no retry; reconnects first if the last one failed.
    pub(crate) async fn exchange_once(&mut self, wire: &[u8]) -> std::io::Result<Vec<u8>> {
        let len = u16::try_from(wire.len()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "message over 64 KiB")
        })?;
        let server = self.server;
        let timeout = self.timeout;
        let stream = match &mut self.stream {
            Some(s) => s,
            None => {
                let s = tokio::time::timeout(timeout, TcpStream::connect(server))
                    .await
                    .map_err(|_| timed_out("connect"))??;
                self.stream.insert(s)
            }
        };
        let io = async {
            let mut framed = Vec::with_capacity(wire.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(wire);
            stream.write_all(&framed).await?;
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await?;
            let mut resp = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut resp).await?;
            Ok::<_, std::io::Error>(resp)
        };
        let result = tokio::time::timeout(timeout, io)
            .await
            .map_err(|_| timed_out("answer"))
            .and_then(|r| r);
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    /// Sends the message `build` makes (fresh id and TSIG time per attempt)
    /// and returns the answer bytes. Network failures and SERVFAIL are
    /// retried with exponential backoff.
    pub(super) async fn exchange<T>(
        &mut self,
        mut build: impl FnMut() -> Result<(Vec<u8>, T), PushError>,
    ) -> Result<(Vec<u8>, T), PushError> {
        let mut delay = BACKOFF_START;
        let mut last = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                tracing::warn!(server = %self.server, attempt, "DNS exchange failed ({last}); retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(BACKOFF_MAX);
            }
            let (wire, extra) = build()?;
            match self.exchange_once(&wire).await {
                Ok(resp) => {
                    let servfail = Message::from_vec(&resp)
                        .map(|m| m.response_code == ResponseCode::ServFail)
                        .unwrap_or(false);
                    if servfail {
                        last = "SERVFAIL".to_owned();
                        continue;
                    }
                    return Ok((resp, extra));
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(PushError::Unreachable {
            server: self.server,
            attempts: self.retries + 1,
            last,
        })
    }
}

fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} timed out"))
}
