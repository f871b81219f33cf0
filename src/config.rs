//! Router configuration: one TOML file, parsed strictly and validated as a whole.
//!
//! Parsing rejects unknown keys and wrong types (serde + toml report the key and line);
//! [`Config::validate`] then checks the cross-field rules and names the offending key.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// Why a config was rejected. The message always names the key (or file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config is not valid TOML for wsrouter: {0}")]
    Parse(String),
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listen: Listen,
    #[serde(default)]
    pub health_check: HealthCheck,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default)]
    pub sessions: Sessions,
    #[serde(default)]
    pub replicas: Vec<Replica>,
}

/// How sessions are spread over the replicas of one tier (primaries first, then the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Config order: the reference router's behaviour.
    #[default]
    Failover,
    /// Fewest active sessions relative to weight.
    LeastSessions,
    /// Rotate, in proportion to weight.
    RoundRobin,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Balance {
    pub policy: Policy,
    /// Where a client's session key comes from; sessions with a key stick to one replica.
    pub sticky_key: Option<StickyKey>,
    /// Upstream handshakes a session may have in flight at once (fast join); 1 = one at a time.
    pub race_candidates: usize,
    /// How long an attempt runs alone before the next candidate joins the race.
    pub race_delay_seconds: f64,
}

impl Default for Balance {
    fn default() -> Self {
        Balance {
            policy: Policy::default(),
            sticky_key: None,
            race_candidates: 1,
            race_delay_seconds: 0.1,
        }
    }
}

/// What the router does to live sessions. Every duration: 0 turns it off (the default).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sessions {
    /// Close sessions on a replica that turns unhealthy (retryable JSON, then 1012).
    pub close_on_unhealthy: bool,
    /// Close sessions older than this (retryable JSON, then 1012), so clients rebalance.
    pub max_lifetime_seconds: f64,
    /// Close a session when no frame has been forwarded either way for this long.
    pub idle_timeout_seconds: f64,
    /// Ping a side that has been silent this long; close the session if it stays silent as
    /// long again.
    pub ping_interval_seconds: f64,
}

/// `seconds` as a duration, or `None` for 0 (off).
pub fn optional_seconds(seconds: f64) -> Option<Duration> {
    (seconds > 0.0).then(|| Duration::from_secs_f64(seconds))
}

/// The request part that carries the session key, e.g. `sticky_key = { query = "session_id" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StickyKey {
    Query(String),
    Header(String),
    Cookie(String),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    pub host: String,
    pub port: u16,
    /// Worker threads, each running its own event loop and accepting from the shared
    /// listener; `None` means one per CPU core.
    pub workers: Option<usize>,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            host: "0.0.0.0".into(),
            port: 9000,
            workers: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    pub path: String,
    pub interval_seconds: f64,
    pub timeout_seconds: f64,
    pub failure_threshold: u32,
    pub recovery_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            path: "/health".into(),
            interval_seconds: 5.0,
            timeout_seconds: 2.0,
            failure_threshold: 3,
            recovery_threshold: 2,
        }
    }
}

/// The router's own limits and timeouts (not in the reference router).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Concurrent WebSocket sessions; further upgrade requests get 503.
    pub max_sessions: usize,
    /// Largest frame payload accepted from either side; larger ones end the session with 1009.
    pub max_frame_bytes: usize,
    /// A client must send its complete request head within this time.
    pub header_read_timeout_seconds: f64,
    /// TCP connect plus WebSocket handshake with one replica.
    pub connect_timeout_seconds: f64,
    /// How long to wait for the peer's Close reply once a close is under way.
    pub close_timeout_seconds: f64,
    /// On SIGTERM/SIGINT, how long live sessions get to close before the router exits.
    pub drain_timeout_seconds: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 10_000,
            max_frame_bytes: 16 << 20,
            header_read_timeout_seconds: 10.0,
            connect_timeout_seconds: 5.0,
            close_timeout_seconds: 5.0,
            drain_timeout_seconds: 30.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replica {
    pub url: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub primary: bool,
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Most concurrent sessions this replica takes; unset means no limit.
    #[serde(default)]
    pub max_sessions: Option<usize>,
}

fn default_weight() -> f64 {
    1.0
}

