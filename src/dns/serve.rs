//! Authoritative DNS for the delegation zone (`[delegation] dns_listen`):
//! the provider's zone is answered by the process that serves the
//! policies, from the snapshot it serves, so a customer's `_mta-sts` id can
//! never run ahead of the policy body.
//!
//! Answers (AA set, no recursion): SOA and NS at the apex, the
//! `v=STSv1; id=…;` TXT at `<customer>.<zone>` (only once the customer's
//! policy host has a certificate), the policy host's addresses when they
//! are inside the zone; NXDOMAIN or NODATA with the SOA for negative
//! caching; REFUSED outside the zone. UDP answers larger than the client's
//! EDNS size (512 bytes without EDNS) are truncated (TC) so the client asks
//! again over TCP. Every read is bounded in size and time, and UDP answers
//! per client network are rate-limited against reflection (`dns_rate_limit`
//! per second; beyond it every second query gets an empty truncated
//! answer, so a real resolver retries over TCP, and the rest none).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record as Rr, RecordType, TSigResponseContext, TSigner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use crate::config::Delegation;
use crate::server::Server;

/// Largest UDP answer to clients that advertise more (RFC 9715's advice).
const MAX_UDP: usize = 1232;
/// A TCP client must send its query within this long.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);

/// The zone as of one snapshot generation. Customers' TXT records are not
/// stored: a query is answered from the snapshot itself (a million
/// customers cost no memory here).
struct Zone {
    generation: u64,
    apex: Name,
    soa: Rr,
    ns: Vec<Rr>,
    /// The snapshot the zone is of.
    snapshot: Arc<crate::snapshot::Snapshot>,
    /// Owner (lowercase) → the records the config defines inside the zone
    /// (the policy host's addresses).
    extra: HashMap<Name, Vec<Rr>>,
    /// `h-<hash>` owner → customer, for the few names too long to keep
    /// every label (see [`crate::dns::delegated_name`]).
    hashed: HashMap<Name, crate::policy::DomainName>,
}

impl Zone {
    /// The customer TXT at `qname` (lowercase, inside the zone), if a
    /// served customer owns that name, and the policy host it is gated by.
    fn customer(&self, qname: &Name, delegation: &Delegation) -> Option<(Rr, String)> {
        let site = match self.hashed.get(qname) {
            Some(domain) => self.snapshot.lookup(&domain.policy_host())?,
            None => {
                let text = qname.to_ascii();
                let head = domain_of_query(&text, &delegation.zone)?;
                self.snapshot.lookup(&format!("mta-sts.{head}"))?
            }
        };
        let record = crate::dns::provider_records(&**site, delegation)
            .into_iter()
            .next()?;
        // The name must be the one this customer's CNAME points at (a long
        // name is only ever answered in its hashed form).
        let owner = Name::from_ascii(&record.name).ok()?.to_lowercase();
        if owner != *qname {
            return None;
        }
        let text = record.value.trim_matches('"').to_owned();
        let rr = Rr::from_rdata(owner, record.ttl, RData::TXT(TXT::new(vec![text])));
        Some((rr, site.host()))
    }
}

/// Builds the zone of the server's current snapshot.
fn build(server: &Server, delegation: &Delegation, serial: u32) -> Result<Zone, String> {
    let name = |s: &str| {
        Name::from_ascii(s)
            .map(|n| n.to_lowercase())
            .map_err(|e| format!("{s}: {e}"))
    };
    let apex = name(&format!("{}.", delegation.zone))?;
    let ttl = delegation.ttl;
    let mname = name(&format!("{}.", delegation.nameservers[0]))?;
    let rname = name(&format!("hostmaster.{}.", delegation.zone))?;
    let soa = Rr::from_rdata(
        apex.clone(),
        ttl,
        RData::SOA(SOA::new(mname, rname, serial, 3600, 600, 1_209_600, 300)),
    );
    let mut ns = Vec::new();
    for host in &delegation.nameservers {
        ns.push(Rr::from_rdata(
            apex.clone(),
            ttl,
            RData::NS(NS(name(&format!("{host}."))?)),
        ));
    }
    let snapshot = server.snapshot();
    // Only names too long for `<customer>.<zone>` need a table.
    let mut hashed = HashMap::new();
    let room = 253usize.saturating_sub(delegation.zone.as_str().len() + 1);
    for site in snapshot.sites() {
        if site.domain.name.as_str().len() > room {
            let owner = crate::dns::delegated_name(&site.domain.name, &delegation.zone);
            hashed.insert(name(&owner)?, site.domain.name.clone());
        }
    }
    let mut extra: HashMap<Name, Vec<Rr>> = HashMap::new();
    for r in crate::dns::policy_host_records(delegation) {
        let owner = name(&r.name)?;
        if !apex.zone_of(&owner) {
            continue;
        }
        let rdata = match r.rtype {
            "A" => r.value.parse().map(|a| RData::A(A(a))).ok(),
            "AAAA" => r.value.parse().map(|a| RData::AAAA(AAAA(a))).ok(),
            "CNAME" => name(&r.value).ok().map(|n| RData::CNAME(CNAME(n))),
            _ => None,
        };
        if let Some(rdata) = rdata {
            extra
                .entry(owner.clone())
                .or_default()
                .push(Rr::from_rdata(owner, r.ttl, rdata));
        }
    }
    Ok(Zone {
        generation: server.generation(),
        apex,
        soa,
        ns,
        snapshot,
        extra,
        hashed,
    })
}

