//! Answers to ACME challenges while an order is open: HTTP-01 tokens
//! (RFC 8555 §8.3) on the http listener and TLS-ALPN-01 certificates
//! (RFC 8737) on the https listener, chosen in the handshake when the
//! ClientHello offers the `acme-tls/1` protocol.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rcgen::{CertificateParams, CustomExtension, KeyPair};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// The ALPN protocol of TLS-ALPN-01 (RFC 8737 §6.2).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Path prefix of HTTP-01 (RFC 8555 §8.3).
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// The challenge answers currently offered; filled by the order in flight,
/// read by the listeners. Entries live only while their order is open.
///
/// With a shared store (replicas on PostgreSQL) the answers are published
/// there too, and a validation this process has no answer for is looked up
/// there: any replica answers for an order any replica placed.
#[derive(Debug, Default)]
pub struct Challenges {
    /// HTTP-01: token → key authorization.
    http01: Mutex<HashMap<String, String>>,
    /// TLS-ALPN-01: host → self-signed certificate with the acmeIdentifier.
    tls_alpn01: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// TLS-ALPN-01 certificates made here for another replica's order,
    /// with when they were made (kept [`REMOTE_ALPN_TTL`]).
    remote_alpn: Mutex<HashMap<String, (Arc<CertifiedKey>, Instant)>>,
    shared: OnceLock<Shared>,
}

#[derive(Debug)]
struct Shared {
    store: PgStore,
    /// Database lookups in flight for unknown tokens: bounded, so random
    /// requests to the challenge path cannot flood the database.
    lookups: tokio::sync::Semaphore,
}

/// Database lookups of unknown challenge keys at once.
const SHARED_LOOKUPS: usize = 8;
/// How long a TLS-ALPN-01 certificate made for another replica's order is
/// kept (a CA validates from several vantage points within seconds).
const REMOTE_ALPN_TTL: Duration = Duration::from_secs(120);

const HTTP01: &str = "http-01";
const TLS_ALPN01: &str = "tls-alpn-01";

use crate::store::pg::PgStore;
use crate::sync::lock;

impl Challenges {
    /// Publishes answers in `store` too, and looks up there what this
    /// process does not know.
    pub fn share(&self, store: PgStore) {
        let _ = self.shared.set(Shared {
            store,
            lookups: tokio::sync::Semaphore::new(SHARED_LOOKUPS),
        });
    }

    /// The key authorization for an HTTP-01 `token`, while its order is open.
    pub fn http01(&self, token: &str) -> Option<String> {
        lock(&self.http01).get(token).cloned()
    }

    /// [`Challenges::http01`], else the answer another replica published.
    pub async fn http01_anywhere(&self, token: &str) -> Option<String> {
        if let Some(answer) = self.http01(token) {
            return Some(answer);
        }
        // RFC 8555 §8.1: tokens are base64url; anything else is not asked.
        if token.is_empty()
            || token.len() > 256
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return None;
        }
        let shared = self.shared.get()?;
        let _permit = shared.lookups.try_acquire().ok()?;
        match shared.store.challenge(HTTP01, token).await {
            Ok(answer) => answer,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look up an HTTP-01 answer of another replica");
                None
            }
        }
    }

    /// The TLS-ALPN-01 certificate for `host`, while its order is open.
    pub fn tls_alpn01(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(cert) = lock(&self.tls_alpn01).get(host).cloned() {
            return Some(cert);
        }
        let mut remote = lock(&self.remote_alpn);
        remote.retain(|_, (_, made)| made.elapsed() < REMOTE_ALPN_TTL);
        remote.get(host).map(|(cert, _)| Arc::clone(cert))
    }

    /// [`Challenges::tls_alpn01`], else a certificate for the answer
    /// another replica published (made here, kept briefly).
    pub async fn tls_alpn01_anywhere(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(cert) = self.tls_alpn01(host) {
            return Some(cert);
        }
        let shared = self.shared.get()?;
        let _permit = shared.lookups.try_acquire().ok()?;
        let digest = match shared.store.challenge(TLS_ALPN01, host).await {
            Ok(Some(hex)) => data_encoding::HEXLOWER.decode(hex.as_bytes()).ok()?,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look up a TLS-ALPN-01 answer of another replica");
                return None;
            }
        };
        let cert = Arc::new(alpn_cert(host, &digest).ok()?);
        lock(&self.remote_alpn).insert(host.to_owned(), (Arc::clone(&cert), Instant::now()));
        Some(cert)
    }

    /// Publishes answers until the returned guard is dropped.
    pub fn arm(self: &Arc<Self>) -> Armed {
        Armed {
            challenges: Arc::clone(self),
            tokens: Vec::new(),
            hosts: Vec::new(),
            unpublished: Vec::new(),
        }
    }
}

/// Removes the answers it published when dropped, whatever way the order ends.
pub struct Armed {
    challenges: Arc<Challenges>,
    tokens: Vec<String>,
    hosts: Vec<String>,
    /// (kind, key, value) not yet in the shared store.
    unpublished: Vec<(&'static str, String, String)>,
}

impl Armed {
    /// Answers HTTP-01 `token` with `key_authorization`.
    pub fn http01(&mut self, token: String, key_authorization: String) {
        lock(&self.challenges.http01).insert(token.clone(), key_authorization.clone());
        self.unpublished
            .push((HTTP01, token.clone(), key_authorization));
        self.tokens.push(token);
    }

