//! Replica groups found through DNS, and replica urls that name a host. Each group's name is
//! looked up at start and again every health interval, sooner when its records' TTL runs out
//! first; every address found is one replica with the group's settings. A failed or empty
//! lookup is logged and counted and the last good set stays: DNS trouble never empties the
//! fleet. A `[[replicas]]` url's host name is looked up on the same schedule, and sessions
//! connect to what the last good lookup found, not to a fresh lookup each.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use tokio::time::Instant;

use crate::config::{Discovery, GroupLookup};
use crate::registry::{Found, Registry, Replica};

/// The most replicas one group takes from an answer: a DNS server that answers with thousands
/// of addresses must not turn into thousands of probes and connections.
pub const MAX_GROUP_MEMBERS: usize = 1024;

/// Never look a name up again sooner than this, whatever its TTL says (a TTL of 0 must not
/// turn into a busy loop).
const MIN_REFRESH: Duration = Duration::from_secs(1);

/// Why a lookup found nothing usable.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("no such name")]
    NoSuchName,
    #[error("no records in the answer")]
    NoRecords,
    #[error("DNS lookup failed: {0}")]
    Failed(String),
}

impl From<NetError> for LookupError {
    fn from(error: NetError) -> LookupError {
        if error.is_nx_domain() {
            LookupError::NoSuchName
        } else if error.is_no_records_found() {
            LookupError::NoRecords
        } else {
            LookupError::Failed(error.to_string())
        }
    }
}

/// A DNS resolver: the system's (/etc/resolv.conf) or `[discovery] nameserver`. It keeps no
/// cache: each cycle asks again, and the loop honours the records' TTL itself.
pub struct Resolver(TokioResolver);

impl Resolver {
    pub fn new(discovery: &Discovery, timeout: Duration) -> Result<Resolver, String> {
        let mut builder = match discovery.nameserver {
            Some(addr) => {
                let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                    .into_iter()
                    .map(|mut connection| {
                        connection.port = addr.port();
                        connection
                    })
                    .collect();
                let server = NameServerConfig::new(addr.ip(), true, connections);
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![server]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio()
                .map_err(|e| format!("cannot read the system's DNS settings: {e}"))?,
        };
        let options = builder.options_mut();
        options.cache_size = 0;
        options.timeout = timeout;
        options.attempts = 2;
        builder
            .build()
            .map(Resolver)
            .map_err(|e| format!("cannot set up the DNS resolver: {e}"))
    }

    /// The addresses `lookup` finds, sorted, and until when its records hold.
    pub async fn resolve(
        &self,
        lookup: &GroupLookup,
    ) -> Result<(Vec<Found>, Instant), LookupError> {
        let (found, valid_until) = match lookup {
            GroupLookup::Host { name, port } => {
                let ips = self.0.lookup_ip(name.as_str()).await?;
                let found = ips
                    .iter()
                    .map(|ip| Found {
                        ip,
                        port: *port,
                        host: name.clone(),
                    })
                    .collect();
                (found, ips.valid_until())
            }
            GroupLookup::Srv { name } => {
                let records = self.0.srv_lookup(name.as_str()).await?;
                let mut valid_until = records.valid_until();
                let mut found = Vec::new();
                for record in records.answers() {
                    // Port 0 is no place to connect to.
                    let RData::SRV(srv) = &record.data else {
                        continue;
                    };
                    if srv.port == 0 {
                        continue;
                    }
                    let target = srv.target.to_ascii();
                    let ips = self.0.lookup_ip(target.as_str()).await?;
                    valid_until = valid_until.min(ips.valid_until());
                    found.extend(ips.iter().map(|ip| Found {
                        ip,
                        port: srv.port,
                        host: target.clone(),
                    }));
                }
                (found, valid_until)
            }
        };
        Ok((bounded(found), Instant::from_std(valid_until)))
    }
}

/// Sorted, without duplicates, and at most [`MAX_GROUP_MEMBERS`] (the lowest addresses, so
/// every router keeps the same ones).
fn bounded(mut found: Vec<Found>) -> Vec<Found> {
    found.sort_by_key(|f| (f.ip, f.port));
    found.dedup_by(|a, b| (a.ip, a.port) == (b.ip, b.port));
    if found.len() > MAX_GROUP_MEMBERS {
        tracing::warn!(
            found = found.len(),
            kept = MAX_GROUP_MEMBERS,
            "DNS answered with more addresses than a group takes; keeping the lowest"
        );
        found.truncate(MAX_GROUP_MEMBERS);
    }
    found
}

/// The discovery loop: runs while there are groups or host names to look up, reading them and
/// the settings afresh after every reload. `first_pass` is told when the first round of
/// lookups is done (the health loop waits for it, so a first probe does not miss the names).
pub async fn run(registry: Arc<Registry>, first_pass: tokio::sync::oneshot::Sender<()>) {
    let mut first_pass = Some(first_pass);
    let mut resolver: Option<(Discovery, Resolver)> = None;
    // The last error logged per group: a failure that repeats is logged once.
    let mut reported: HashMap<String, String> = HashMap::new();
    loop {
        let reconfigured = registry.reconfigured();
        let (groups, discovery) = registry.groups();
        let check = registry.health_check();
        let named: Vec<Arc<Replica>> = registry
            .replicas()
            .into_iter()
            .filter(|r| r.host_name().is_some() && r.group.is_none())
            .collect();
        if groups.is_empty() && named.is_empty() {
            if let Some(done) = first_pass.take() {
                let _ = done.send(());
            }
            reconfigured.await;
            continue;
        }
        let now = Instant::now();
        let mut next = now + check.interval;
        if resolver.as_ref().map(|(settings, _)| settings) != Some(&discovery) {
            match Resolver::new(&discovery, check.timeout) {
                Ok(built) => resolver = Some((discovery, built)),
                Err(error) => {
                    tracing::warn!(%error, "replica groups cannot be looked up");
                    for group in &groups {
                        registry.lookup_failed(&group.name, false, error.clone());
                    }
                    resolver = None;
                }
            }
        }
        if let Some((_, resolver)) = &resolver {
            // A lookup gets two tries within the timeout each, plus a little.
            let deadline = check.timeout * 2 + Duration::from_millis(100);
            let lookups = groups.iter().map(|group| async move {
                let result = tokio::time::timeout(deadline, resolver.resolve(&group.lookup))
                    .await
                    .unwrap_or_else(|_| Err(LookupError::Failed("timed out".to_string())));
                (group, result)
            });
            for (group, result) in join_all(lookups).await {
                let (empty, error) = match result {
                    Ok((found, valid_until)) if !found.is_empty() => {
                        reported.remove(&group.name);
                        registry.found(&group.name, found);
                        next = next.min(valid_until.max(now + MIN_REFRESH));
                        continue;
                    }
                    Ok(_) | Err(LookupError::NoRecords) => {
                        (true, "the answer has no address".to_string())
                    }
                    Err(error) => (matches!(error, LookupError::NoSuchName), error.to_string()),
                };
                if reported.get(&group.name) != Some(&error) {
                    tracing::warn!(group = %group.name, %error, "replica group lookup found nothing; keeping its last set");
                    reported.insert(group.name.clone(), error.clone());
                }
                registry.lookup_failed(&group.name, empty, error);
            }
            let hosts = named.iter().map(|replica| async move {
                let (host, port) = replica.host_name().expect("filtered on it");
                let lookup = GroupLookup::Host {
                    name: host.to_string(),
                    port,
                };
                let result = tokio::time::timeout(deadline, resolver.resolve(&lookup))
                    .await
                    .unwrap_or_else(|_| Err(LookupError::Failed("timed out".to_string())));
                (replica, result)
            });
            for (replica, result) in join_all(hosts).await {
                let error = match result {
                    Ok((found, valid_until)) if !found.is_empty() => {
                        reported.remove(&replica.url);
                        replica.set_addresses(
                            found
                                .iter()
                                .map(|f| std::net::SocketAddr::new(f.ip, f.port))
                                .collect(),
                        );
                        next = next.min(valid_until.max(now + MIN_REFRESH));
                        continue;
                    }
                    Ok(_) => LookupError::NoRecords.to_string(),
                    Err(error) => error.to_string(),
                };
                if reported.get(&replica.url) != Some(&error) {
                    tracing::warn!(replica = %replica.name, %error, "replica host name lookup found nothing; connecting to its last addresses");
                    reported.insert(replica.url.clone(), error);
                }
            }
        }
        if let Some(done) = first_pass.take() {
            let _ = done.send(());
        }
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = reconfigured => {}
        }
    }
}

