//! One ACME order for one host (never a shared SAN certificate): new order,
//! answer each pending authorization with the chosen challenge, wait for the
//! CA, send our own CSR, fetch the chain, check it.

use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewOrder,
    Order, OrderStatus,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls::sign::CertifiedKey;

use super::challenge::Challenges;
use super::schedule::{self, VALIDATION_PREFIX};
use super::{Failure, FailureKind};
use crate::config::{ChallengeKind, KeyType};

/// A freshly issued certificate, checked against its host.
pub struct Issued {
    /// Private key PEM followed by the chain PEM (what the store keeps).
    pub bundle: Vec<u8>,
    pub key: CertifiedKey,
    pub info: CertInfo,
    /// The challenge that validated the order (`None`: authorization reused).
    pub challenge: Option<ChallengeKind>,
}

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    pub issuer: String,
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
}

fn acme_type(kind: ChallengeKind) -> ChallengeType {
    match kind {
        ChallengeKind::Http01 => ChallengeType::Http01,
        ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
    }
}

/// Serializes the creation of orders (new order, authorization fetches,
/// challenge answers) of one ACME account; the rest of an order runs
/// concurrently with the others.
///
/// Why: pebble (2.4 as Debian ships it, and its master) fetches an
/// authorization holding that authorization's write lock while it looks up
/// the account in its store; a new order holds the store's read lock while
/// it read-locks every authorization (looking for one to reuse). With any
/// third request waiting to write the store (another new order, an issued
/// certificate), Go's writer-preferring lock closes the cycle: the store is
/// locked for good and every later request that touches it hangs. Real CAs
/// do not need this, and creating orders one by one costs a few requests'
/// time per order; the rate limits that matter (orders per hour) are far
/// slower.
#[derive(Debug, Default)]
pub struct OrderGate(tokio::sync::Mutex<()>);

impl OrderGate {
    /// Waits for the gate; orders wait while the guard lives.
    pub async fn hold(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.0.lock().await
    }
}

/// How long to wait for the CA to validate, and for the certificate.
const POLL_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest one request to the CA may take. The ACME client has no timeout
/// of its own: without this, one request the CA never answers held a
/// concurrency slot until the whole attempt's cap (3 minutes).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// One request to the CA, bounded by [`REQUEST_TIMEOUT`]; failures are
/// reported as step `what`.
async fn request<T>(
    what: &str,
    fut: impl Future<Output = Result<T, instant_acme::Error>>,
) -> Result<T, Failure> {
    answer(what, fut).await?.map_err(|e| Failure::ca(what, &e))
}