/// Serves the zone of `server`'s snapshots on `addr` until the process
/// ends. Binds now (errors are returned), then runs in the background.
pub async fn spawn(
    server: Arc<Server>,
    delegation: Delegation,
    addr: SocketAddr,
) -> std::io::Result<SocketAddr> {
    let udp = UdpSocket::bind(addr).await?;
    let bound = udp.local_addr()?;
    let tcp = TcpListener::bind(bound).await?;
    let transfer_signer = match &delegation.transfer_tsig {
        Some(key) => Some(
            super::tsig_signer(&key.key_name, key.algorithm, &key.secret)
                .map_err(std::io::Error::other)?,
        ),
        None => None,
    };
    let answerer = Arc::new(Answerer {
        server,
        transfer_signer,
        delegation,
        zone: Mutex::new(None),
        serial: Mutex::new(0),
        rate: Mutex::new(HashMap::new()),
    });
    // One receive loop per core on the same socket: answers are built
    // without locks but the zone's.
    let udp = Arc::new(udp);
    let loops = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    for _ in 0..loops {
        tokio::spawn(udp_loop(Arc::clone(&answerer), Arc::clone(&udp)));
    }
    if !answerer.delegation.notify.is_empty() {
        tokio::spawn(notify_loop(Arc::clone(&answerer)));
    }
    tokio::spawn(tcp_loop(answerer, tcp));
    tracing::info!(dns = %bound, "answering DNS for the delegation zone");
    Ok(bound)
}

struct Answerer {
    server: Arc<Server>,
    delegation: Delegation,
    /// `[delegation.transfer_tsig]`, ready to verify and sign.
    transfer_signer: Option<TSigner>,
    zone: Mutex<Option<Arc<Zone>>>,
    /// The last serial handed out (bumped for every new zone).
    serial: Mutex<u32>,
    /// Client network → (window start, answers in it).
    rate: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Answerer {
    /// The zone of the current snapshot (rebuilt when the generation moved).
    fn zone(&self) -> Option<Arc<Zone>> {
        let generation = self.server.generation();
        let mut slot = crate::sync::lock(&self.zone);
        if let Some(z) = slot.as_ref()
            && z.generation == generation
        {
            return Some(Arc::clone(z));
        }
        let serial = {
            let mut last = crate::sync::lock(&self.serial);
            let now = u32::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            )
            .unwrap_or(u32::MAX);
            *last = now.max(last.wrapping_add(1));
            *last
        };
        match build(&self.server, &self.delegation, serial) {
            Ok(z) => {
                let z = Arc::new(z);
                *slot = Some(Arc::clone(&z));
                Some(z)
            }
            Err(e) => {
                tracing::error!("delegation zone: {e}");
                slot.clone()
            }
        }
    }

