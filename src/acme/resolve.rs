//! Address lookups for the DNS precheck: the system resolver, or one DNS
//! server asked directly (`tls.precheck_resolver`), so the check can see
//! what the CA sees rather than a split-horizon local view. The direct
//! queries go through the stub resolver of [`crate::resolve`] over UDP
//! (TCP when an answer is truncated).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::resolve::{Protocol, Resolver};

/// Budget for one lookup.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Every A/AAAA address of `host` (sorted, deduplicated).
pub async fn addresses(host: &str, server: Option<SocketAddr>) -> Result<Vec<IpAddr>, String> {
    let lookup = async {
        match server {
            Some(server) => Resolver::new(server, Protocol::Udp, TIMEOUT)
                .addresses(host)
                .await
                .map_err(|e| e.to_string()),
            None => tokio::net::lookup_host((host, 443))
                .await
                .map(|addrs| addrs.map(|a| a.ip()).collect())
                .map_err(|e| format!("{host} does not resolve ({e}); point it at this server")),
        }
    };
    let mut ips = tokio::time::timeout(TIMEOUT, lookup)
        .await
        .map_err(|_| format!("resolving {host} timed out"))??;
    ips.sort();
    ips.dedup();
    Ok(ips)
}