    /// Answers TLS-ALPN-01 handshakes for `host` with a certificate for
    /// the SHA-256 `digest` of the key authorization.
    pub fn tls_alpn01(&mut self, host: &str, digest: &[u8]) -> Result<(), String> {
        let cert = Arc::new(alpn_cert(host, digest)?);
        lock(&self.challenges.tls_alpn01).insert(host.to_owned(), cert);
        self.unpublished.push((
            TLS_ALPN01,
            host.to_owned(),
            data_encoding::HEXLOWER.encode(digest),
        ));
        self.hosts.push(host.to_owned());
        Ok(())
    }

    /// Makes the answers armed so far known to every replica (nothing to
    /// do without a shared store). Call before telling the CA to validate.
    pub async fn publish(&mut self) -> Result<(), String> {
        let Some(shared) = self.challenges.shared.get() else {
            self.unpublished.clear();
            return Ok(());
        };
        for (kind, key, value) in std::mem::take(&mut self.unpublished) {
            shared
                .store
                .put_challenge(kind, &key, &value)
                .await
                .map_err(|e| {
                    format!("cannot share the challenge answer with the other replicas: {e}")
                })?;
        }
        Ok(())
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        let mut http = lock(&self.challenges.http01);
        for t in &self.tokens {
            http.remove(t);
        }
        drop(http);
        let mut alpn = lock(&self.challenges.tls_alpn01);
        for h in &self.hosts {
            alpn.remove(h);
        }
        drop(alpn);
        if let Some(shared) = self.challenges.shared.get()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            let store = shared.store.clone();
            let tokens = std::mem::take(&mut self.tokens);
            let hosts = std::mem::take(&mut self.hosts);
            handle.spawn(async move {
                for (kind, keys) in [(HTTP01, tokens), (TLS_ALPN01, hosts)] {
                    if !keys.is_empty()
                        && let Err(e) = store.remove_challenges(kind, &keys).await
                    {
                        tracing::debug!(error = %e, "cannot withdraw shared challenge answers; they expire");
                    }
                }
            });
        }
    }
}

/// The TLS-ALPN-01 response certificate (RFC 8737 §3): self-signed, exactly
/// one dNSName (the identifier), and the critical acmeIdentifier extension
/// holding the SHA-256 digest of the key authorization.
pub fn alpn_cert(host: &str, digest: &[u8]) -> Result<CertifiedKey, String> {
    if digest.len() != 32 {
        // rcgen panics on any other length.
        return Err(format!(
            "key authorization digest has {} bytes, not 32",
            digest.len()
        ));
    }
    let mut params =
        CertificateParams::new(vec![host.to_owned()]).map_err(|e| format!("{host}: {e}"))?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer =
        rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).map_err(|e| e.to_string())?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signer))
}

/// Whether a ClientHello is a TLS-ALPN-01 validation.
pub fn offers_acme_alpn(hello: &ClientHello<'_>) -> bool {
    hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN))
}

#[derive(Debug)]
struct ChallengeResolver(Arc<Challenges>);

impl ResolvesServerCert for ChallengeResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let host = crate::http::normalize_host(hello.server_name()?)?;
        self.0.tls_alpn01(&host)
    }
}

/// The rustls config for validation handshakes: only `acme-tls/1`, only
/// challenge certificates.
pub fn tls_alpn_config(challenges: Arc<Challenges>) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ChallengeResolver(challenges)));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Arc::new(config)
}

/// `GET /.well-known/acme-challenge/<token>` for the http listener.
pub fn http01_router(challenges: Arc<Challenges>) -> Router {
    Router::new()
        .route(
            "/.well-known/acme-challenge/{token}",
            axum::routing::get(http01).head(http01),
        )
        .with_state(challenges)
}

async fn http01(State(challenges): State<Arc<Challenges>>, Path(token): Path<String>) -> Response {
    match challenges.http01_anywhere(&token).await {
        Some(key_authorization) => {
            let mut resp = key_authorization.into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            resp
        }
        None => (StatusCode::NOT_FOUND, "no such challenge\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::extract::Request;
    use tower::ServiceExt;

    #[tokio::test]
    async fn http01_answers_while_armed() {
        let challenges = Arc::new(Challenges::default());
        let app = http01_router(Arc::clone(&challenges));
        let get = |app: Router| async move {
            let req = Request::builder()
                .uri("/.well-known/acme-challenge/tok")
                .body(Body::empty())
                .expect("request");
            app.oneshot(req).await.expect("infallible")
        };
        assert_eq!(get(app.clone()).await.status(), StatusCode::NOT_FOUND);
        let mut armed = challenges.arm();
        armed.http01("tok".into(), "tok.thumb".into());
        let resp = get(app.clone()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body = axum::body::to_bytes(resp.into_body(), 1024)
            .await
            .expect("body");
        assert_eq!(&body[..], b"tok.thumb");
        drop(armed);
        assert_eq!(get(app).await.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn alpn_cert_has_acme_identifier() {
        let ck = alpn_cert("mta-sts.a.example", &[7u8; 32]).expect("cert");
        let (_, cert) = x509_parser::parse_x509_certificate(&ck.cert[0]).expect("parse");
        let oid = x509_parser::oid_registry::Oid::from(&[1, 3, 6, 1, 5, 5, 7, 1, 31]).expect("oid");
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid == oid)
            .expect("acmeIdentifier");
        assert!(ext.critical);
        assert!(alpn_cert("mta-sts.a.example", &[0u8; 31]).is_err());
    }
}