    /// Whether to answer a UDP query from `ip` in full (`Some(true)`),
    /// truncated so the client retries over TCP (`Some(false)`: every
    /// second answer over the limit, RRL's "slip"), or not at all.
    fn allowed(&self, ip: IpAddr) -> Option<bool> {
        let limit = self.delegation.dns_rate_limit;
        if limit == 0 {
            return Some(true);
        }
        let net = match ip {
            IpAddr::V4(v4) => IpAddr::V4(std::net::Ipv4Addr::from_bits(v4.to_bits() & 0xffff_ff00)),
            IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from_bits(
                v6.to_bits() & !((1u128 << 72) - 1),
            )),
        };
        let mut rate = crate::sync::lock(&self.rate);
        let now = Instant::now();
        if rate.len() > 100_000 {
            rate.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(1));
        }
        let entry = rate.entry(net).or_insert((now, 0));
        if now.duration_since(entry.0) >= Duration::from_secs(1) {
            *entry = (now, 0);
        }
        entry.1 += 1;
        if entry.1 <= limit {
            Some(true)
        } else {
            entry.1.is_multiple_of(2).then_some(false)
        }
    }

    /// The answer to `query` (`None`: not a query worth answering).
    fn answer(&self, query: &[u8], udp: bool) -> Option<Vec<u8>> {
        let request = Message::from_vec(query).ok()?;
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut resp = Message::response(request.metadata.id, request.metadata.op_code);
        resp.metadata.recursion_desired = request.metadata.recursion_desired;
        resp.metadata.recursion_available = false;
        let limit = match &request.edns {
            Some(edns) => {
                let mut ours = Edns::new();
                ours.set_max_payload(MAX_UDP as u16);
                resp.set_edns(ours);
                usize::from(edns.max_payload()).clamp(512, MAX_UDP)
            }
            None => 512,
        };
        let [q] = request.queries.as_slice() else {
            resp.metadata.response_code = ResponseCode::FormErr;
            return resp.to_vec().ok();
        };
        resp.add_query(q.clone());
        // A signed query (a secondary's SOA check) gets a signed answer; one
        // signed with a key we do not have gets NOTAUTH (RFC 8945 5.2).
        let mut signing = None;
        if request.signature().is_some() {
            let verified = match &self.transfer_signer {
                Some(signer) => verify_request(signer, &request, query)
                    .map(|mac| ResponseSigner::new(signer.clone(), request.metadata.id, mac)),
                None => Err(Refused {
                    code: ResponseCode::NotAuth,
                    tsig: request.signature().and_then(|sig| {
                        TSigResponseContext::unknown_key(
                            request.metadata.id,
                            unix_now(),
                            sig.name.clone(),
                        )
                        .sign(&[])
                        .ok()
                    }),
                    reason: "no transfer_tsig key is configured".to_owned(),
                }),
            };
            match verified {
                Ok(s) => signing = Some(s),
                Err(refused) => {
                    tracing::debug!("DNS: signed query refused: {}", refused.reason);
                    resp.metadata.response_code = refused.code;
                    if let Some(tsig) = refused.tsig {
                        resp.set_signature(tsig);
                    }
                    return resp.to_vec().ok();
                }
            }
        }
        if request.metadata.op_code != OpCode::Query {
            resp.metadata.response_code = ResponseCode::NotImp;
            return resp.to_vec().ok();
        }
        let zone = self.zone()?;
        let qname = q.name().to_lowercase();
        if !zone.apex.zone_of(&qname) {
            resp.metadata.response_code = ResponseCode::Refused;
            return resp.to_vec().ok();
        }
        resp.metadata.authoritative = true;
        let qtype = q.query_type();
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            // Transfers go over TCP (and only to `allow_transfer`).
            resp.metadata.response_code = ResponseCode::Refused;
            return resp.to_vec().ok();
        }
        if qname == zone.apex {
            match qtype {
                RecordType::SOA => {
                    resp.add_answer(zone.soa.clone());
                }
                RecordType::NS => {
                    resp.add_answers(zone.ns.iter().cloned());
                }
                RecordType::ANY => {
                    resp.add_answer(zone.soa.clone());
                    resp.add_answers(zone.ns.iter().cloned());
                }
                _ => {
                    resp.add_authority(zone.soa.clone());
                }
            }
        } else {
            // A customer's TXT exists once its policy host can be served.
            let found: Option<Vec<Rr>> = match zone.extra.get(&qname) {
                Some(records) => Some(records.clone()),
                None => zone
                    .customer(&qname, &self.delegation)
                    .filter(|(_, host)| self.server.has_certificate(host))
                    .map(|(rr, _)| vec![rr]),
            };
            match found {
                None => {
                    resp.metadata.response_code = ResponseCode::NXDomain;
                    resp.add_authority(zone.soa.clone());
                    if let Some(domain) = domain_of_query(&qname.to_ascii(), &self.delegation.zone)
                    {
                        self.server
                            .first_contact(&domain, crate::server::FirstContact::Dns);
                    }
                }
                Some(records) => {
                    let matching: Vec<Rr> = records
                        .into_iter()
                        .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
                        .collect();
                    if matching.is_empty() {
                        resp.add_authority(zone.soa.clone());
                    } else {
                        resp.add_answers(matching);
                    }
                }
            }
        }
        let mut wire = resp.to_vec().ok()?;
        if udp && wire.len() > limit {
            resp = resp.truncate();
            wire = resp.to_vec().ok()?;
        }
        if let Some(mut signer) = signing {
            resp.set_signature(signer.sign(&wire)?);
            wire = resp.to_vec().ok()?;
        }
        Some(wire)
    }
}

