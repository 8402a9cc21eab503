//! RFC 2136 dynamic updates signed with TSIG (RFC 8945): keeps the records
//! of [`super::records`] current on a primary DNS server.
//!
//! Per domain: read each RRset we own, skip it if it already matches, else
//! send an UPDATE (shared by up to 64 domains) whose prerequisites say "the
//! RRset is still exactly what we just read" (RFC 2136 §2.4.2, or §2.4.3
//! "does not exist"), so a concurrent edit makes the server refuse instead
//! of being overwritten; we then re-read and retry domain by domain. A TXT that is not the kind we publish (not
//! `v=STSv1` at `_mta-sts`, not `v=TLSRPTv1` at `_smtp._tls`) is never
//! replaced. `dns push --prune` deletes a retired domain's records the same
//! way, record by record, leaving records of other kinds in place. Message
//! building is pure; [`Transport`] does the I/O.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::tsig::TsigError;
use hickory_proto::rr::{Name, RData, Record as Rr, RecordType, TSigner};

mod message;
mod transport;

pub use message::{Change, Removal, delete_message, ours, query_message, rrsets, update_message};
use message::{by_domain, change_names, check_owned, matches, show};
pub use transport::Transport;

use super::{Record, Side};
use crate::config::{Config, DnsUpdate};

/// TSIG fudge (RFC 8945 §5.2.3): allowed clock difference, in seconds.
use super::{TSIG_FUDGE as FUDGE, unix_now};

/// How often one domain is re-read and re-sent when its prerequisites fail
/// because someone else changed the records in between.
const PREREQ_ATTEMPTS: u32 = 3;

/// Answers to an UPDATE that mean its prerequisites (the RRsets as we read
/// them) failed: someone changed the records meanwhile. YXDOMAIN/NXDOMAIN
/// are retried too (a re-read shows what is there now), so a name created
/// or removed meanwhile is re-planned rather than reported as an error.
const UPDATE_RETRY: &[ResponseCode] = &[
    ResponseCode::YXRRSet,
    ResponseCode::NXRRSet,
    ResponseCode::YXDomain,
    ResponseCode::NXDomain,
];
/// For a deletion of our records, only a changed RRset is retried.
const PRUNE_RETRY: &[ResponseCode] = &[ResponseCode::YXRRSet, ResponseCode::NXRRSet];

fn contended(domain: &str) -> PushError {
    PushError::Contended {
        domain: domain.to_owned(),
        attempts: PREREQ_ATTEMPTS,
    }
}

/// Domains whose changes share one UPDATE message.
const BATCH_DOMAINS: usize = 64;

/// Largest batched UPDATE before TSIG; bigger batches go domain by domain.
const MAX_BATCH_BYTES: usize = 60 * 1024;

/// First retry delay after a network failure; doubles each attempt.
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why a push (or one domain of it) failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("cannot reach DNS server {server} (tried {attempts} times): {last}")]
    Unreachable {
        server: SocketAddr,
        attempts: u32,
        last: String,
    },
    #[error("DNS server {server} rejected TSIG key {key:?}: {reason}")]
    Auth {
        server: SocketAddr,
        key: String,
        reason: String,
    },
    #[error(
        "DNS server {server} refused the update of zone {zone} (REFUSED): the key may not be allowed to update this zone"
    )]
    Refused { server: SocketAddr, zone: String },
    #[error("DNS server {server} is not the primary for zone {zone} ({rcode})")]
    NotAuthoritative {
        server: SocketAddr,
        zone: String,
        rcode: String,
    },
    #[error("answer from {server} failed TSIG verification: {detail}")]
    ResponseSignature { server: SocketAddr, detail: String },
    #[error(
        "{name} {rtype}: refusing to replace {found:?}, which is not a {tag} record mtasts publishes; remove it by hand"
    )]
    Foreign {
        name: String,
        rtype: String,
        found: String,
        tag: String,
    },
    #[error("{name}: has a CNAME, so it cannot also hold {rtype}; remove the CNAME by hand")]
    CnameConflict { name: String, rtype: String },
    #[error(
        "{domain}: the records changed on the server during the update {attempts} times in a row"
    )]
    Contended { domain: String, attempts: u32 },
    #[error(
        "{name} {rtype}: the server accepted the update but still serves {found:?} (servers silently skip e.g. a CNAME where other records exist at the name)"
    )]
    NotApplied {
        name: String,
        rtype: String,
        found: Vec<String>,
    },
    #[error("DNS server {server} answered {rcode} ({what})")]
    Unexpected {
        server: SocketAddr,
        rcode: String,
        what: &'static str,
    },
    #[error("invalid record {what}: {detail}")]
    Record { what: String, detail: String },
    #[error("DNS message: {0}")]
    Proto(String),
}

