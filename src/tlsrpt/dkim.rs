//! DKIM verification of mailed TLS reports (RFC 8460 §5.3.1: a report
//! sent by mail must carry a valid DKIM signature of the reporting
//! domain), through the `mail-auth` crate.

use std::net::SocketAddr;

use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts,
};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};

use crate::config::DkimPolicy;

/// What DKIM said about a mailed report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A signature of `domain` verified.
    Pass { domain: String },
    /// No signature verified; why.
    Fail(String),
}

/// Verifies DKIM signatures, asking `resolver` for the keys (the system's
/// resolver without one).
pub struct Verifier {
    authenticator: MessageAuthenticator,
}

impl Verifier {
    pub fn new(resolver: Option<SocketAddr>) -> Result<Verifier, String> {
        let authenticator = match resolver {
            Some(addr) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                let server = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
                MessageAuthenticator::new(
                    ResolverConfig::from_name_servers(vec![server]),
                    ResolverOpts::default(),
                )
            }
            None => MessageAuthenticator::new_system_conf(),
        }
        .map_err(|e| format!("DKIM resolver: {e}"))?;
        Ok(Verifier { authenticator })
    }

    /// The verdict on the message `raw`.
    pub async fn verify(&self, raw: &[u8]) -> Verdict {
        let Some(message) = AuthenticatedMessage::parse(raw) else {
            return Verdict::Fail("the message cannot be parsed for DKIM".to_owned());
        };
        let results = self.authenticator.verify_dkim(&message).await;
        if results.is_empty() {
            return Verdict::Fail("the message has no DKIM signature".to_owned());
        }
        let mut why = Vec::new();
        for r in &results {
            match r.result() {
                DkimResult::Pass => {
                    let domain = r
                        .signature()
                        .map(|s| s.d.to_ascii_lowercase())
                        .unwrap_or_default();
                    return Verdict::Pass { domain };
                }
                other => why.push(format!("{other}")),
            }
        }
        Verdict::Fail(format!("DKIM did not verify: {}", why.join("; ")))
    }
}

/// Whether a mailed report with `verdict` is stored under `policy`, and
/// what to say about it.
pub fn accept(policy: DkimPolicy, verdict: &Verdict) -> Result<Option<String>, String> {
    match (policy, verdict) {
        (_, Verdict::Pass { domain }) => Ok(Some(format!("DKIM pass (d={domain})"))),
        (DkimPolicy::Require, Verdict::Fail(why)) => Err(format!(
            "{why}; refused (RFC 8460 section 5.3.1; set [tlsrpt] dkim = \"check\" to store unsigned reports)"
        )),
        (DkimPolicy::Check, Verdict::Fail(why)) => {
            Ok(Some(format!("{why}; stored anyway (dkim = \"check\")")))
        }
        (DkimPolicy::Off, Verdict::Fail(_)) => Ok(None),
    }
}