/// The domain a DNS query for `qname` (lowercase, absolute, inside `zone`)
/// is a first contact of: `<domain>.<zone>` (hashed names cannot be
/// reversed and are left alone).
pub fn domain_of_query(qname: &str, zone: &crate::policy::DomainName) -> Option<String> {
    let name = qname.strip_suffix('.').unwrap_or(qname);
    let head = name.strip_suffix(zone.as_str())?.strip_suffix('.')?;
    if head.starts_with("h-") && !head.contains('.') {
        return None;
    }
    Some(head.to_owned())
}

use super::{TSIG_FUDGE as FUDGE, unix_now};

/// A request that may not transfer: the answer's code, its TSIG (unsigned
/// for BADKEY and BADSIG, signed for BADTIME) and why, for the log.
struct Refused {
    code: ResponseCode,
    tsig: Option<Box<Rr<hickory_proto::rr::rdata::tsig::TSIG>>>,
    reason: String,
}

/// The request's MAC when it is signed with `signer`'s key, correctly and
/// in time; otherwise the answer to send.
fn verify_request(signer: &TSigner, request: &Message, wire: &[u8]) -> Result<Vec<u8>, Refused> {
    let now = unix_now();
    let id = request.metadata.id;
    let Some(sig) = request.signature() else {
        return Err(Refused {
            code: ResponseCode::Refused,
            tsig: None,
            reason: "not TSIG-signed, and transfer_tsig is configured".to_owned(),
        });
    };
    let key_name = sig.name.clone();
    match signer.verify_message_byte(wire, None, true) {
        Err(hickory_proto::dnssec::DnsSecError::TsigWrongKey) => Err(Refused {
            code: ResponseCode::NotAuth,
            tsig: TSigResponseContext::unknown_key(id, now, key_name.clone())
                .sign(&[])
                .ok(),
            reason: format!("signed with another key ({key_name}): BADKEY"),
        }),
        Err(e) => Err(Refused {
            code: ResponseCode::NotAuth,
            tsig: TSigResponseContext::bad_signature(id, now, signer.clone())
                .sign(&[])
                .ok(),
            reason: format!("the signature does not verify ({e}): BADSIG"),
        }),
        Ok((mac, time, window)) if !window.contains(&now) => Err(Refused {
            code: ResponseCode::NotAuth,
            tsig: {
                let mut head = Message::response(id, OpCode::Query);
                head.add_queries(request.queries.iter().cloned());
                head.metadata.response_code = ResponseCode::NotAuth;
                head.to_vec().ok().and_then(|bytes| {
                    TSigResponseContext::new(
                        id,
                        now,
                        signer.clone(),
                        mac,
                        Some(hickory_proto::rr::rdata::tsig::TsigError::BadTime),
                    )
                    .sign(&bytes)
                    .ok()
                })
            },
            reason: format!("signed at {time}, now is {now} (more than {FUDGE} s apart): BADTIME"),
        }),
        Ok((mac, _, _)) => Ok(mac),
    }
}

/// Signs the messages of one transfer (RFC 8945 section 5.3.1): the first
/// over the request's MAC and the full TSIG variables, each later one over
/// the previous MAC and the timers only.
struct ResponseSigner {
    signer: TSigner,
    id: u16,
    previous_mac: Vec<u8>,
    first: bool,
}

impl ResponseSigner {
    fn new(signer: TSigner, id: u16, request_mac: Vec<u8>) -> ResponseSigner {
        ResponseSigner {
            signer,
            id,
            previous_mac: request_mac,
            first: true,
        }
    }