impl PushError {
    /// Errors that would hit every other domain the same way: stop at once.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            PushError::Unreachable { .. }
                | PushError::Auth { .. }
                | PushError::Refused { .. }
                | PushError::NotAuthoritative { .. }
                | PushError::ResponseSignature { .. }
                | PushError::Proto(_)
        )
    }
}

/// One RRset we want on the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Rrset {
    /// The policy domain, for grouping and messages.
    pub domain: String,
    pub name: Name,
    pub rtype: RecordType,
    pub ttl: u32,
    pub data: Vec<RData>,
}

/// What happened to one domain.
#[derive(Debug)]
pub enum Outcome {
    /// Everything already matched; nothing was sent.
    Unchanged,
    /// One UPDATE changed these RRsets (`name TYPE`).
    Updated(Vec<String>),
    /// `--dry-run`: these RRsets would be changed.
    WouldUpdate(Vec<String>),
    /// `--prune`: our records were deleted from these RRsets.
    Deleted(Vec<String>),
    /// `--prune --dry-run`: our records would be deleted from these RRsets.
    WouldDelete(Vec<String>),
    Failed(PushError),
}

/// The result of a whole push.
#[derive(Debug, Default)]
pub struct PushReport {
    /// In order, per domain.
    pub domains: Vec<(String, Outcome)>,
    /// Records outside the update zone, not pushed.
    pub outside_zone: Vec<String>,
    /// Set when the push stopped early (later domains were not tried).
    pub aborted: Option<PushError>,
}

impl PushReport {
    /// Domains whose records are in DNS now (updated or already there).
    pub fn published(&self) -> std::collections::HashSet<&str> {
        self.domains
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Updated(_) | Outcome::Unchanged))
            .map(|(d, _)| d.as_str())
            .collect()
    }

    pub fn failed(&self) -> usize {
        self.domains
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
            .count()
            + usize::from(self.aborted.is_some())
    }
}

/// Pushes records to the `[dns.update]` server.
pub struct Pusher {
    cfg: DnsUpdate,
    zone: Name,
    signer: TSigner,
    transport: Transport,
    dry_run: bool,
}

impl Pusher {
    pub fn new(cfg: &DnsUpdate, dry_run: bool) -> Result<Self, PushError> {
        let zone = Name::from_ascii(format!("{}.", cfg.zone))
            .map_err(|e| PushError::Proto(format!("zone {}: {e}", cfg.zone)))?;
        let signer = super::tsig_signer(&cfg.key_name, cfg.algorithm, &cfg.secret)
            .map_err(PushError::Proto)?;
        Ok(Self {
            transport: Transport::new(cfg.server, cfg.timeout, cfg.retries),
            cfg: cfg.clone(),
            zone,
            signer,
            dry_run,
        })
    }

    /// Pushes every record inside the zone. Domains go in batches of
    /// [`BATCH_DOMAINS`]: their changes share one UPDATE (so a first push of
    /// many domains does not cost one server commit each); if that UPDATE's
    /// prerequisites fail, each domain of the batch is retried on its own.
    /// Stops early on errors that would repeat for every domain.
    pub async fn push(&mut self, records: &[Record]) -> PushReport {
        let mut report = PushReport::default();
        let (sets, outside) = match rrsets(records, &self.zone, self.cfg.ttl) {
            Ok(x) => x,
            Err(e) => {
                report.aborted = Some(e);
                return report;
            }
        };
        report.outside_zone = outside;
        let groups = by_domain(&sets);
        for batch in groups.chunks(BATCH_DOMAINS) {
            match self.push_batch(batch).await {
                Ok(outcomes) => report.domains.extend(outcomes),
                Err((done, e)) => {
                    report.domains.extend(done);
                    report.aborted = Some(e);
                    break;
                }
            }
        }
        report
    }

