//! A stub resolver: recursive queries to one DNS server, for `check` (over
//! TCP, following CNAMEs) and the ACME precheck (over UDP).
//!
//! hickory-proto builds and parses the messages; this module owns the
//! transport. UDP answers with the TC bit are asked again over TCP
//! (RFC 7766 §5). Every read is bounded: UDP datagrams by the buffer, TCP
//! answers by their two-byte length prefix, and each exchange by a timeout.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// CNAME chains longer than this are treated as broken.
pub const MAX_CNAME_HOPS: usize = 8;

/// Largest UDP answer read. Queries carry no EDNS, so a server sends at
/// most 512 bytes (RFC 1035 §4.2.1) and sets TC for more; the slack is for
/// servers that send more anyway.
const UDP_BUFFER: usize = 4096;

/// Datagrams that are not our answer (wrong id, garbage) before giving up.
const MAX_STRAY_DATAGRAMS: usize = 16;

/// How queries travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// UDP, and TCP again when the answer is truncated.
    Udp,
    /// TCP only (one connection per query).
    Tcp,
}

/// Why a lookup failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("{name:?} is not a domain name: {detail}")]
    Name { name: String, detail: String },
    #[error("DNS server {server} did not answer {name} {rtype} within {timeout:?}")]
    Timeout {
        server: SocketAddr,
        name: String,
        rtype: RecordType,
        timeout: Duration,
    },
    #[error("DNS server {server}: {detail}")]
    Io { server: SocketAddr, detail: String },
    #[error("DNS server {server} answered {name} {rtype} with {detail}")]
    Malformed {
        server: SocketAddr,
        name: String,
        rtype: RecordType,
        detail: String,
    },
    #[error("DNS server {server} answered {code} for {name} {rtype}")]
    Code {
        server: SocketAddr,
        name: String,
        rtype: RecordType,
        code: ResponseCode,
    },
    #[error("{name}: CNAME chain longer than {MAX_CNAME_HOPS} names, or a loop")]
    CnameChain { name: String },
}

/// Recursive queries to one server.
#[derive(Debug, Clone)]
pub struct Resolver {
    server: SocketAddr,
    protocol: Protocol,
    /// Budget of one exchange (one datagram round trip, or one TCP connect,
    /// send and answer).
    timeout: Duration,
}

impl Resolver {
    pub fn new(server: SocketAddr, protocol: Protocol, timeout: Duration) -> Self {
        Self {
            server,
            protocol,
            timeout,
        }
    }