    fn sign(&mut self, unsigned: &[u8]) -> Option<Box<Rr<hickory_proto::rr::rdata::tsig::TSIG>>> {
        use hickory_proto::rr::rdata::tsig::{TSIG, make_tsig_record};
        let now = unix_now();
        let record = if self.first {
            self.first = false;
            TSigResponseContext::new(
                self.id,
                now,
                self.signer.clone(),
                self.previous_mac.clone(),
                None,
            )
            .sign(unsigned)
            .ok()?
        } else {
            let mut tbs = Vec::with_capacity(unsigned.len() + self.previous_mac.len() + 10);
            tbs.extend_from_slice(&u16::try_from(self.previous_mac.len()).ok()?.to_be_bytes());
            tbs.extend_from_slice(&self.previous_mac);
            tbs.extend_from_slice(unsigned);
            tbs.extend_from_slice(&((now >> 32) as u16).to_be_bytes());
            tbs.extend_from_slice(&(now as u32).to_be_bytes());
            tbs.extend_from_slice(&FUDGE.to_be_bytes());
            let mac = self.signer.sign(&tbs).ok()?;
            Box::new(make_tsig_record(
                self.signer.signer_name().clone(),
                TSIG::new(
                    self.signer.algorithm().clone(),
                    now,
                    FUDGE,
                    mac,
                    self.id,
                    None,
                    Vec::new(),
                ),
            ))
        };
        self.previous_mac = record.data.mac.clone();
        Some(record)
    }
}

/// Records per AXFR message (each well under the 64 KiB limit).
const AXFR_CHUNK: usize = 300;

impl Answerer {
    /// An AXFR (RFC 5936) of the zone for an allowed client: `None` when
    /// `query` is not an AXFR; a REFUSED answer for anyone not in
    /// `allow_transfer`.
    fn transfer(&self, query: &[u8], peer: IpAddr) -> Option<Vec<Vec<u8>>> {
        let request = Message::from_vec(query).ok()?;
        let q = request.queries.first()?;
        // An IXFR is answered with the whole zone (RFC 1995 section 4).
        if !matches!(q.query_type(), RecordType::AXFR | RecordType::IXFR) {
            return None;
        }
        let mut head = Message::response(request.metadata.id, OpCode::Query);
        head.add_query(q.clone());
        let zone = self.zone()?;
        let peer = match peer {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
            v4 => v4,
        };
        if q.name().to_lowercase() != zone.apex || !self.delegation.allow_transfer.contains(&peer) {
            tracing::info!(%peer, "DNS: zone transfer refused");
            head.metadata.response_code = ResponseCode::Refused;
            return Some(vec![head.to_vec().ok()?]);
        }
        // With a key, only a request signed with it (RFC 8945 section 5.2).
        let mut signing = match &self.transfer_signer {
            None => None,
            Some(signer) => match verify_request(signer, &request, query) {
                Ok(mac) => Some(ResponseSigner::new(
                    signer.clone(),
                    request.metadata.id,
                    mac,
                )),
                Err(answer) => {
                    tracing::warn!(%peer, "DNS: zone transfer refused: {}", answer.reason);
                    let mut refused = head;
                    refused.metadata.response_code = answer.code;
                    if let Some(tsig) = answer.tsig {
                        refused.set_signature(tsig);
                    }
                    return Some(vec![refused.to_vec().ok()?]);
                }
            },
        };
        head.metadata.authoritative = true;
        let mut all = vec![zone.soa.clone()];
        all.extend(zone.ns.iter().cloned());
        let mut owners: Vec<&Name> = zone.extra.keys().collect();
        owners.sort();
        for owner in owners {
            all.extend(zone.extra.get(owner).into_iter().flatten().cloned());
        }
        for site in zone.snapshot.sites() {
            let host = site.host();
            if !self.server.has_certificate(&host) {
                continue;
            }
            for r in crate::dns::provider_records(&**site, &self.delegation) {
                if let Ok(owner) = Name::from_ascii(&r.name) {
                    let text = r.value.trim_matches('"').to_owned();
                    all.push(Rr::from_rdata(
                        owner.to_lowercase(),
                        r.ttl,
                        RData::TXT(TXT::new(vec![text])),
                    ));
                }
            }
        }
        all.push(zone.soa.clone());
        let mut out = Vec::new();
        for chunk in all.chunks(AXFR_CHUNK) {
            let mut msg = head.clone();
            msg.add_answers(chunk.iter().cloned());
            if let Some(signer) = &mut signing {
                let tsig = signer.sign(&msg.to_vec().ok()?)?;
                msg.set_signature(tsig);
            }
            out.push(msg.to_vec().ok()?);
        }
        tracing::info!(
            %peer,
            records = all.len(),
            signed = signing.is_some(),
            "DNS: zone transferred"
        );
        Some(out)
    }