    /// Reads what the server holds for `sets`; the RRsets that differ.
    async fn plan<'s>(&mut self, sets: &'s [Rrset]) -> Result<Vec<Change<'s>>, PushError> {
        let mut changes = Vec::new();
        for want in sets {
            let current = self.read(want).await?;
            check_owned(want, &current)?;
            if !matches(want, &current) {
                changes.push(Change { want, current });
            }
        }
        Ok(changes)
    }

    /// After NOERROR, reads the changed RRsets back: a server may accept an
    /// update and skip parts of it (e.g. a CNAME where other data exists,
    /// RFC 2136 §3.4.2.2).
    async fn confirm(&mut self, changes: &[Change<'_>]) -> Result<Outcome, PushError> {
        for c in changes {
            let now = self.read(c.want).await?;
            if !matches(c.want, &now) {
                return Err(PushError::NotApplied {
                    name: c.want.name.to_ascii(),
                    rtype: c.want.rtype.to_string(),
                    found: now.iter().map(|r| show(&r.data)).collect(),
                });
            }
        }
        Ok(Outcome::Updated(change_names(changes)))
    }

    /// One batch of domains. `Err` carries the outcomes so far and the
    /// fatal error that stopped it.
    async fn push_batch(
        &mut self,
        batch: &[(&str, &[Rrset])],
    ) -> Result<Vec<(String, Outcome)>, (Vec<(String, Outcome)>, PushError)> {
        let mut done: Vec<(String, Outcome)> = Vec::new();
        let mut pending: Vec<(&str, &[Rrset], Vec<Change<'_>>)> = Vec::new();
        for &(domain, sets) in batch {
            match self.plan(sets).await {
                Ok(changes) if changes.is_empty() => {
                    done.push((domain.to_owned(), Outcome::Unchanged))
                }
                Ok(changes) if self.dry_run => done.push((
                    domain.to_owned(),
                    Outcome::WouldUpdate(change_names(&changes)),
                )),
                Ok(changes) => pending.push((domain, sets, changes)),
                Err(e) if e.is_fatal() => return Err((done, e)),
                Err(e) => done.push((domain.to_owned(), Outcome::Failed(e))),
            }
        }
        if pending.is_empty() {
            return Ok(done);
        }
        let all: Vec<Change<'_>> = pending
            .iter()
            .flat_map(|(_, _, c)| c.iter().cloned())
            .collect();
        // Leave room for the TSIG record in a TCP message (64 KiB).
        let fits = update_message(&self.zone, &all)
            .to_vec()
            .is_ok_and(|w| w.len() <= MAX_BATCH_BYTES);
        let batched = if fits && pending.len() > 1 {
            match self.send_update(&all).await {
                Ok(code) => Some(code),
                Err(e) if e.is_fatal() => return Err((done, e)),
                Err(e) => {
                    tracing::info!("batched update failed ({e}); trying each domain");
                    None
                }
            }
        } else {
            None
        };
        for (domain, sets, changes) in pending {
            let outcome = match batched {
                Some(ResponseCode::NoError) => self.confirm(&changes).await,
                // Not sent together, or a prerequisite failed (someone
                // changed something meanwhile): each domain on its own.
                _ => self.push_domain(domain, sets).await,
            };
            match outcome {
                Ok(o) => done.push((domain.to_owned(), o)),
                Err(e) if e.is_fatal() => return Err((done, e)),
                Err(e) => done.push((domain.to_owned(), Outcome::Failed(e))),
            }
        }
        Ok(done)
    }

    /// One domain, one UPDATE, re-read and retried while its prerequisites
    /// fail because the records changed between read and update.
    async fn push_domain(&mut self, domain: &str, sets: &[Rrset]) -> Result<Outcome, PushError> {
        for _ in 0..PREREQ_ATTEMPTS {
            let changes = self.plan(sets).await?;
            if changes.is_empty() {
                return Ok(Outcome::Unchanged);
            }
            if self.dry_run {
                return Ok(Outcome::WouldUpdate(change_names(&changes)));
            }
            match self.send_update(&changes).await? {
                ResponseCode::NoError => return self.confirm(&changes).await,
                rcode => self.prereq_failed(domain, rcode, UPDATE_RETRY)?,
            }
        }
        Err(contended(domain))
    }

    /// After an UPDATE was refused with `rcode`: Ok (re-read and retry)
    /// when `rcode` is one of `retry`, the answers that mean the records
    /// changed between our read and our update; else the error.
    fn prereq_failed(
        &self,
        domain: &str,
        rcode: ResponseCode,
        retry: &[ResponseCode],
    ) -> Result<(), PushError> {
        if retry.contains(&rcode) {
            tracing::info!(
                domain,
                "records changed on the server meanwhile; re-reading"
            );
            return Ok(());
        }
        Err(PushError::Unexpected {
            server: self.cfg.server,
            rcode: rcode.to_string(),
            what: "to an update",
        })
    }

    /// Deletes the records mtasts published for a retired domain
    /// (`dns push --prune`; the caller checked that the period is over):
    /// only our records, only while each RRset is still what was just read,
    /// re-read and retried like an update when it changed meanwhile.
    pub async fn prune(&mut self, domain: &str, records: &[Record]) -> Outcome {
        match self.prune_domain(domain, records).await {
            Ok(o) => o,
            Err(e) => Outcome::Failed(e),
        }
    }

    async fn prune_domain(
        &mut self,
        domain: &str,
        records: &[Record],
    ) -> Result<Outcome, PushError> {
        let (sets, _) = rrsets(records, &self.zone, None)?;
        for _ in 0..PREREQ_ATTEMPTS {
            let mut removals = Vec::new();
            for set in &sets {
                let current = self.read(set).await?;
                let delete = ours(set, &current);
                if !delete.is_empty() {
                    removals.push(Removal {
                        set,
                        current,
                        delete,
                    });
                }
            }
            if removals.is_empty() {
                return Ok(Outcome::Unchanged);
            }
            let names: Vec<String> = removals
                .iter()
                .map(|r| format!("{} {}", r.set.name.to_ascii(), r.set.rtype))
                .collect();
            if self.dry_run {
                return Ok(Outcome::WouldDelete(names));
            }
            match self
                .send_signed(|zone| delete_message(zone, &removals))
                .await?
            {
                ResponseCode::NoError => {
                    for r in &removals {
                        let now = self.read(r.set).await?;
                        let left: Vec<String> = now
                            .iter()
                            .filter(|c| r.delete.contains(&c.data))
                            .map(|c| show(&c.data))
                            .collect();
                        if !left.is_empty() {
                            return Err(PushError::NotApplied {
                                name: r.set.name.to_ascii(),
                                rtype: r.set.rtype.to_string(),
                                found: left,
                            });
                        }
                    }
                    return Ok(Outcome::Deleted(names));
                }
                rcode => self.prereq_failed(domain, rcode, PRUNE_RETRY)?,
            }
        }
        Err(contended(domain))
    }

    /// The RRset the server holds now (empty if none).
    async fn read(&mut self, want: &Rrset) -> Result<Vec<Rr>, PushError> {
        let (resp, id) = self
            .transport
            .exchange(|| {
                let msg = query_message(&want.name, want.rtype);
                let wire = msg.to_vec().map_err(|e| PushError::Proto(e.to_string()))?;
                Ok((wire, msg.id))
            })
            .await?;
        let msg = Message::from_vec(&resp).map_err(|e| PushError::Proto(e.to_string()))?;
        if msg.id != id {
            return Err(PushError::Proto(format!(
                "answer id {} does not match query id {id}",
                msg.id
            )));
        }
        match msg.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => {}
            ResponseCode::Refused | ResponseCode::NotAuth | ResponseCode::NotZone => {
                return Err(PushError::NotAuthoritative {
                    server: self.cfg.server,
                    zone: self.cfg.zone.to_string(),
                    rcode: msg.response_code.to_string(),
                });
            }
            other => {
                return Err(PushError::Unexpected {
                    server: self.cfg.server,
                    rcode: other.to_string(),
                    what: "to a query",
                });
            }
        }
        if !msg.metadata.authoritative {
            return Err(PushError::NotAuthoritative {
                server: self.cfg.server,
                zone: self.cfg.zone.to_string(),
                rcode: "answer without the AA bit".to_owned(),
            });
        }
        let mut out = Vec::new();
        for r in &msg.answers {
            if r.name != want.name {
                continue;
            }
            if r.record_type() == RecordType::CNAME && want.rtype != RecordType::CNAME {
                return Err(PushError::CnameConflict {
                    name: want.name.to_ascii(),
                    rtype: want.rtype.to_string(),
                });
            }
            if r.record_type() == want.rtype {
                out.push(r.clone());
            }
        }
        Ok(out)
    }

    /// Signs, sends and checks one UPDATE; returns the server's rcode.
    async fn send_update(&mut self, changes: &[Change<'_>]) -> Result<ResponseCode, PushError> {
        self.send_signed(|zone| update_message(zone, changes)).await
    }

    /// Signs, sends and checks the UPDATE `build` makes for our zone.
    async fn send_signed(
        &mut self,
        build: impl Fn(&Name) -> Message,
    ) -> Result<ResponseCode, PushError> {
        let zone = self.zone.clone();
        let signer = self.signer.clone();
        let (resp, (id, mut verifier)) = self
            .transport
            .exchange(|| {
                let mut msg = build(&zone);
                let verifier = msg
                    .finalize(&signer, unix_now())
                    .map_err(|e| PushError::Proto(format!("TSIG signing: {e}")))?
                    .ok_or_else(|| PushError::Proto("TSIG signer gave no verifier".into()))?;
                let wire = msg.to_vec().map_err(|e| PushError::Proto(e.to_string()))?;
                Ok((wire, (msg.id, verifier)))
            })
            .await?;
        let msg = Message::from_vec(&resp).map_err(|e| PushError::Proto(e.to_string()))?;
        if msg.id != id {
            return Err(PushError::Proto(format!(
                "answer id {} does not match update id {id}",
                msg.id
            )));
        }
        // A rejected key gets an unsigned NOTAUTH with the TSIG error code
        // (RFC 8945 §5.2): report that before trying to verify.
        let tsig_error = msg.signature().and_then(|s| s.data.error);
        if msg.response_code == ResponseCode::NotAuth || tsig_error.is_some() {
            let reason = match tsig_error {
                Some(TsigError::BadSig) => {
                    "BADSIG: the secret does not match the server's (check secret/secret_file and algorithm)".to_owned()
                }
                Some(TsigError::BadKey) => {
                    "BADKEY: the server does not know this key name or algorithm".to_owned()
                }
                Some(TsigError::BadTime) => format!(
                    "BADTIME: the clocks of this host and the server differ by more than {FUDGE} s"
                ),
                Some(other) => format!("TSIG error {other:?}"),
                None => {
                    return Err(PushError::NotAuthoritative {
                        server: self.cfg.server,
                        zone: self.cfg.zone.to_string(),
                        rcode: "NOTAUTH".to_owned(),
                    });
                }
            };
            return Err(PushError::Auth {
                server: self.cfg.server,
                key: self.cfg.key_name.clone(),
                reason,
            });
        }
        verifier
            .verify(&resp)
            .map_err(|e| PushError::ResponseSignature {
                server: self.cfg.server,
                detail: e.to_string(),
            })?;
        match msg.response_code {
            ResponseCode::Refused => Err(PushError::Refused {
                server: self.cfg.server,
                zone: self.cfg.zone.to_string(),
            }),
            ResponseCode::NotZone => Err(PushError::NotAuthoritative {
                server: self.cfg.server,
                zone: self.cfg.zone.to_string(),
                rcode: "NOTZONE".to_owned(),
            }),
            code => Ok(code),
        }
    }
}

/// The records `dns push` sends by default: the provider side when the
/// config delegates, else the full set.
pub fn default_side(config: &Config) -> Side {
    if config.delegation.is_some() {
        Side::Provider
    } else {
        Side::Full
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::txt_text;
    use hickory_proto::op::UpdateMessage;
    use hickory_proto::rr::DNSClass;
    use hickory_proto::rr::rdata::tsig::TsigAlgorithm;
    use hickory_proto::rr::rdata::{A, TXT};

    fn rec(name: &str, rtype: &'static str, value: &str) -> Record {
        Record {
            domain: "a.example.test".into(),
            name: name.into(),
            rtype,
            ttl: 300,
            value: value.into(),
            zone: "a.example.test.".into(),
        }
    }

    fn zone() -> Name {
        Name::from_ascii("example.test.").expect("name")
    }

    #[test]
    fn rrsets_group_and_skip_outside_zone() {
        let recs = [
            rec("_mta-sts.a.example.test.", "TXT", "v=STSv1; id=1;"),
            rec("mta-sts.a.example.test.", "A", "192.0.2.1"),
            rec("mta-sts.a.example.test.", "A", "192.0.2.2"),
            rec("_mta-sts.other.example.", "TXT", "v=STSv1; id=1;"),
        ];
        let (sets, outside) = rrsets(&recs, &zone(), Some(60)).expect("valid");
        assert_eq!(sets.len(), 2);
        assert_eq!(sets[1].data.len(), 2);
        assert!(sets.iter().all(|s| s.ttl == 60));
        assert_eq!(outside, ["_mta-sts.other.example."]);
    }

    #[test]
    fn rrsets_are_grouped_by_domain_in_order() {
        let mut b = rec("_mta-sts.b.example.test.", "TXT", "v=STSv1; id=1;");
        b.domain = "b.example.test".into();
        let recs = [
            rec("_mta-sts.a.example.test.", "TXT", "v=STSv1; id=1;"),
            rec("mta-sts.a.example.test.", "A", "192.0.2.1"),
            b,
        ];
        let (sets, _) = rrsets(&recs, &zone(), None).expect("valid");
        let groups = by_domain(&sets);
        let summary: Vec<(&str, usize)> = groups.iter().map(|(d, s)| (*d, s.len())).collect();
        assert_eq!(summary, [("a.example.test", 2), ("b.example.test", 1)]);
        assert!(by_domain(&[]).is_empty());
    }

    #[test]
    fn update_has_prerequisites_delete_and_add() {
        let recs = [rec("_mta-sts.a.example.test.", "TXT", "v=STSv1; id=2;")];
        let (sets, _) = rrsets(&recs, &zone(), None).expect("valid");
        let old = Rr::from_rdata(
            sets[0].name.clone(),
            300,
            RData::TXT(TXT::new(vec!["v=STSv1; id=1;".into()])),
        );
        let msg = update_message(
            &zone(),
            &[Change {
                want: &sets[0],
                current: vec![old],
            }],
        );
        assert_eq!(msg.op_code, hickory_proto::op::OpCode::Update);
        // Prerequisite: exactly the old record (class IN, TTL 0).
        let pre = msg.prerequisites();
        assert_eq!(pre.len(), 1);
        assert_eq!(pre[0].dns_class, DNSClass::IN);
        assert_eq!(pre[0].ttl, 0);
        // Update: delete the RRset (class ANY), add the new record.
        let upd = msg.updates();
        assert_eq!(upd.len(), 2);
        assert_eq!(upd[0].dns_class, DNSClass::ANY);
        assert_eq!(upd[1].ttl, 300);
        assert_eq!(txt_text(&upd[1].data).as_deref(), Some("v=STSv1; id=2;"));
        // Absent RRset: "does not exist" prerequisite, no delete.
        let msg = update_message(
            &zone(),
            &[Change {
                want: &sets[0],
                current: vec![],
            }],
        );
        assert_eq!(msg.prerequisites()[0].dns_class, DNSClass::NONE);
        assert_eq!(msg.updates().len(), 1);
    }

    #[test]
    fn signed_update_verifies_with_the_same_key() {
        let recs = [rec("_mta-sts.a.example.test.", "TXT", "v=STSv1; id=2;")];
        let (sets, _) = rrsets(&recs, &zone(), None).expect("valid");
        let signer = TSigner::new(
            vec![7u8; 32],
            TsigAlgorithm::HmacSha256,
            Name::from_ascii("k.").expect("name"),
            FUDGE,
        )
        .expect("signer");
        let mut msg = update_message(
            &zone(),
            &[Change {
                want: &sets[0],
                current: vec![],
            }],
        );
        msg.finalize(&signer, 1_700_000_000).expect("sign");
        let wire = msg.to_vec().expect("wire");
        let (_, time, _) = signer
            .verify_message_byte(&wire, None, true)
            .expect("verifies");
        assert_eq!(time, 1_700_000_000);
        let other = TSigner::new(
            vec![8u8; 32],
            TsigAlgorithm::HmacSha256,
            Name::from_ascii("k.").expect("name"),
            FUDGE,
        )
        .expect("signer");
        assert!(other.verify_message_byte(&wire, None, true).is_err());
    }

    #[test]
    fn delete_keeps_foreign_records() {
        let recs = [
            rec("_mta-sts.a.example.test.", "TXT", "v=STSv1; id=2;"),
            rec("mta-sts.a.example.test.", "A", "192.0.2.1"),
        ];
        let (sets, _) = rrsets(&recs, &zone(), None).expect("valid");
        let txt = |t: &str| {
            Rr::from_rdata(
                sets[0].name.clone(),
                300,
                RData::TXT(TXT::new(vec![t.into()])),
            )
        };
        let current = vec![txt("v=STSv1; id=old;"), txt("google-site-verification=x")];
        let delete = ours(&sets[0], &current);
        assert_eq!(delete.len(), 1);
        assert_eq!(txt_text(&delete[0]).as_deref(), Some("v=STSv1; id=old;"));
        let a = |ip: [u8; 4]| Rr::from_rdata(sets[1].name.clone(), 300, RData::A(A(ip.into())));
        let hosts = vec![a([192, 0, 2, 1]), a([192, 0, 2, 9])];
        assert_eq!(ours(&sets[1], &hosts), [hosts[0].data.clone()]);

        let msg = delete_message(
            &zone(),
            &[Removal {
                set: &sets[0],
                current,
                delete,
            }],
        );
        // Prerequisite: the RRset exactly as read (both records).
        assert_eq!(msg.prerequisites().len(), 2);
        assert!(
            msg.prerequisites()
                .iter()
                .all(|p| p.dns_class == DNSClass::IN)
        );
        // Update: delete our one record (class NONE, RFC 2136 §2.5.4).
        let upd = msg.updates();
        assert_eq!(upd.len(), 1);
        assert_eq!(upd[0].dns_class, DNSClass::NONE);
        assert_eq!(upd[0].ttl, 0);
    }

    #[test]
    fn foreign_txt_is_refused() {
        let recs = [rec("_mta-sts.a.example.test.", "TXT", "v=STSv1; id=2;")];
        let (sets, _) = rrsets(&recs, &zone(), None).expect("valid");
        let ours = Rr::from_rdata(
            sets[0].name.clone(),
            300,
            RData::TXT(TXT::new(vec!["v=STSv1; id=old;".into()])),
        );
        assert!(check_owned(&sets[0], std::slice::from_ref(&ours)).is_ok());
        let theirs = Rr::from_rdata(
            sets[0].name.clone(),
            300,
            RData::TXT(TXT::new(vec!["google-site-verification=x".into()])),
        );
        assert!(matches!(
            check_owned(&sets[0], &[ours, theirs]),
            Err(PushError::Foreign { .. })
        ));
    }
}
