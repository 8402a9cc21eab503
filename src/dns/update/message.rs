//! RFC 2136 messages of a push, built without I/O: RRsets from records,
//! the queries that read them, the UPDATEs with their prerequisites, and
//! the rule that a TXT not of our kind is never replaced.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Message, Query, UpdateMessage};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record as Rr, RecordType};

use super::{PushError, Rrset};
use crate::dns::{Record, txt_text};

pub(super) fn record_error(r: &Record, detail: impl std::fmt::Display) -> PushError {
    PushError::Record {
        what: format!("{} {} {:?}", r.name, r.rtype, r.value),
        detail: detail.to_string(),
    }
}

pub(super) fn rdata(r: &Record) -> Result<(RecordType, RData), PushError> {
    Ok(match r.rtype {
        "TXT" => (
            RecordType::TXT,
            RData::TXT(TXT::from_bytes(crate::dns::txt_strings(&r.value))),
        ),
        "A" => {
            let a: Ipv4Addr = r.value.parse().map_err(|e| record_error(r, e))?;
            (RecordType::A, RData::A(A(a)))
        }
        "AAAA" => {
            let a: Ipv6Addr = r.value.parse().map_err(|e| record_error(r, e))?;
            (RecordType::AAAA, RData::AAAA(AAAA(a)))
        }
        "CNAME" => {
            let n = Name::from_ascii(&r.value).map_err(|e| record_error(r, e))?;
            (RecordType::CNAME, RData::CNAME(CNAME(n)))
        }
        other => return Err(record_error(r, format!("type {other} is not pushed"))),
    })
}

/// Groups records into RRsets inside `zone`; names outside it are returned
/// separately. `ttl` overrides every record's TTL.
pub fn rrsets(
    records: &[Record],
    zone: &Name,
    ttl: Option<u32>,
) -> Result<(Vec<Rrset>, Vec<String>), PushError> {
    let mut sets: Vec<Rrset> = Vec::new();
    // (lowercase owner, type) → index in `sets`: linear search would be
    // quadratic at 100k domains.
    let mut index: HashMap<(String, RecordType), usize> = HashMap::new();
    let mut outside = Vec::new();
    for r in records {
        let name = Name::from_ascii(&r.name).map_err(|e| record_error(r, e))?;
        if !zone.zone_of(&name) {
            outside.push(r.name.clone());
            continue;
        }
        let (rtype, data) = rdata(r)?;
        let ttl = ttl.unwrap_or(r.ttl);
        let key = (r.name.to_ascii_lowercase(), rtype);
        match index.get(&key).and_then(|&i| sets.get_mut(i)) {
            Some(set) => {
                if !set.data.contains(&data) {
                    set.data.push(data);
                }
                set.ttl = set.ttl.min(ttl);
            }
            None => {
                index.insert(key, sets.len());
                sets.push(Rrset {
                    domain: r.domain.clone(),
                    name,
                    rtype,
                    ttl,
                    data: vec![data],
                });
            }
        }
    }
    Ok((sets, outside))
}

/// A plain query for one RRset (no recursion: we ask the primary).
pub fn query_message(name: &Name, rtype: RecordType) -> Message {
    let mut msg = Message::query();
    msg.metadata.recursion_desired = false;
    msg.add_query(Query::query(name.clone(), rtype));
    msg
}

/// One RRset and what the server holds for it now.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    pub want: &'a Rrset,
    pub current: Vec<Rr>,
}

/// The UPDATE for some RRsets of one zone (RFC 2136 §2): for each, the
/// prerequisite that the RRset is exactly `current` (value-dependent,
/// §2.4.2) or absent (§2.4.3), then delete the RRset (§2.5.2) and add the
/// wanted records (§2.5.1).
pub fn update_message(zone: &Name, changes: &[Change<'_>]) -> Message {
    let mut msg = Message::query();
    msg.metadata.op_code = hickory_proto::op::OpCode::Update;
    msg.metadata.recursion_desired = false;
    let mut z = Query::new();
    z.set_name(zone.clone())
        .set_query_class(DNSClass::IN)
        .set_query_type(RecordType::SOA);
    msg.add_zone(z);
    for c in changes {
        let want = c.want;
        if c.current.is_empty() {
            let mut absent = Rr::update0(want.name.clone(), 0, want.rtype);
            absent.dns_class = DNSClass::NONE;
            msg.add_pre_requisite(absent);
        } else {
            for cur in &c.current {
                let mut exact = Rr::from_rdata(want.name.clone(), 0, cur.data.clone());
                exact.dns_class = DNSClass::IN;
                msg.add_pre_requisite(exact);
            }
            let mut delete = Rr::update0(want.name.clone(), 0, want.rtype);
            delete.dns_class = DNSClass::ANY;
            msg.add_update(delete);
        }
        for data in &want.data {
            msg.add_update(Rr::from_rdata(want.name.clone(), want.ttl, data.clone()));
        }
    }
    msg
}

/// Records to delete from one RRset, and what the server held for it.
#[derive(Debug, Clone)]
pub struct Removal<'a> {
    pub set: &'a Rrset,
    pub current: Vec<Rr>,
    /// Part of `current`: the records mtasts published there.
    pub delete: Vec<RData>,
}