    /// Tells every `notify` target that the zone changed (RFC 1996), a few
    /// times until each acknowledges.
    async fn notify(&self) {
        let Some(zone) = self.zone() else {
            return;
        };
        for target in &self.delegation.notify {
            let mut msg = Message::new(fastrand::u16(..), MessageType::Query, OpCode::Notify);
            msg.metadata.authoritative = true;
            msg.add_query(hickory_proto::op::Query::query(
                zone.apex.clone(),
                RecordType::SOA,
            ));
            let Ok(wire) = msg.to_vec() else {
                continue;
            };
            let bind: SocketAddr = if target.is_ipv6() {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            };
            let Ok(socket) = UdpSocket::bind(bind).await else {
                continue;
            };
            let mut acked = false;
            for _ in 0..5 {
                if socket.send_to(&wire, target).await.is_err() {
                    break;
                }
                let mut buf = [0u8; 512];
                if let Ok(Ok((n, _))) =
                    tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf)).await
                    && Message::from_vec(&buf[..n]).is_ok_and(|m| m.metadata.id == msg.metadata.id)
                {
                    acked = true;
                    break;
                }
            }
            if acked {
                tracing::info!(%target, "DNS: NOTIFY acknowledged");
            } else {
                tracing::warn!(%target, "DNS: NOTIFY not acknowledged; the secondary refreshes on its own schedule");
            }
        }
    }
}

/// Sends NOTIFY whenever a new snapshot changes the zone.
async fn notify_loop(answerer: Arc<Answerer>) {
    let mut seen = answerer.server.generation();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = answerer.server.generation();
        if now != seen {
            seen = now;
            answerer.notify().await;
        }
    }
}

async fn udp_loop(answerer: Arc<Answerer>, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "DNS: UDP receive failed");
                continue;
            }
        };
        let Some(full) = answerer.allowed(peer.ip()) else {
            continue;
        };
        let answer = if full {
            answerer.answer(&buf[..n], true)
        } else {
            Message::from_vec(&buf[..n])
                .ok()
                .filter(|m| m.metadata.message_type == MessageType::Query)
                .and_then(|m| {
                    let mut tc = Message::response(m.metadata.id, m.metadata.op_code);
                    tc.add_queries(m.queries.iter().cloned());
                    tc.metadata.truncation = true;
                    tc.to_vec().ok()
                })
        };
        if let Some(answer) = answer {
            let _ = socket.send_to(&answer, peer).await;
        }
    }
}

async fn tcp_loop(answerer: Arc<Answerer>, listener: TcpListener) {
    let open = Arc::new(tokio::sync::Semaphore::new(256));
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            continue;
        };
        let answerer = Arc::clone(&answerer);
        tokio::spawn(async move {
            let _permit = permit;
            // Several queries may follow on one connection (RFC 7766).
            for _ in 0..100 {
                let read = async {
                    let len = stream.read_u16().await? as usize;
                    let mut query = vec![0u8; len];
                    stream.read_exact(&mut query).await?;
                    Ok::<_, std::io::Error>(query)
                };
                let Ok(Ok(query)) = tokio::time::timeout(TCP_TIMEOUT, read).await else {
                    return;
                };
                let answers = match answerer.transfer(&query, peer.ip()) {
                    Some(messages) => messages,
                    None => match answerer.answer(&query, false) {
                        Some(answer) => vec![answer],
                        None => return,
                    },
                };
                for answer in answers {
                    let Ok(len) = u16::try_from(answer.len()) else {
                        return;
                    };
                    let mut out = len.to_be_bytes().to_vec();
                    out.extend_from_slice(&answer);
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::DomainName;

    #[test]
    fn queries_map_to_the_customer_domain() {
        let zone = DomainName::parse("sts.provider.example").expect("valid");
        assert_eq!(
            domain_of_query("a.example.sts.provider.example.", &zone).as_deref(),
            Some("a.example")
        );
        assert_eq!(domain_of_query("sts.provider.example.", &zone), None);
        assert_eq!(domain_of_query("xsts.provider.example.", &zone), None);
        assert_eq!(
            domain_of_query(
                "h-0123456789abcdef0123456789abcdef.sts.provider.example.",
                &zone
            ),
            None
        );
    }
}