/// Look every replica group up once, for `wsrouter check`: how many addresses each found, or
/// the first group that found none, named by its key.
pub async fn check_groups(config: &crate::config::Config) -> Result<Vec<(String, usize)>, String> {
    if config.replica_groups.is_empty() {
        return Ok(Vec::new());
    }
    let resolver = Resolver::new(&config.discovery, config.health_check.timeout)?;
    let mut found = Vec::new();
    for (i, group) in config.replica_groups.iter().enumerate() {
        let (key, name) = match &group.lookup {
            GroupLookup::Host { name, .. } => ("dns", name),
            GroupLookup::Srv { name } => ("srv", name),
        };
        match resolver.resolve(&group.lookup).await {
            Ok((addresses, _)) if !addresses.is_empty() => {
                found.push((group.name.clone(), addresses.len()))
            }
            Ok(_) => {
                return Err(format!(
                    "replica_groups[{i}].{key}: {name:?}: {}",
                    LookupError::NoRecords
                ))
            }
            Err(error) => return Err(format!("replica_groups[{i}].{key}: {name:?}: {error}")),
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_sorted_deduplicated_and_bounded() {
        let found = |i: u32, port| Found {
            ip: std::net::Ipv4Addr::from(0x0a00_0000 + i).into(),
            port,
            host: "many.test".into(),
        };
        let answer: Vec<Found> = (0..5000).rev().chain(0..10).map(|i| found(i, 80)).collect();
        let kept = bounded(answer);
        assert_eq!(kept.len(), MAX_GROUP_MEMBERS);
        assert_eq!(kept[0], found(0, 80));
        assert_eq!(
            kept[MAX_GROUP_MEMBERS - 1],
            found(MAX_GROUP_MEMBERS as u32 - 1, 80)
        );
    }
}