/// Like [`request`], but hands the CA's error to the caller to classify.
async fn answer<T>(
    what: &str,
    fut: impl Future<Output = Result<T, instant_acme::Error>>,
) -> Result<Result<T, instant_acme::Error>, Failure> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(result) => Ok(result),
        Err(_) => Err(Failure::new(
            FailureKind::Ca,
            format!(
                "{what}: no answer from the CA within {} s",
                REQUEST_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// RFC 8555 §6.7 problem types by which the CA says it could not validate
/// a challenge: another challenge type may succeed.
const VALIDATION_PROBLEMS: &[&str] = &[
    "urn:ietf:params:acme:error:connection",
    "urn:ietf:params:acme:error:dns",
    "urn:ietf:params:acme:error:incorrectResponse",
    "urn:ietf:params:acme:error:tls",
    "urn:ietf:params:acme:error:unauthorized",
];

fn is_validation_problem(e: &instant_acme::Error) -> bool {
    matches!(e, instant_acme::Error::Api(p)
        if p.r#type.as_deref().is_some_and(|t| VALIDATION_PROBLEMS.contains(&t)))
}

/// A failed validation, worded so that [`schedule::challenge_for`] switches
/// the challenge type on the next attempt.
fn validation_failure(e: &instant_acme::Error) -> Failure {
    let mut f = Failure::ca(VALIDATION_PREFIX, e);
    f.kind = FailureKind::Validation;
    f
}

/// How a wait for the order ended without reaching a wanted status.
enum PollEnd {
    /// The CA put an error into the order (RFC 8555 §7.1.3).
    Problem(instant_acme::Error),
    /// A request failed or went unanswered.
    Failed(Failure),
    /// [`POLL_TIMEOUT`] passed (the last look was at the deadline).
    TimedOut,
}

/// Looks at `order` until its status is one of `wanted` (or `invalid`), at
/// the pauses of [`schedule::poll_delay`], for at most [`POLL_TIMEOUT`].
///
/// Not instant-acme's `poll_ready`/`poll_certificate`: their pause doubles
/// (0.25, 0.5, 1, 2, 4, 8, 16 s), so an order the CA finished just after a
/// look waits as long again as it took, and the last look before a 60 s
/// timeout is at 15.75 s. Pauses here stop growing at 2 s.
async fn wait_for(order: &mut Order, wanted: &[OrderStatus]) -> Result<OrderStatus, PollEnd> {
    let deadline = tokio::time::Instant::now() + POLL_TIMEOUT;
    let mut looks = 0;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(PollEnd::TimedOut);
        }
        tokio::time::sleep(schedule::poll_delay(looks).min(left)).await;
        looks = looks.saturating_add(1);
        let state = match tokio::time::timeout(REQUEST_TIMEOUT, order.refresh()).await {
            Ok(Ok(state)) => state,
            Ok(Err(e)) => return Err(PollEnd::Failed(Failure::ca("order status", &e))),
            Err(_) => {
                return Err(PollEnd::Failed(Failure::new(
                    FailureKind::Ca,
                    format!(
                        "order status: no answer from the CA within {} s",
                        REQUEST_TIMEOUT.as_secs()
                    ),
                )));
            }
        };
        if let Some(problem) = &state.error {
            return Err(PollEnd::Problem(instant_acme::Error::Api(problem.clone())));
        }
        if state.status == OrderStatus::Invalid || wanted.contains(&state.status) {
            return Ok(state.status);
        }
    }
}

/// Orders a certificate for `host`, preferring the `preferred` challenge and
/// falling back to the other one when the CA does not offer it. `replaces`
/// names the certificate being renewed (ARI, RFC 9773 §5).
///
/// `creating` is held from the new order until its challenges are answered:
/// orders of one account are created one at a time, and only the waits
/// (validation, issuance) overlap. pebble deadlocks for good when a new
/// order overlaps an authorization fetch of the same account (see
/// [`OrderGate`]).
pub async fn issue(
    account: &Account,
    creating: &OrderGate,
    host: &str,
    preferred: ChallengeKind,
    key_type: KeyType,
    challenges: &Arc<Challenges>,
    replaces: Option<CertificateIdentifier<'static>>,
) -> Result<Issued, Failure> {
    let ids = [Identifier::Dns(host.to_owned())];
    let mut new_order = NewOrder::new(&ids);
    if let Some(id) = replaces {
        new_order = new_order.replaces(id);
    }
    let creating = creating.hold().await;
    let mut order = request("new order", account.new_order(&new_order)).await?;
    let mut armed = challenges.arm();
    let mut used = None;
    {
        let mut authzs = order.authorizations();
        while let Some(authz) =
            request("authorization", async { authzs.next().await.transpose() }).await?
        {
            let mut authz = authz;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(Failure::new(
                        FailureKind::Validation,
                        format!("{VALIDATION_PREFIX}: authorization for {host} is {other:?}"),
                    ));
                }
            }
            let offered: Vec<ChallengeType> =
                authz.challenges.iter().map(|c| c.r#type.clone()).collect();
            let Some(kind) = [preferred, preferred.other()]
                .into_iter()
                .find(|k| offered.contains(&acme_type(*k)))
            else {
                return Err(Failure::new(
                    FailureKind::Ca,
                    format!(
                        "the CA offers neither http-01 nor tls-alpn-01 for {host} ({offered:?})"
                    ),
                ));
            };
            let Some(mut challenge) = authz.challenge(acme_type(kind)) else {
                return Err(Failure::new(
                    FailureKind::Ca,
                    "challenge vanished".to_owned(),
                ));
            };
            let key_auth = challenge.key_authorization();
            match kind {
                ChallengeKind::Http01 => {
                    armed.http01(challenge.token.clone(), key_auth.as_str().to_owned());
                }
                ChallengeKind::TlsAlpn01 => {
                    armed
                        .tls_alpn01(host, key_auth.digest().as_ref())
                        .map_err(|e| Failure::new(FailureKind::Local, e))?;
                }
            }
            armed
                .publish()
                .await
                .map_err(|e| Failure::new(FailureKind::Local, e))?;
            // A CA may already answer this POST with the validation's
            // outcome (pebble does when it validates quickly): that is a
            // failed validation like one reported in the order, so the next
            // attempt tries the other challenge type.
            answer("challenge", challenge.set_ready())
                .await?
                .map_err(|e| {
                    if is_validation_problem(&e) {
                        validation_failure(&e)
                    } else {
                        Failure::ca("challenge", &e)
                    }
                })?;
            used = Some(kind);
        }
    }
    drop(creating);
    let status = wait_for(&mut order, &[OrderStatus::Ready])
        .await
        .map_err(|end| match end {
            // The CA puts the validation error into the order (RFC 8555 §7.1.3).
            PollEnd::Problem(e) => validation_failure(&e),
            PollEnd::Failed(f) => f,
            PollEnd::TimedOut => Failure::new(
                FailureKind::Ca,
                format!(
                    "{VALIDATION_PREFIX}: the CA did not finish validating {host} within {} s",
                    POLL_TIMEOUT.as_secs()
                ),
            ),
        })?;
    drop(armed);
    if status != OrderStatus::Ready {
        let detail = order
            .state()
            .error
            .as_ref()
            .map_or_else(|| format!("{status:?}"), ToString::to_string);
        return Err(Failure::new(
            FailureKind::Validation,
            format!("{VALIDATION_PREFIX}: order for {host} not ready: {detail}"),
        ));
    }

    let (key_pem, csr) = csr(host, key_type).map_err(|e| Failure::new(FailureKind::Local, e))?;
    request("finalize", order.finalize_csr(&csr)).await?;
    wait_for(&mut order, &[OrderStatus::Valid])
        .await
        .map_err(|end| match end {
            PollEnd::Problem(e) => Failure::ca("certificate", &e),
            PollEnd::Failed(f) => f,
            PollEnd::TimedOut => Failure::new(
                FailureKind::Ca,
                format!(
                    "certificate: the CA did not issue within {} s",
                    POLL_TIMEOUT.as_secs()
                ),
            ),
        })?;
    let chain = request("certificate", order.certificate())
        .await?
        .ok_or_else(|| {
            Failure::new(
                FailureKind::Ca,
                "certificate: the CA sent no certificate".to_owned(),
            )
        })?;
    let mut bundle = key_pem.into_bytes();
    bundle.extend_from_slice(chain.as_bytes());
    let (key, info) = inspect(host, &bundle).map_err(|e| {
        Failure::new(
            FailureKind::Ca,
            format!("the CA returned an unusable certificate: {e}"),
        )
    })?;
    Ok(Issued {
        bundle,
        key,
        info,
        challenge: used,
    })
}

/// A fresh key and a CSR for exactly `host` (empty subject, one dNSName).
fn csr(host: &str, key_type: KeyType) -> Result<(String, Vec<u8>), String> {
    let key = match key_type {
        KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        // aws-lc-rs generates RSA keys (ring could not).
        KeyType::Rsa2048 => {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        }
    }
    .map_err(|e| format!("cannot generate a key: {e}"))?;
    let mut params =
        CertificateParams::new(vec![host.to_owned()]).map_err(|e| format!("{host}: {e}"))?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| format!("cannot build the CSR: {e}"))?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// Parses a stored or received bundle (key + chain PEM) and checks that the
/// key matches the leaf and the leaf names `host`. Expiry is the caller's call.
pub fn inspect(host: &str, bundle: &[u8]) -> Result<(CertifiedKey, CertInfo), String> {
    use rustls_pki_types::pem::{self, PemObject};
    // Name the usual damage (a cut-off file) plainly before the detailed parse.
    for item in rustls_pki_types::CertificateDer::pem_slice_iter(bundle) {
        if let Err(pem::Error::MissingSectionEnd { end_marker }) = item {
            return Err(format!(
                "truncated PEM: no -----END {}----- line (half-written file?)",
                String::from_utf8_lossy(&end_marker)
            ));
        }
    }
    let key = crate::tls::certified_key(host, bundle, bundle)?;
    let leaf = key.cert.first().ok_or("no certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("leaf certificate does not parse: {e}"))?;
    let names_host = crate::tls::names_host(&cert, host);
    if !names_host {
        return Err(format!("the certificate does not name {host}"));
    }
    let issuer = cert
        .issuer()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map_or_else(|| cert.issuer().to_string(), str::to_owned);
    let info = CertInfo {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        issuer,
        serial: cert
            .raw_serial_as_string()
            .replace(':', "")
            .to_ascii_uppercase(),
    };
    Ok((key, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A validation problem in the answer to the challenge POST (what
    /// pebble sends under load) makes the next attempt switch challenge
    /// type, like one reported in the order; other problems do not.
    #[test]
    fn validation_problems_switch_the_challenge_type() {
        let problem = |t: &str| {
            instant_acme::Error::Api(
                serde_json::from_value(serde_json::json!({
                    "type": t,
                    "detail": "Connection refused",
                    "status": 400,
                }))
                .expect("problem"),
            )
        };
        let state = |e: &Failure| crate::store::CertState {
            failures: 1,
            last_error: Some(e.message.clone()),
            last_challenge: Some("http-01".to_owned()),
            ..Default::default()
        };
        let refused = problem("urn:ietf:params:acme:error:connection");
        assert!(is_validation_problem(&refused));
        let f = validation_failure(&refused);
        assert_eq!(f.kind, FailureKind::Validation);
        assert_eq!(
            schedule::challenge_for(ChallengeKind::Http01, &state(&f)),
            ChallengeKind::TlsAlpn01
        );
        let limited = problem("urn:ietf:params:acme:error:rateLimited");
        assert!(!is_validation_problem(&limited));
        let f = Failure::ca("challenge", &limited);
        assert_eq!(
            schedule::challenge_for(ChallengeKind::Http01, &state(&f)),
            ChallengeKind::Http01
        );
    }

    #[test]
    fn csr_for_both_key_types() {
        for kt in [KeyType::EcdsaP256, KeyType::Rsa2048] {
            let (key_pem, csr) = csr("mta-sts.a.example", kt).expect("csr");
            assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{kt:?}");
            assert!(!csr.is_empty());
        }
    }

    #[test]
    fn inspect_rejects_wrong_host_and_garbage() {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["mta-sts.other.example".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let bundle = format!("{}{}", key.serialize_pem(), cert.pem());
        let err = inspect("mta-sts.a.example", bundle.as_bytes()).expect_err("wrong host");
        assert!(err.contains("does not name mta-sts.a.example"), "{err}");
        let (_, info) = inspect("mta-sts.other.example", bundle.as_bytes()).expect("ok");
        assert!(info.not_after > info.not_before);
        let half = &bundle.as_bytes()[..bundle.len() - 100];
        let err = inspect("mta-sts.other.example", half).expect_err("truncated");
        assert!(err.starts_with("truncated PEM"), "{err}");
        assert!(inspect("mta-sts.other.example", b"").is_err());
    }
}
