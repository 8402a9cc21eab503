//! Address lookups for the DNS precheck: the system resolver, or one DNS
//! server asked directly (`tls.precheck_resolver`), so the check can see
//! what the CA sees rather than a split-horizon local view.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

/// Budget for one lookup.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Every A/AAAA address of `host` (sorted, deduplicated).
pub async fn addresses(host: &str, server: Option<SocketAddr>) -> Result<Vec<IpAddr>, String> {
    let lookup = async {
        match server {
            Some(server) => {
                let mut ips = query(host, RecordType::A, server).await?;
                ips.extend(query(host, RecordType::AAAA, server).await?);
                Ok(ips)
            }
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

/// One recursive UDP query to `server`.
async fn query(host: &str, rtype: RecordType, server: SocketAddr) -> Result<Vec<IpAddr>, String> {
    let name = Name::from_ascii(format!("{host}.")).map_err(|e| format!("{host}: {e}"))?;
    let id = fastrand::u16(..);
    let mut msg = Message::query();
    msg.metadata.id = id;
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name, rtype));
    let bytes = msg.to_vec().map_err(|e| e.to_string())?;
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let failed = |e: std::io::Error| format!("DNS query to {server} failed: {e}");
    let socket = tokio::net::UdpSocket::bind(bind).await.map_err(failed)?;
    socket.connect(server).await.map_err(failed)?;
    socket.send(&bytes).await.map_err(failed)?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).await.map_err(failed)?;
        let Some(reply) = buf.get(..n).and_then(|b| Message::from_vec(b).ok()) else {
            continue;
        };
        if reply.metadata.id != id {
            continue;
        }
        return match reply.metadata.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => Ok(reply
                .answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })
                .collect()),
            code => Err(format!("{server} answered {code} for {host} {rtype}")),
        };
    }
}