/// The records of `current` that are ours to delete: at a TXT owner those
/// of our kind (the same `v=` tag, as [`check_owned`] decides), elsewhere
/// exactly the values we published. Everything else stays.
pub fn ours(set: &Rrset, current: &[Rr]) -> Vec<RData> {
    let wanted_tag = set.data.first().and_then(txt_text);
    current
        .iter()
        .filter(|c| match &wanted_tag {
            Some(want) => txt_text(&c.data).is_some_and(|t| tag(&t) == tag(want)),
            None => set.data.contains(&c.data),
        })
        .map(|c| c.data.clone())
        .collect()
}

/// The UPDATE that deletes our records (RFC 2136 §2.5.4, one RR at a time,
/// so records of others at the same name stay), on the prerequisite that
/// each RRset is still exactly what we read (§2.4.2).
pub fn delete_message(zone: &Name, removals: &[Removal<'_>]) -> Message {
    let mut msg = Message::query();
    msg.metadata.op_code = hickory_proto::op::OpCode::Update;
    msg.metadata.recursion_desired = false;
    let mut z = Query::new();
    z.set_name(zone.clone())
        .set_query_class(DNSClass::IN)
        .set_query_type(RecordType::SOA);
    msg.add_zone(z);
    for r in removals {
        for cur in &r.current {
            let mut exact = Rr::from_rdata(r.set.name.clone(), 0, cur.data.clone());
            exact.dns_class = DNSClass::IN;
            msg.add_pre_requisite(exact);
        }
        for data in &r.delete {
            let mut delete = Rr::from_rdata(r.set.name.clone(), 0, data.clone());
            delete.dns_class = DNSClass::NONE;
            msg.add_update(delete);
        }
    }
    msg
}

/// Consecutive RRsets of the same domain, with the domain.
pub(super) fn by_domain(sets: &[Rrset]) -> Vec<(&str, &[Rrset])> {
    let mut out: Vec<(&str, &[Rrset])> = Vec::new();
    let mut start = 0;
    for (i, set) in sets.iter().enumerate() {
        let next_differs = sets.get(i + 1).is_none_or(|n| n.domain != set.domain);
        if next_differs {
            out.push((set.domain.as_str(), sets.get(start..=i).unwrap_or_default()));
            start = i + 1;
        }
    }
    out
}

/// `name TYPE` of each changed RRset, for reports.
pub(super) fn change_names(changes: &[Change<'_>]) -> Vec<String> {
    changes
        .iter()
        .map(|c| format!("{} {}", c.want.name.to_ascii(), c.want.rtype))
        .collect()
}

pub(super) fn show(data: &RData) -> String {
    txt_text(data).unwrap_or_else(|| data.to_string())
}

/// The version tag a TXT of ours starts with (`v=STSv1`, `v=TLSRPTv1`).
pub(super) fn tag(text: &str) -> &str {
    text.split(';').next().unwrap_or(text).trim()
}

/// Whether the server's RRset already is what we want.
pub(super) fn matches(want: &Rrset, current: &[Rr]) -> bool {
    current.len() == want.data.len()
        && current
            .iter()
            .all(|c| c.ttl == want.ttl && want.data.contains(&c.data))
}

/// Refuses to replace TXT records that are not ours (RFC 8461 §3.1 allows
/// exactly one STSv1 record; anything else there was put by someone else).
pub(super) fn check_owned(want: &Rrset, current: &[Rr]) -> Result<(), PushError> {
    let Some(wanted) = want.data.first().and_then(txt_text) else {
        return Ok(());
    };
    let wanted_tag = tag(&wanted);
    for c in current {
        let text = txt_text(&c.data).unwrap_or_default();
        if tag(&text) != wanted_tag {
            return Err(PushError::Foreign {
                name: want.name.to_ascii(),
                rtype: want.rtype.to_string(),
                found: text,
                tag: wanted_tag.to_owned(),
            });
        }
    }
    Ok(())
}