/// A validated replica address: `http://host:port` with the port made explicit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaAddr {
    /// Normalised url, without a trailing "/".
    pub url: String,
    /// `host:port` as sent in the Host header and used to connect.
    pub authority: String,
}

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Parse and validate TOML text; normalises replica urls (trailing "/") and default names.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string().trim().into()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&mut self) -> Result<(), ConfigError> {
        self.listen.host.parse::<IpAddr>().map_err(|_| {
            invalid(
                "listen.host",
                format!("{:?} is not an IP address", self.listen.host),
            )
        })?;
        if let Some(workers) = self.listen.workers {
            if !(1..=MAX_WORKERS).contains(&workers) {
                return Err(invalid(
                    "listen.workers",
                    format!("must be between 1 and {MAX_WORKERS}, got {workers}"),
                ));
            }
        }

        let hc = &self.health_check;
        if !hc.path.starts_with('/') {
            return Err(invalid(
                "health_check.path",
                format!("{:?} must start with \"/\"", hc.path),
            ));
        }
        if hc.path.contains(['?', '#', ' ']) {
            return Err(invalid(
                "health_check.path",
                "must be a plain path (no query, fragment or spaces)",
            ));
        }
        positive_seconds("health_check.interval_seconds", hc.interval_seconds)?;
        positive_seconds("health_check.timeout_seconds", hc.timeout_seconds)?;
        if hc.failure_threshold < 1 {
            return Err(invalid(
                "health_check.failure_threshold",
                "must be at least 1",
            ));
        }
        if hc.recovery_threshold < 1 {
            return Err(invalid(
                "health_check.recovery_threshold",
                "must be at least 1",
            ));
        }

        if let Some(sticky) = &mut self.balance.sticky_key {
            let (StickyKey::Query(name) | StickyKey::Header(name) | StickyKey::Cookie(name)) =
                sticky;
            if name.is_empty() || name.contains(['=', ';', '&', ' ']) {
                return Err(invalid(
                    "balance.sticky_key",
                    format!("{name:?} is not a usable name"),
                ));
            }
            if let StickyKey::Header(header) = sticky {
                *header = header.to_ascii_lowercase();
                if hyper::header::HeaderName::from_bytes(header.as_bytes()).is_err() {
                    return Err(invalid(
                        "balance.sticky_key",
                        format!("{header:?} is not a valid header name"),
                    ));
                }
            }
        }

        if self.balance.race_candidates < 1 {
            return Err(invalid(
                "balance.race_candidates",
                "must be at least 1 (1 means no racing)",
            ));
        }
        let delay = self.balance.race_delay_seconds;
        if !(delay.is_finite() && delay >= 0.0) {
            return Err(invalid(
                "balance.race_delay_seconds",
                format!("must be a number of seconds >= 0, got {delay}"),
            ));
        }

        let s = &self.sessions;
        for (key, value) in [
            ("sessions.max_lifetime_seconds", s.max_lifetime_seconds),
            ("sessions.idle_timeout_seconds", s.idle_timeout_seconds),
            ("sessions.ping_interval_seconds", s.ping_interval_seconds),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(invalid(
                    key,
                    format!("must be a number of seconds >= 0 (0 = off), got {value}"),
                ));
            }
        }

        let l = &self.limits;
        if l.max_sessions < 1 {
            return Err(invalid("limits.max_sessions", "must be at least 1"));
        }
        if l.max_frame_bytes < 125 {
            return Err(invalid(
                "limits.max_frame_bytes",
                "must be at least 125 (the largest control frame)",
            ));
        }
        positive_seconds(
            "limits.header_read_timeout_seconds",
            l.header_read_timeout_seconds,
        )?;
        positive_seconds("limits.connect_timeout_seconds", l.connect_timeout_seconds)?;
        positive_seconds("limits.close_timeout_seconds", l.close_timeout_seconds)?;
        positive_seconds("limits.drain_timeout_seconds", l.drain_timeout_seconds)?;

        if self.replicas.is_empty() {
            return Err(invalid(
                "replicas",
                "at least one [[replicas]] entry is required",
            ));
        }
        let mut primary_seen: Option<usize> = None;
        for i in 0..self.replicas.len() {
            let key = |field: &str| format!("replicas[{i}].{field}");
            let addr = parse_replica_url(&self.replicas[i].url)
                .map_err(|reason| invalid(key("url"), reason))?;
            let r = &mut self.replicas[i];
            r.url = addr.url.clone();
            if r.name.is_none() {
                r.name = Some(addr.authority.clone());
            }
            if r.name.as_deref() == Some("") {
                return Err(invalid(key("name"), "must not be empty"));
            }
            if !(r.weight.is_finite() && r.weight > 0.0) {
                return Err(invalid(
                    key("weight"),
                    format!("must be a number greater than 0, got {}", r.weight),
                ));
            }
            if r.max_sessions == Some(0) {
                return Err(invalid(
                    key("max_sessions"),
                    "must be at least 1 (leave it out for no limit)",
                ));
            }
            if r.primary {
                if let Some(first) = primary_seen {
                    return Err(invalid(key("primary"), format!("replicas[{first}] is already the primary; at most one replica may be primary")));
                }
                primary_seen = Some(i);
            }
            for j in 0..i {
                let other = &self.replicas[j];
                if other.url == self.replicas[i].url {
                    return Err(invalid(
                        key("url"),
                        format!("duplicate of replicas[{j}].url {:?}", other.url),
                    ));
                }
                if other.name == self.replicas[i].name {
                    return Err(invalid(
                        key("name"),
                        format!(
                            "duplicate of replicas[{j}].name {:?}",
                            other.name.as_deref().unwrap_or("")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Worker threads to run: `listen.workers`, or one per CPU core.
    pub fn workers(&self) -> usize {
        self.listen.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        let ip: IpAddr = self.listen.host.parse().expect("validated at load");
        SocketAddr::new(ip, self.listen.port)
    }
}

/// More threads than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;

fn positive_seconds(key: &str, value: f64) -> Result<(), ConfigError> {
    // Upper bound keeps Duration::from_secs_f64 from panicking and catches unit mistakes.
    if !(value.is_finite() && value > 0.0 && value <= 86_400.0) {
        return Err(invalid(
            key,
            format!("must be greater than 0 and at most 86400 seconds, got {value}"),
        ));
    }
    Ok(())
}

pub fn seconds(value: f64) -> Duration {
    Duration::from_secs_f64(value)
}

/// Check a replica url: `http://host[:port][/]`, nothing else. Returns the normalised form.
pub fn parse_replica_url(url: &str) -> Result<ReplicaAddr, String> {
    if url.contains('#') {
        return Err(format!("{url:?} must not have a fragment"));
    }
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a valid url ({e})"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!("{url:?}: https:// replicas need TLS, which this build does not support yet; use http://"))
        }
        _ => return Err(format!("{url:?} must start with http://")),
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{url:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("{url:?} must not carry credentials"));
    }
    if authority.host().is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    if uri.query().is_some() {
        return Err(format!("{url:?} must not have a query string"));
    }
    let path = uri.path();
    if !(path.is_empty() || path == "/") {
        return Err(format!(
            "{url:?} must not have a path other than \"/\" (got {path:?})"
        ));
    }
    let port = authority.port_u16().unwrap_or(80);
    let host = authority.host();
    Ok(ReplicaAddr {
        url: format!("http://{host}:{port}"),
        authority: format!("{host}:{port}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    const ONE: &str = "[[replicas]]\nurl = \"http://127.0.0.1:8001\"\n";

    #[test]
    fn defaults_match_reference() {
        let c = Config::parse(ONE).unwrap();
        assert_eq!(c.listen, Listen::default());
        assert_eq!(c.listen.port, 9000);
        assert_eq!(c.health_check, HealthCheck::default());
        assert_eq!(c.replicas[0].weight, 1.0);
        assert!(!c.replicas[0].primary);
        assert_eq!(c.replicas[0].name.as_deref(), Some("127.0.0.1:8001"));
        assert_eq!(c.balance.policy, Policy::Failover);
        assert_eq!(c.replicas[0].max_sessions, None);
    }

    #[test]
    fn url_normalised() {
        let c = Config::parse("[[replicas]]\nurl = \"http://localhost/\"\n").unwrap();
        assert_eq!(c.replicas[0].url, "http://localhost:80");
    }

    #[test]
    fn rejections_name_the_key() {
        assert!(err("").contains("replicas: at least one"));
        assert!(err("[[replicas]]\nurl = \"ftp://x\"\n").contains("replicas[0].url"));
        assert!(err("[[replicas]]\nurl = \"http://x/v1\"\n").contains("path other than"));
        assert!(err("[[replicas]]\nurl = \"http://x/?a=1\"\n").contains("query"));
        assert!(err("[[replicas]]\nurl = \"http://x/#f\"\n").contains("fragment"));
        assert!(err("[[replicas]]\nurl = \"https://x\"\n").contains("TLS"));
        let dup = format!("{ONE}[[replicas]]\nurl = \"http://127.0.0.1:8001/\"\n");
        assert!(err(&dup).contains("replicas[1].url: duplicate of replicas[0].url"));
        let two_primaries = "[[replicas]]\nurl = \"http://a\"\nprimary = true\n[[replicas]]\nurl = \"http://b\"\nprimary = true\n";
        assert!(err(two_primaries).contains("replicas[1].primary"));
        assert!(err(&format!("[health_check]\ninterval_seconds = 0\n{ONE}"))
            .contains("health_check.interval_seconds"));
        assert!(err(&format!("[health_check]\ntimeout_seconds = -1\n{ONE}"))
            .contains("health_check.timeout_seconds"));
        assert!(
            err(&format!("[health_check]\nfailure_threshold = 0\n{ONE}"))
                .contains("health_check.failure_threshold")
        );
        assert!(
            err(&format!("[health_check]\nrecovery_threshold = 0\n{ONE}"))
                .contains("health_check.recovery_threshold")
        );
        assert!(
            err(&format!("[health_check]\npath = \"health\"\n{ONE}")).contains("health_check.path")
        );
        assert!(
            err("[[replicas]]\nurl = \"http://a\"\nweight = 0\n").contains("replicas[0].weight")
        );
        assert!(err(&format!("[listen]\nhost = \"example.com\"\n{ONE}")).contains("listen.host"));
        assert!(err(&format!("[listen]\nworkers = 0\n{ONE}")).contains("listen.workers"));
        assert!(err("[[replicas]]\nurl = \"http://a\"\nmax_sessions = 0\n")
            .contains("replicas[0].max_sessions"));
        let e = err(&format!(
            "[balance]\nsticky_key = {{ header = \"bad header\" }}\n{ONE}"
        ));
        assert!(e.contains("balance.sticky_key"), "{e}");
        let e = err(&format!(
            "[balance]\nsticky_key = {{ path = \"x\" }}\n{ONE}"
        ));
        assert!(e.contains("unknown variant"), "{e}");
        let c = Config::parse(&format!(
            "[balance]\nsticky_key = {{ header = \"X-Session\" }}\n{ONE}"
        ))
        .unwrap();
        assert_eq!(
            c.balance.sticky_key,
            Some(StickyKey::Header("x-session".into()))
        );
        assert!(err(&format!("[balance]\nrace_candidates = 0\n{ONE}"))
            .contains("balance.race_candidates"));
        assert!(err(&format!("[balance]\nrace_delay_seconds = -1\n{ONE}"))
            .contains("balance.race_delay_seconds"));
        let e = err(&format!("[balance]\npolicy = \"random\"\n{ONE}"));
        assert!(
            e.contains("unknown variant") && e.contains("least_sessions"),
            "{e}"
        );
    }

    #[test]
    fn strict_types_and_keys() {
        let e = err("[[replicas]]\nurl = \"http://a\"\nprimary = \"false\"\n");
        assert!(e.contains("primary") && e.contains("invalid type"), "{e}");
        let e = err(&format!("[health_check]\nfailure_threshold = 2.7\n{ONE}"));
        assert!(
            e.contains("failure_threshold") && e.contains("invalid type"),
            "{e}"
        );
        let e = err(&format!("[health_check]\nintervall_seconds = 2\n{ONE}"));
        assert!(
            e.contains("unknown field") && e.contains("intervall_seconds"),
            "{e}"
        );
        let e = err("[[replicas]]\nurl = \"http://a\"\nport = 1\n");
        assert!(e.contains("unknown field") && e.contains("port"), "{e}");
    }
}
