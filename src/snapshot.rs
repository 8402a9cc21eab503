//! The immutable view the server answers from: policy host → pre-rendered
//! site. Built once per validated config and swapped in whole, so a request
//! only does a map lookup and clones reference-counted bytes.

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::HeaderValue;
use bytes::Bytes;

use crate::config::{Config, DomainConfig};
use crate::policy::PolicyId;

/// Everything served for one domain, rendered ahead of time.
#[derive(Debug)]
pub struct Site {
    pub domain: Arc<DomainConfig>,
    /// `mta-sts.<domain>`.
    pub host: Box<str>,
    /// The exact policy bytes served (RFC 8461 §3.2).
    pub body: Bytes,
    /// Derived from `body`; published in the `_mta-sts` TXT record.
    pub id: PolicyId,
    /// `"<id>"`, so caches and people can tell policy versions apart.
    pub etag: HeaderValue,
}

impl Site {
    pub fn new(domain: Arc<DomainConfig>) -> Site {
        let body = domain.policy.render();
        let id = PolicyId::for_body(&body);
        // The id is 32 hex digits, always a valid header value.
        let etag = HeaderValue::from_str(&format!("\"{id}\""))
            .unwrap_or_else(|_| HeaderValue::from_static("\"\""));
        Site {
            host: domain.name.policy_host().into_boxed_str(),
            domain,
            body,
            id,
            etag,
        }
    }
}

/// One consistent generation of all sites.
#[derive(Debug, Default)]
pub struct Snapshot {
    by_host: HashMap<Box<str>, Arc<Site>>,
    /// Sites in domain-name order (for records output and listings).
    ordered: Vec<Arc<Site>>,
}

impl Snapshot {
    pub fn build(config: &Config) -> Snapshot {
        let ordered: Vec<Arc<Site>> = config
            .domains
            .iter()
            .cloned()
            .map(|d| Arc::new(Site::new(d)))
            .collect();
        let by_host = ordered
            .iter()
            .map(|s| (s.host.clone(), Arc::clone(s)))
            .collect();
        Snapshot { by_host, ordered }
    }

    /// Looks up a normalised policy host (`mta-sts.<domain>`, lowercase).
    pub fn lookup(&self, host: &str) -> Option<&Arc<Site>> {
        self.by_host.get(host)
    }

    pub fn sites(&self) -> &[Arc<Site>] {
        &self.ordered
    }

    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }
}