    /// One question, one answer message (any response code). The answer
    /// must carry the query's id and question.
    pub async fn query(&self, name: &Name, rtype: RecordType) -> Result<Message, ResolveError> {
        let mut msg = Message::query();
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(name.clone(), rtype));
        let wire = msg.to_vec().map_err(|e| self.malformed(name, rtype, e))?;
        let answer = match self.protocol {
            Protocol::Tcp => self.tcp(&wire, name, rtype).await?,
            Protocol::Udp => {
                let answer = self.udp(&wire, msg.metadata.id, name, rtype).await?;
                if answer.metadata.truncation {
                    self.tcp(&wire, name, rtype).await?
                } else {
                    answer
                }
            }
        };
        self.validate(&msg, answer, name, rtype)
    }

    /// The records of `rtype` at `name`, following CNAMEs (in the answer, or
    /// by asking again for the target). NXDOMAIN and NODATA give an empty
    /// list; any other error code is an error.
    pub async fn lookup(&self, name: &str, rtype: RecordType) -> Result<Vec<RData>, ResolveError> {
        let mut target = absolute(name)?;
        for _ in 0..MAX_CNAME_HOPS {
            let msg = self.query(&target, rtype).await?;
            match msg.metadata.response_code {
                ResponseCode::NoError => {}
                ResponseCode::NXDomain => return Ok(Vec::new()),
                code => {
                    return Err(ResolveError::Code {
                        server: self.server,
                        name: target.to_string(),
                        rtype,
                        code,
                    });
                }
            }
            let end = follow_cnames(&msg, &target, rtype)?;
            let found: Vec<RData> = msg
                .answers
                .iter()
                .filter(|r| r.name == end && r.record_type() == rtype)
                .map(|r| r.data.clone())
                .collect();
            if !found.is_empty() || end == target {
                return Ok(found);
            }
            // The chain leaves what this answer covers: ask for its end.
            target = end;
        }
        Err(ResolveError::CnameChain {
            name: name.to_owned(),
        })
    }

    /// Every A and AAAA address of `host`, in answer order, A first.
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let mut out = Vec::new();
        for rtype in [RecordType::A, RecordType::AAAA] {
            for data in self.lookup(host, rtype).await? {
                match data {
                    RData::A(a) => out.push(IpAddr::V4(a.0)),
                    RData::AAAA(a) => out.push(IpAddr::V6(a.0)),
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    async fn udp(
        &self,
        wire: &[u8],
        id: u16,
        name: &Name,
        rtype: RecordType,
    ) -> Result<Message, ResolveError> {
        let bind: SocketAddr = if self.server.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let exchange = async {
            let socket = UdpSocket::bind(bind).await.map_err(|e| self.io(e))?;
            socket.connect(self.server).await.map_err(|e| self.io(e))?;
            socket.send(wire).await.map_err(|e| self.io(e))?;
            let mut buf = vec![0u8; UDP_BUFFER];
            for _ in 0..MAX_STRAY_DATAGRAMS {
                let n = socket.recv(&mut buf).await.map_err(|e| self.io(e))?;
                // Anything else arriving on the port is not our answer
                // (RFC 5452 §9.1): skip it, within the timeout.
                if let Some(answer) = buf.get(..n).and_then(|b| Message::from_vec(b).ok())
                    && answer.metadata.id == id
                {
                    return Ok(answer);
                }
            }
            Err(self.malformed(name, rtype, "no datagram with the query's id"))
        };
        self.timed(exchange, name, rtype).await
    }

    async fn tcp(
        &self,
        wire: &[u8],
        name: &Name,
        rtype: RecordType,
    ) -> Result<Message, ResolveError> {
        let len = u16::try_from(wire.len())
            .map_err(|_| self.malformed(name, rtype, "query over 64 KiB"))?;
        let exchange = async {
            let mut stream = TcpStream::connect(self.server)
                .await
                .map_err(|e| self.io(e))?;
            let mut framed = Vec::with_capacity(wire.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(wire);
            stream.write_all(&framed).await.map_err(|e| self.io(e))?;
            // The length prefix bounds the answer to 64 KiB (RFC 1035 §4.2.2).
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await.map_err(|e| self.io(e))?;
            let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream
                .read_exact(&mut answer)
                .await
                .map_err(|e| self.io(e))?;
            Message::from_vec(&answer).map_err(|e| self.malformed(name, rtype, e))
        };
        self.timed(exchange, name, rtype).await
    }

    async fn timed(
        &self,
        exchange: impl Future<Output = Result<Message, ResolveError>>,
        name: &Name,
        rtype: RecordType,
    ) -> Result<Message, ResolveError> {
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ResolveError::Timeout {
                server: self.server,
                name: name.to_string(),
                rtype,
                timeout: self.timeout,
            })?
    }

    fn validate(
        &self,
        query: &Message,
        answer: Message,
        name: &Name,
        rtype: RecordType,
    ) -> Result<Message, ResolveError> {
        if answer.metadata.id != query.metadata.id {
            return Err(self.malformed(name, rtype, "an id that is not the query's"));
        }
        if answer.metadata.message_type != MessageType::Response {
            return Err(self.malformed(name, rtype, "a message that is not a response"));
        }
        let same_question = answer.queries.len() == 1
            && answer
                .queries
                .first()
                // Name equality ignores ASCII case (RFC 4343).
                .is_some_and(|q| q.query_type() == rtype && q.name() == name);
        if !same_question {
            return Err(self.malformed(name, rtype, "another question"));
        }
        Ok(answer)
    }

    fn io(&self, e: std::io::Error) -> ResolveError {
        ResolveError::Io {
            server: self.server,
            detail: e.to_string(),
        }
    }

    fn malformed(&self, name: &Name, rtype: RecordType, detail: impl ToString) -> ResolveError {
        ResolveError::Malformed {
            server: self.server,
            name: name.to_string(),
            rtype,
            detail: detail.to_string(),
        }
    }
}

/// `name` as an absolute DNS name (a trailing dot is optional in the input).
pub fn absolute(name: &str) -> Result<Name, ResolveError> {
    let text = format!("{}.", name.strip_suffix('.').unwrap_or(name));
    Name::from_ascii(&text).map_err(|e| ResolveError::Name {
        name: name.to_owned(),
        detail: e.to_string(),
    })
}

/// Walks the CNAME chain from `start` inside one answer; returns the last
/// name of the chain (`start` itself when there is no CNAME).
fn follow_cnames(msg: &Message, start: &Name, rtype: RecordType) -> Result<Name, ResolveError> {
    if rtype == RecordType::CNAME {
        return Ok(start.clone());
    }
    let mut name = start.clone();
    for _ in 0..=MAX_CNAME_HOPS {
        let next = msg.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(c) if r.name == name => Some(c.0.clone()),
            _ => None,
        });
        match next {
            Some(n) => name = n,
            None => return Ok(name),
        }
    }
    Err(ResolveError::CnameChain {
        name: start.to_string(),
    })
}
