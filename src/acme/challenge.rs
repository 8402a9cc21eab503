//! Answers to ACME challenges while an order is open: HTTP-01 tokens
//! (RFC 8555 §8.3) on the http listener and TLS-ALPN-01 certificates
//! (RFC 8737) on the https listener, chosen in the handshake when the
//! ClientHello offers the `acme-tls/1` protocol.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
#[derive(Debug, Default)]
pub struct Challenges {
    /// HTTP-01: token → key authorization.
    http01: Mutex<HashMap<String, String>>,
    /// TLS-ALPN-01: host → self-signed certificate with the acmeIdentifier.
    tls_alpn01: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

use crate::sync::lock;

impl Challenges {
    /// The key authorization for an HTTP-01 `token`, while its order is open.
    pub fn http01(&self, token: &str) -> Option<String> {
        lock(&self.http01).get(token).cloned()
    }

    /// The TLS-ALPN-01 certificate for `host`, while its order is open.
    pub fn tls_alpn01(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        lock(&self.tls_alpn01).get(host).cloned()
    }

    /// Publishes answers until the returned guard is dropped.
    pub fn arm(self: &Arc<Self>) -> Armed {
        Armed {
            challenges: Arc::clone(self),
            tokens: Vec::new(),
            hosts: Vec::new(),
        }
    }
}

/// Removes the answers it published when dropped, whatever way the order ends.
pub struct Armed {
    challenges: Arc<Challenges>,
    tokens: Vec<String>,
    hosts: Vec<String>,
}

impl Armed {
    /// Answers HTTP-01 `token` with `key_authorization`.
    pub fn http01(&mut self, token: String, key_authorization: String) {
        lock(&self.challenges.http01).insert(token.clone(), key_authorization);
        self.tokens.push(token);
    }

    /// Answers TLS-ALPN-01 handshakes for `host` with `cert`.
    pub fn tls_alpn01(&mut self, host: &str, cert: Arc<CertifiedKey>) {
        lock(&self.challenges.tls_alpn01).insert(host.to_owned(), cert);
        self.hosts.push(host.to_owned());
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
    match challenges.http01(&token) {
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
