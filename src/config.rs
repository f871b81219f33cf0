//! Router configuration: one TOML file, parsed strictly, validated as a whole, and turned into
//! typed settings (durations as [`Duration`], addresses parsed, every value within bounds).
//!
//! [`file`] holds the TOML as written (serde rejects unknown keys and wrong types and names the
//! key and line); [`Config::parse`] checks every rule and builds the typed [`Config`], naming the
//! key at fault when a rule fails. Nothing that passes here can panic later: every duration and
//! size has an upper bound.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::tls::{TlsError, UpstreamTls};

/// Why a config was rejected. The message always names the key (or file) at fault, on one line.
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

impl ConfigError {
    /// Whether the file could not be read at all (as opposed to read and found wrong).
    pub fn is_read_error(&self) -> bool {
        matches!(self, ConfigError::Read { .. })
    }
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: Listen,
    /// A separate listener for /status and /metrics; when unset they are on the public port.
    pub admin: Option<Admin>,
    pub log: Log,
    pub health_check: HealthCheck,
    pub limits: Limits,
    pub balance: Balance,
    pub sessions: Sessions,
    /// TLS to `https://` replicas, unless a replica says otherwise.
    pub upstream_tls: UpstreamTls,
    pub replicas: Vec<Replica>,
    /// Replicas found through DNS.
    pub replica_groups: Vec<ReplicaGroup>,
    pub discovery: Discovery,
}

/// How replica groups are looked up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Discovery {
    /// Ask this DNS server instead of those in /etc/resolv.conf.
    pub nameserver: Option<SocketAddr>,
}

/// Replicas found through DNS: every address the name resolves to is one replica, with the
/// group's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaGroup {
    /// Unique; the members are named `{name}/{address}:{port}`.
    pub name: String,
    pub lookup: GroupLookup,
    /// For https groups: the settings and the client config the members share; each member
    /// is verified against the DNS name (an SRV group: its record's target).
    pub tls: Option<GroupTls>,
    pub primary: bool,
    pub weight: f64,
    pub max_sessions: Option<usize>,
    pub drain: bool,
}

/// TLS to the members of an https group.
#[derive(Debug, Clone)]
pub struct GroupTls {
    pub settings: UpstreamTls,
    pub config: Arc<rustls::ClientConfig>,
}

impl PartialEq for GroupTls {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings
    }
}

/// What a group looks up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupLookup {
    /// A and AAAA records of `name`, each on `port`.
    Host { name: String, port: u16 },
    /// SRV records of `name`: each target's addresses, on the record's port.
    Srv { name: String },
}

impl ReplicaGroup {
    /// The replica at `ip:port`, found under the host name `host`.
    pub fn member(&self, ip: std::net::IpAddr, port: u16, host: &str) -> Result<Replica, String> {
        let addr = SocketAddr::new(ip, port);
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let tls = match &self.tls {
            None => None,
            Some(tls) => Some(ReplicaTls {
                settings: tls.settings.clone(),
                server_name: crate::tls::server_name(host.trim_end_matches('.'))?,
                config: tls.config.clone(),
            }),
        };
        Ok(Replica {
            name: format!("{}/{addr}", self.name),
            url: format!("{scheme}://{addr}"),
            authority: addr.to_string(),
            tls,
            primary: self.primary,
            weight: self.weight,
            max_sessions: self.max_sessions,
            drain: self.drain,
            group: Some(self.name.clone()),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listen {
    pub addr: SocketAddr,
    /// Worker threads; `None` means one per CPU core.
    pub workers: Option<usize>,
    /// The path clients open their WebSocket on.
    pub stream_path: String,
    /// Front proxies whose X-Forwarded-For / X-Forwarded-Proto are believed.
    pub trusted_proxies: Vec<Cidr>,
    /// TLS for clients (`wss://`), when set.
    pub tls: Option<ListenTls>,
    /// What moves a session's frames once it is open.
    pub io: Io,
    /// A replica's large payloads that pass as they are go to plain TCP clients by splice(2).
    pub splice: bool,
}

/// The data plane: how a session's sockets are read and written after the 101.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
pub enum Io {
    /// tokio's event loop: one system call per read and per write.
    #[default]
    #[serde(rename = "epoll")]
    Epoll,
    /// A ring per worker: a loop turn's reads and writes of every session in one system call
    /// (plain TCP on both sides; TLS sessions stay on epoll).
    #[serde(rename = "io_uring")]
    IoUring,
}

impl Io {
    /// The environment variable that overrides `[listen] io`.
    pub const ENV: &'static str = "WSROUTER_IO";

    pub fn name(self) -> &'static str {
        match self {
            Io::Epoll => "epoll",
            Io::IoUring => "io_uring",
        }
    }
}

/// The listener's certificate: the files, and the TLS settings built from them at load.
#[derive(Debug, Clone)]
pub struct ListenTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub config: Arc<rustls::ServerConfig>,
}

/// Equal when the files are: their contents are watched separately.
impl PartialEq for ListenTls {
    fn eq(&self, other: &Self) -> bool {
        (&self.cert_file, &self.key_file) == (&other.cert_file, &other.key_file)
    }
}

/// How the router speaks TLS to an `https://` replica.
#[derive(Debug, Clone)]
pub struct ReplicaTls {
    pub settings: UpstreamTls,
    /// Verified against, and sent as SNI: the url's host.
    pub server_name: rustls::pki_types::ServerName<'static>,
    /// Shared by the replicas with the same settings (and their resumption cache).
    pub config: Arc<rustls::ClientConfig>,
}

impl PartialEq for ReplicaTls {
    fn eq(&self, other: &Self) -> bool {
        (&self.settings, &self.server_name) == (&other.settings, &other.server_name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Log {
    pub format: LogFormat,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub path: String,
    /// Start to start, per replica.
    pub interval: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
    pub recovery_threshold: u32,
}

/// The router's own limits and timeouts.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Accepted connections, admitted or not; more are closed at once.
    pub max_connections: usize,
    /// Concurrent WebSocket sessions; more upgrade requests get 503.
    pub max_sessions: usize,
    /// Connections from one client address (IPv6: its /64); `usize::MAX` = no limit.
    pub max_connections_per_client: usize,
    /// Sessions of one client address; `usize::MAX` = no limit.
    pub max_sessions_per_client: usize,
    /// Whether max_connections / max_sessions were left at their defaults: the router may lower
    /// those to fit the open-file limit (explicit values must fit, or it refuses to start).
    pub connections_by_default: bool,
    pub sessions_by_default: bool,
    pub max_frame_bytes: usize,
    pub header_read_timeout: Duration,
    pub connect_timeout: Duration,
    pub close_timeout: Duration,
    pub drain_timeout: Duration,
    pub drain_mode: DrainMode,
}

/// What a stopping router (SIGTERM, SIGINT) does with its live sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainMode {
    /// Close 1001 on both sides of every session at once, then wait up to drain_timeout.
    #[default]
    Close,
    /// Let sessions end on their own for up to drain_timeout, then close the rest with 1001
    /// (and wait up to close_timeout for their Close replies).
    Wait,
}

/// How sessions are spread over the replicas of one tier (primaries first, then the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
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

/// The request part that carries the session key, e.g. `sticky_key = { query = "session_id" }`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StickyKey {
    Query(String),
    Header(String),
    Cookie(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Balance {
    pub policy: Policy,
    pub sticky_key: Option<StickyKey>,
    /// Upstream handshakes a session may have in flight at once (fast join); 1 = one at a time.
    pub race_candidates: usize,
    /// How long an attempt runs alone before the next candidate joins the race.
    pub race_delay: Duration,
}

/// What the router does to live sessions; `None` turns a mechanism off.
#[derive(Debug, Clone, PartialEq)]
pub struct Sessions {
    pub close_on_unhealthy: bool,
    pub max_lifetime: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub ping_interval: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    pub name: String,
    /// Normalised: `http://host:port` or `https://host:port`, no trailing "/".
    pub url: String,
    /// `host:port`, for connecting and for the Host header.
    pub authority: String,
    /// For `https://` replicas.
    pub tls: Option<ReplicaTls>,
    pub primary: bool,
    pub weight: f64,
    /// Capacity; `None` means no limit.
    pub max_sessions: Option<usize>,
    /// Takes no new sessions; its live ones run on (a rollout).
    pub drain: bool,
    /// The replica group that found it, for a replica found through DNS.
    pub group: Option<String>,
}

/// An address block, `10.0.0.0/8` or `::1/128`; a bare address is a block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(
                u128::from(u32::from(net)) << 96,
                u128::from(u32::from(ip)) << 96,
                self.prefix,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(net), u128::from(ip), self.prefix)
            }
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6
                .to_ipv4_mapped()
                .is_some_and(|v4| self.contains(IpAddr::V4(v4))),
            (IpAddr::V6(_), IpAddr::V4(v4)) => self.contains(IpAddr::V6(v4.to_ipv6_mapped())),
        }
    }
}

fn prefix_eq(a: u128, b: u128, prefix: u8) -> bool {
    prefix == 0 || (a ^ b) >> (128 - u32::from(prefix)) == 0
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an address or address/prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Defaults, in one place (config/router.toml documents the same values).
pub mod defaults {
    pub const PORT: u16 = 9000;
    pub const STREAM_PATH: &str = "/v1/stream";
    pub const HEALTH_PATH: &str = "/health";
    pub const INTERVAL_SECONDS: f64 = 5.0;
    pub const TIMEOUT_SECONDS: f64 = 2.0;
    pub const FAILURE_THRESHOLD: u32 = 3;
    pub const RECOVERY_THRESHOLD: u32 = 2;
    /// With the sessions' upstream connections this fits a 20,000-descriptor limit.
    pub const MAX_CONNECTIONS: usize = 10_000;
    pub const MAX_SESSIONS: usize = 8_000;
    pub const MAX_CONNECTIONS_PER_CLIENT: usize = 256;
    pub const MAX_SESSIONS_PER_CLIENT: usize = 128;
    pub const MAX_FRAME_BYTES: usize = 16 << 20;
    pub const HEADER_READ_TIMEOUT_SECONDS: f64 = 10.0;
    pub const CONNECT_TIMEOUT_SECONDS: f64 = 5.0;
    pub const CLOSE_TIMEOUT_SECONDS: f64 = 5.0;
    pub const DRAIN_TIMEOUT_SECONDS: f64 = 30.0;
    pub const RACE_DELAY_SECONDS: f64 = 0.1;
    /// A peer silent this long is pinged; silent as long again, it is gone.
    pub const PING_INTERVAL_SECONDS: f64 = 30.0;
    /// Nothing forwarded either way this long ends the session.
    pub const IDLE_TIMEOUT_SECONDS: f64 = 600.0;
}

/// Upper bounds: beyond them a value is a typo (or would overflow a timer).
mod bounds {
    pub const SECONDS: f64 = 86_400.0;
    pub const LIFETIME_SECONDS: f64 = 30.0 * 86_400.0;
    pub const RACE_DELAY_SECONDS: f64 = 60.0;
    pub const COUNT: usize = 10_000_000;
    pub const FRAME_BYTES: usize = 1 << 30;
    pub const WORKERS: usize = 1024;
    pub const RACE_CANDIDATES: usize = 16;
    pub const THRESHOLD: u32 = 1000;
    pub const WEIGHT: f64 = 1_000_000.0;
}

/// The TOML file as written: every key optional except a replica's url.
pub mod file {
    use std::path::PathBuf;

    use serde::Deserialize;

    use super::{defaults, DrainMode, Io, LogFormat, Policy, StickyKey};

    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        #[serde(default)]
        pub listen: Listen,
        pub admin: Option<Admin>,
        #[serde(default)]
        pub log: Log,
        #[serde(default)]
        pub health_check: HealthCheck,
        #[serde(default)]
        pub limits: Limits,
        #[serde(default)]
        pub balance: Balance,
        #[serde(default)]
        pub sessions: Sessions,
        #[serde(default)]
        pub upstream_tls: UpstreamTls,
        #[serde(default)]
        pub replicas: Vec<Replica>,
        #[serde(default)]
        pub replica_groups: Vec<ReplicaGroup>,
        #[serde(default)]
        pub discovery: Discovery,
    }

    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Discovery {
        pub nameserver: Option<String>,
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ReplicaGroup {
        #[serde(default)]
        pub name: Option<String>,
        #[serde(default)]
        pub dns: Option<String>,
        #[serde(default)]
        pub srv: Option<String>,
        /// Wide, so a value out of range gets its own message.
        #[serde(default)]
        pub port: Option<i64>,
        #[serde(default)]
        pub scheme: Option<String>,
        /// Only to refuse it with a precise message: a group has no url.
        #[serde(default)]
        pub url: Option<String>,
        #[serde(default)]
        pub primary: bool,
        #[serde(default = "default_weight")]
        pub weight: f64,
        #[serde(default)]
        pub max_sessions: Option<usize>,
        #[serde(default)]
        pub drain: bool,
        #[serde(default)]
        pub tls: Option<UpstreamTls>,
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Listen {
        pub host: String,
        pub port: u16,
        pub workers: Option<usize>,
        pub stream_path: String,
        pub trusted_proxies: Vec<String>,
        pub tls: Option<ListenTls>,
        pub io: Io,
        pub splice: bool,
    }

    impl File {
        /// Make relative file paths relative to `dir`.
        pub fn resolve_paths(&mut self, dir: &std::path::Path) {
            let resolve = |path: &mut PathBuf| {
                if path.is_relative() {
                    *path = dir.join(&*path);
                }
            };
            if let Some(tls) = &mut self.listen.tls {
                resolve(&mut tls.cert_file);
                resolve(&mut tls.key_file);
            }
            let tables = std::iter::once(&mut self.upstream_tls)
                .chain(self.replicas.iter_mut().filter_map(|r| r.tls.as_mut()))
                .chain(
                    self.replica_groups
                        .iter_mut()
                        .filter_map(|g| g.tls.as_mut()),
                );
            for tls in tables {
                [
                    &mut tls.ca_file,
                    &mut tls.client_cert_file,
                    &mut tls.client_key_file,
                ]
                .into_iter()
                .flatten()
                .for_each(resolve);
            }
        }
    }

    impl Default for Listen {
        fn default() -> Self {
            Listen {
                host: "0.0.0.0".into(),
                port: defaults::PORT,
                workers: None,
                stream_path: defaults::STREAM_PATH.into(),
                trusted_proxies: Vec::new(),
                tls: None,
                io: Io::default(),
                splice: false,
            }
        }
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ListenTls {
        pub cert_file: PathBuf,
        pub key_file: PathBuf,
    }

    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct UpstreamTls {
        pub ca_file: Option<PathBuf>,
        pub client_cert_file: Option<PathBuf>,
        pub client_key_file: Option<PathBuf>,
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Admin {
        pub listen: String,
    }

    #[derive(Debug, Clone, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Log {
        pub format: LogFormat,
    }

    #[derive(Debug, Clone, Deserialize)]
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
                path: defaults::HEALTH_PATH.into(),
                interval_seconds: defaults::INTERVAL_SECONDS,
                timeout_seconds: defaults::TIMEOUT_SECONDS,
                failure_threshold: defaults::FAILURE_THRESHOLD,
                recovery_threshold: defaults::RECOVERY_THRESHOLD,
            }
        }
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Limits {
        pub max_connections: Option<usize>,
        pub max_sessions: Option<usize>,
        pub max_connections_per_client: usize,
        pub max_sessions_per_client: usize,
        pub max_frame_bytes: usize,
        pub header_read_timeout_seconds: f64,
        pub connect_timeout_seconds: f64,
        pub close_timeout_seconds: f64,
        pub drain_timeout_seconds: f64,
        pub drain_mode: DrainMode,
    }

    impl Default for Limits {
        fn default() -> Self {
            Limits {
                max_connections: None,
                max_sessions: None,
                max_connections_per_client: defaults::MAX_CONNECTIONS_PER_CLIENT,
                max_sessions_per_client: defaults::MAX_SESSIONS_PER_CLIENT,
                max_frame_bytes: defaults::MAX_FRAME_BYTES,
                header_read_timeout_seconds: defaults::HEADER_READ_TIMEOUT_SECONDS,
                connect_timeout_seconds: defaults::CONNECT_TIMEOUT_SECONDS,
                close_timeout_seconds: defaults::CLOSE_TIMEOUT_SECONDS,
                drain_timeout_seconds: defaults::DRAIN_TIMEOUT_SECONDS,
                drain_mode: DrainMode::default(),
            }
        }
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Balance {
        pub policy: Policy,
        pub sticky_key: Option<StickyKey>,
        pub race_candidates: usize,
        pub race_delay_seconds: f64,
    }

    impl Default for Balance {
        fn default() -> Self {
            Balance {
                policy: Policy::default(),
                sticky_key: None,
                race_candidates: 1,
                race_delay_seconds: defaults::RACE_DELAY_SECONDS,
            }
        }
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Sessions {
        pub close_on_unhealthy: bool,
        pub max_lifetime_seconds: f64,
        pub idle_timeout_seconds: f64,
        pub ping_interval_seconds: f64,
    }

    impl Default for Sessions {
        fn default() -> Self {
            Sessions {
                close_on_unhealthy: false,
                max_lifetime_seconds: 0.0,
                idle_timeout_seconds: defaults::IDLE_TIMEOUT_SECONDS,
                ping_interval_seconds: defaults::PING_INTERVAL_SECONDS,
            }
        }
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Replica {
        pub url: String,
        #[serde(default)]
        pub name: Option<String>,
        #[serde(default)]
        pub primary: bool,
        #[serde(default = "default_weight")]
        pub weight: f64,
        #[serde(default)]
        pub max_sessions: Option<usize>,
        #[serde(default)]
        pub drain: bool,
        /// Overrides `[upstream_tls]` for this replica (https:// only).
        #[serde(default)]
        pub tls: Option<UpstreamTls>,
    }

    fn default_weight() -> f64 {
        1.0
    }
}

/// Paths the router answers itself; the stream path may not take one of them.
pub const RESERVED_PATHS: [&str; 4] = ["/health", "/ready", "/status", "/metrics"];

impl Config {
    /// Read, parse and validate a config file. Relative TLS file paths in it are relative to
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut file = Config::parse_file(&text)?;
        if let Some(dir) = path.parent() {
            file.resolve_paths(dir);
        }
        Config::from_file(file)
    }

    /// Parse and validate TOML text (relative paths are relative to the working directory).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_file(Config::parse_file(text)?)
    }

    /// Every TLS file (certificate, key, CA) that the config text at `path` names, valid or
    /// not, for the reload watch: a renewed certificate is a reason to reload, and so is a
    /// missing file appearing.
    pub fn tls_files_named(path: &Path, text: &[u8]) -> Vec<PathBuf> {
        let Some(mut file) = std::str::from_utf8(text)
            .ok()
            .and_then(|text| Config::parse_file(text).ok())
        else {
            return Vec::new();
        };
        if let Some(dir) = path.parent() {
            file.resolve_paths(dir);
        }
        let mut files = Vec::new();
        if let Some(tls) = &file.listen.tls {
            files.push(tls.cert_file.clone());
            files.push(tls.key_file.clone());
        }
        let tables = std::iter::once(&file.upstream_tls)
            .chain(file.replicas.iter().filter_map(|r| r.tls.as_ref()))
            .chain(file.replica_groups.iter().filter_map(|g| g.tls.as_ref()));
        for tls in tables {
            files.extend(
                [&tls.ca_file, &tls.client_cert_file, &tls.client_key_file]
                    .into_iter()
                    .flatten()
                    .cloned(),
            );
        }
        files.sort();
        files.dedup();
        files
    }

    fn parse_file(text: &str) -> Result<file::File, ConfigError> {
        toml::from_str(text).map_err(|e| {
            // toml's message spans several lines (a source excerpt): one line per log event.
            let text = e.to_string();
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            ConfigError::Parse(lines.join(" | "))
        })
    }

    fn from_file(file: file::File) -> Result<Config, ConfigError> {
        let replica_groups = replica_groups(&file, &file.upstream_tls)?;
        Ok(Config {
            listen: listen(&file.listen)?,
            admin: admin(file.admin.as_ref(), &file.listen)?,
            log: Log {
                format: file.log.format,
            },
            health_check: health_check(&file.health_check)?,
            limits: limits(&file.limits)?,
            balance: balance(file.balance)?,
            sessions: sessions(&file.sessions)?,
            upstream_tls: upstream_tls(&file.upstream_tls, None, "upstream_tls")?,
            replicas: replicas(
                &file.replicas,
                &file.upstream_tls,
                !file.replica_groups.is_empty(),
            )?,
            replica_groups,
            discovery: Discovery {
                nameserver: match &file.discovery.nameserver {
                    None => None,
                    Some(text) => Some(text.parse().map_err(|_| {
                        invalid(
                            "discovery.nameserver",
                            format!(
                                "{text:?} is not an address:port (for example \"127.0.0.1:53\")"
                            ),
                        )
                    })?),
                },
            },
        })
    }

    /// Worker threads to run: `listen.workers`, or one per CPU core.
    pub fn workers(&self) -> usize {
        self.listen.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen.addr
    }
}

fn listen(file: &file::Listen) -> Result<Listen, ConfigError> {
    let ip: IpAddr = file.host.parse().map_err(|_| {
        invalid(
            "listen.host",
            format!("{:?} is not an IP address", file.host),
        )
    })?;
    if let Some(workers) = file.workers {
        in_range("listen.workers", workers, 1, bounds::WORKERS)?;
    }
    let path = &file.stream_path;
    if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
        return Err(invalid(
            "listen.stream_path",
            format!("{path:?} must be a plain path starting with \"/\""),
        ));
    }
    if RESERVED_PATHS.contains(&path.as_str()) {
        return Err(invalid(
            "listen.stream_path",
            format!("{path:?} is one of the router's own endpoints"),
        ));
    }
    let trusted_proxies = file
        .trusted_proxies
        .iter()
        .enumerate()
        .map(|(i, text)| {
            text.parse::<Cidr>()
                .map_err(|reason| invalid(format!("listen.trusted_proxies[{i}]"), reason))
        })
        .collect::<Result<_, _>>()?;
    let tls = file.tls.as_ref().map(listen_tls).transpose()?;
    let io = io_setting(file.io, std::env::var(Io::ENV).ok().as_deref())?;
    Ok(Listen {
        addr: SocketAddr::new(ip, file.port),
        workers: file.workers,
        stream_path: path.clone(),
        trusted_proxies,
        tls,
        io,
        splice: file.splice,
    })
}

/// `[listen] io`, unless the environment variable [`Io::ENV`] says otherwise.
fn io_setting(file: Io, env: Option<&str>) -> Result<Io, ConfigError> {
    match env {
        None => Ok(file),
        Some("epoll") => Ok(Io::Epoll),
        Some("io_uring") => Ok(Io::IoUring),
        Some(other) => Err(invalid(
            Io::ENV,
            format!("{other:?} is neither \"epoll\" nor \"io_uring\""),
        )),
    }
}

/// Load and check the listener's certificate and key, naming the key at fault.
fn listen_tls(file: &file::ListenTls) -> Result<ListenTls, ConfigError> {
    let config = crate::tls::server_config(&file.cert_file, &file.key_file).map_err(|e| {
        let key = match &e {
            TlsError::NoKey { .. } | TlsError::KeyMismatch { .. } => "listen.tls.key_file",
            TlsError::Read { path, .. } | TlsError::Invalid { path, .. }
                if *path == file.key_file =>
            {
                "listen.tls.key_file"
            }
            _ => "listen.tls.cert_file",
        };
        invalid(key, e.to_string())
    })?;
    Ok(ListenTls {
        cert_file: file.cert_file.clone(),
        key_file: file.key_file.clone(),
        config,
    })
}

/// TLS settings for replicas: `file`'s keys over `base`'s; checked (the files load).
fn upstream_tls(
    file: &file::UpstreamTls,
    base: Option<&file::UpstreamTls>,
    table: &str,
) -> Result<UpstreamTls, ConfigError> {
    let pick = |own: &Option<PathBuf>, inherited: Option<&Option<PathBuf>>| {
        own.clone().or_else(|| inherited.cloned().flatten())
    };
    let ca_file = pick(&file.ca_file, base.map(|b| &b.ca_file));
    let (cert, key) = if file.client_cert_file.is_some() || file.client_key_file.is_some() {
        (file.client_cert_file.clone(), file.client_key_file.clone())
    } else {
        (
            base.and_then(|b| b.client_cert_file.clone()),
            base.and_then(|b| b.client_key_file.clone()),
        )
    };
    let client_cert = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid(
                format!("{table}.client_key_file"),
                "client_cert_file needs client_key_file",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                format!("{table}.client_cert_file"),
                "client_key_file needs client_cert_file",
            ))
        }
    };
    let settings = UpstreamTls {
        ca_file,
        client_cert,
    };
    if let Some(path) = &settings.ca_file {
        crate::tls::load_certs(path)
            .map_err(|e| invalid(format!("{table}.ca_file"), e.to_string()))?;
    }
    if let Some((cert, key)) = &settings.client_cert {
        crate::tls::load_certified_key(cert, key).map_err(|e| {
            let field = match &e {
                TlsError::NoKey { .. } | TlsError::KeyMismatch { .. } => "client_key_file",
                TlsError::Read { path, .. } | TlsError::Invalid { path, .. } if path == key => {
                    "client_key_file"
                }
                _ => "client_cert_file",
            };
            invalid(format!("{table}.{field}"), e.to_string())
        })?;
    }
    Ok(settings)
}

fn admin(file: Option<&file::Admin>, listen: &file::Listen) -> Result<Option<Admin>, ConfigError> {
    let Some(file) = file else { return Ok(None) };
    let addr: SocketAddr = file.listen.parse().map_err(|_| {
        invalid(
            "admin.listen",
            format!(
                "{:?} is not an address like \"127.0.0.1:9901\"",
                file.listen
            ),
        )
    })?;
    if addr.port() != 0 && addr.port() == listen.port {
        return Err(invalid(
            "admin.listen",
            format!("port {} is already the public listen.port", addr.port()),
        ));
    }
    Ok(Some(Admin { addr }))
}

fn health_check(file: &file::HealthCheck) -> Result<HealthCheck, ConfigError> {
    if !file.path.starts_with('/') {
        return Err(invalid(
            "health_check.path",
            format!("{:?} must start with \"/\"", file.path),
        ));
    }
    if file.path.contains(['?', '#', ' ']) {
        return Err(invalid(
            "health_check.path",
            "must be a plain path (no query, fragment or spaces)",
        ));
    }
    in_range(
        "health_check.failure_threshold",
        file.failure_threshold,
        1,
        bounds::THRESHOLD,
    )?;
    in_range(
        "health_check.recovery_threshold",
        file.recovery_threshold,
        1,
        bounds::THRESHOLD,
    )?;
    Ok(HealthCheck {
        path: file.path.clone(),
        interval: positive_seconds("health_check.interval_seconds", file.interval_seconds)?,
        timeout: positive_seconds("health_check.timeout_seconds", file.timeout_seconds)?,
        failure_threshold: file.failure_threshold,
        recovery_threshold: file.recovery_threshold,
    })
}

fn limits(file: &file::Limits) -> Result<Limits, ConfigError> {
    if let Some(sessions) = file.max_sessions {
        in_range("limits.max_sessions", sessions, 1, bounds::COUNT)?;
    }
    if let Some(connections) = file.max_connections {
        in_range("limits.max_connections", connections, 1, bounds::COUNT)?;
    }
    // A default gives way to an explicit value of the other: every session holds a connection.
    let max_connections = match (file.max_connections, file.max_sessions) {
        (Some(connections), _) => connections,
        (None, Some(sessions)) => sessions.max(defaults::MAX_CONNECTIONS),
        (None, None) => defaults::MAX_CONNECTIONS,
    };
    let max_sessions = file
        .max_sessions
        .unwrap_or(defaults::MAX_SESSIONS.min(max_connections));
    if max_sessions > max_connections {
        return Err(invalid(
            "limits.max_sessions",
            format!(
                "{max_sessions} is more than limits.max_connections ({max_connections}): every session holds a client connection"
            ),
        ));
    }
    in_range(
        "limits.max_connections_per_client",
        file.max_connections_per_client,
        0,
        bounds::COUNT,
    )?;
    in_range(
        "limits.max_sessions_per_client",
        file.max_sessions_per_client,
        0,
        bounds::COUNT,
    )?;
    in_range(
        "limits.max_frame_bytes",
        file.max_frame_bytes,
        125,
        bounds::FRAME_BYTES,
    )
    .map_err(|_| {
        invalid(
            "limits.max_frame_bytes",
            format!(
                "must be between 125 (the largest control frame) and {} (1 GiB), got {}",
                bounds::FRAME_BYTES,
                file.max_frame_bytes
            ),
        )
    })?;
    let unlimited_if_zero = |n: usize| if n == 0 { usize::MAX } else { n };
    Ok(Limits {
        max_connections,
        max_sessions,
        max_connections_per_client: unlimited_if_zero(file.max_connections_per_client),
        max_sessions_per_client: unlimited_if_zero(file.max_sessions_per_client),
        connections_by_default: file.max_connections.is_none(),
        sessions_by_default: file.max_sessions.is_none(),
        max_frame_bytes: file.max_frame_bytes,
        header_read_timeout: positive_seconds(
            "limits.header_read_timeout_seconds",
            file.header_read_timeout_seconds,
        )?,
        connect_timeout: positive_seconds(
            "limits.connect_timeout_seconds",
            file.connect_timeout_seconds,
        )?,
        close_timeout: positive_seconds(
            "limits.close_timeout_seconds",
            file.close_timeout_seconds,
        )?,
        drain_timeout: positive_seconds(
            "limits.drain_timeout_seconds",
            file.drain_timeout_seconds,
        )?,
        drain_mode: file.drain_mode,
    })
}

fn balance(file: file::Balance) -> Result<Balance, ConfigError> {
    let mut sticky_key = file.sticky_key;
    if let Some(sticky) = &mut sticky_key {
        let (StickyKey::Query(name) | StickyKey::Header(name) | StickyKey::Cookie(name)) = sticky;
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
    in_range(
        "balance.race_candidates",
        file.race_candidates,
        1,
        bounds::RACE_CANDIDATES,
    )
    .map_err(|_| {
        invalid(
            "balance.race_candidates",
            format!(
                "must be between 1 (no racing) and {}, got {}",
                bounds::RACE_CANDIDATES,
                file.race_candidates
            ),
        )
    })?;
    Ok(Balance {
        policy: file.policy,
        sticky_key,
        race_candidates: file.race_candidates,
        race_delay: seconds_within(
            "balance.race_delay_seconds",
            file.race_delay_seconds,
            bounds::RACE_DELAY_SECONDS,
        )?
        .unwrap_or(Duration::ZERO),
    })
}

fn sessions(file: &file::Sessions) -> Result<Sessions, ConfigError> {
    Ok(Sessions {
        close_on_unhealthy: file.close_on_unhealthy,
        max_lifetime: seconds_within(
            "sessions.max_lifetime_seconds",
            file.max_lifetime_seconds,
            bounds::LIFETIME_SECONDS,
        )?,
        idle_timeout: seconds_within(
            "sessions.idle_timeout_seconds",
            file.idle_timeout_seconds,
            bounds::SECONDS,
        )?,
        ping_interval: seconds_within(
            "sessions.ping_interval_seconds",
            file.ping_interval_seconds,
            bounds::SECONDS,
        )?,
    })
}

fn replicas(
    file: &[file::Replica],
    base_tls: &file::UpstreamTls,
    has_groups: bool,
) -> Result<Vec<Replica>, ConfigError> {
    // Replicas with the same settings share one client config (and its resumption cache).
    let mut client_configs: HashMap<UpstreamTls, Arc<rustls::ClientConfig>> = HashMap::new();
    if file.is_empty() && !has_groups {
        return Err(invalid(
            "replicas",
            "at least one [[replicas]] entry (or a [[replica_groups]] entry) is required",
        ));
    }
    let mut replicas: Vec<Replica> = Vec::with_capacity(file.len());
    let mut primary_seen: Option<usize> = None;
    for (i, entry) in file.iter().enumerate() {
        let key = |field: &str| format!("replicas[{i}].{field}");
        let addr = parse_replica_url(&entry.url).map_err(|reason| invalid(key("url"), reason))?;
        let name = entry.name.clone().unwrap_or_else(|| addr.authority.clone());
        if name.is_empty() {
            return Err(invalid(key("name"), "must not be empty"));
        }
        check_weight(&key("weight"), entry.weight)?;
        check_max_sessions(&key("max_sessions"), entry.max_sessions)?;
        if entry.primary {
            if let Some(first) = primary_seen {
                return Err(invalid(
                    key("primary"),
                    format!("replicas[{first}] is already the primary; at most one replica may be primary"),
                ));
            }
            primary_seen = Some(i);
        }
        for (j, other) in replicas.iter().enumerate() {
            if other.url == addr.url {
                return Err(invalid(
                    key("url"),
                    format!("duplicate of replicas[{j}].url {:?}", other.url),
                ));
            }
            if other.name == name {
                return Err(invalid(
                    key("name"),
                    format!("duplicate of replicas[{j}].name {:?}", other.name),
                ));
            }
        }
        let tls = match (addr.tls, &entry.tls) {
            (false, Some(_)) => {
                return Err(invalid(
                    key("tls"),
                    "only https:// replicas take TLS settings",
                ))
            }
            (false, None) => None,
            (true, own) => {
                let empty = file::UpstreamTls::default();
                let settings =
                    upstream_tls(own.as_ref().unwrap_or(&empty), Some(base_tls), &key("tls"))?;
                let config = match client_configs.get(&settings) {
                    Some(config) => config.clone(),
                    None => {
                        let config = crate::tls::client_config(&settings)
                            .map_err(|e| invalid(key("url"), e.to_string()))?;
                        client_configs.insert(settings.clone(), config.clone());
                        config
                    }
                };
                let server_name = crate::tls::server_name(&addr.host)
                    .map_err(|reason| invalid(key("url"), reason))?;
                Some(ReplicaTls {
                    settings,
                    server_name,
                    config,
                })
            }
        };
        replicas.push(Replica {
            name,
            url: addr.url,
            authority: addr.authority,
            tls,
            primary: entry.primary,
            weight: entry.weight,
            max_sessions: entry.max_sessions,
            drain: entry.drain,
            group: None,
        });
    }
    Ok(replicas)
}

fn check_weight(key: &str, weight: f64) -> Result<(), ConfigError> {
    if weight.is_finite() && weight > 0.0 && weight <= bounds::WEIGHT {
        return Ok(());
    }
    Err(invalid(
        key,
        format!(
            "must be a number greater than 0 and at most {}, got {weight}",
            bounds::WEIGHT
        ),
    ))
}

fn check_max_sessions(key: &str, max: Option<usize>) -> Result<(), ConfigError> {
    match max {
        Some(max) if !(1..=bounds::COUNT).contains(&max) => Err(invalid(
            key,
            format!(
                "must be between 1 and {} (leave it out for no limit), got {max}",
                bounds::COUNT
            ),
        )),
        _ => Ok(()),
    }
}

/// A DNS name a group may look up.
fn dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.contains(['/', ':', ' ']) {
        return Err(format!("{name:?} is not a DNS name"));
    }
    hickory_resolver::proto::rr::Name::from_ascii(name)
        .map(|_| ())
        .map_err(|e| format!("{name:?} is not a DNS name ({e})"))
}

fn replica_groups(
    file: &file::File,
    base_tls: &file::UpstreamTls,
) -> Result<Vec<ReplicaGroup>, ConfigError> {
    let mut groups: Vec<ReplicaGroup> = Vec::with_capacity(file.replica_groups.len());
    let mut primary_seen = file
        .replicas
        .iter()
        .position(|r| r.primary)
        .map(|i| format!("replicas[{i}]"));
    for (i, entry) in file.replica_groups.iter().enumerate() {
        let key = |field: &str| format!("replica_groups[{i}].{field}");
        if entry.url.is_some() {
            return Err(invalid(
                key("url"),
                "a group is found through `dns` or `srv`, not a url (one replica with a url is a [[replicas]] entry)",
            ));
        }
        let lookup = match (&entry.dns, &entry.srv) {
            (Some(_), Some(_)) => return Err(invalid(key("srv"), "set `dns` or `srv`, not both")),
            (None, None) => {
                return Err(invalid(
                    key("dns"),
                    "a group needs `dns` (with `port`) or `srv`",
                ))
            }
            (Some(name), None) => {
                dns_name(name).map_err(|reason| invalid(key("dns"), reason))?;
                let port = match entry.port {
                    None => {
                        return Err(invalid(
                            key("port"),
                            "required with `dns` (SRV records carry their own ports)",
                        ))
                    }
                    Some(port) => u16::try_from(port).ok().filter(|&p| p > 0).ok_or_else(|| {
                        invalid(
                            key("port"),
                            format!("must be between 1 and 65535, got {port}"),
                        )
                    })?,
                };
                GroupLookup::Host {
                    name: name.clone(),
                    port,
                }
            }
            (None, Some(name)) => {
                dns_name(name).map_err(|reason| invalid(key("srv"), reason))?;
                if !name.starts_with('_') {
                    return Err(invalid(
                        key("srv"),
                        format!("{name:?} is not an SRV name (_service._proto.domain)"),
                    ));
                }
                if entry.port.is_some() {
                    return Err(invalid(
                        key("port"),
                        "not with `srv`: its records carry the ports",
                    ));
                }
                GroupLookup::Srv { name: name.clone() }
            }
        };
        let tls = match entry.scheme.as_deref().unwrap_or("http") {
            "http" if entry.tls.is_some() => {
                return Err(invalid(key("tls"), "only https groups take TLS settings"))
            }
            "http" => None,
            "https" => {
                let empty = file::UpstreamTls::default();
                let settings = upstream_tls(
                    entry.tls.as_ref().unwrap_or(&empty),
                    Some(base_tls),
                    &key("tls"),
                )?;
                let config = crate::tls::client_config(&settings)
                    .map_err(|e| invalid(key("tls"), e.to_string()))?;
                Some(GroupTls { settings, config })
            }
            other => {
                return Err(invalid(
                    key("scheme"),
                    format!("must be \"http\" or \"https\", got {other:?}"),
                ))
            }
        };
        let name = entry.name.clone().unwrap_or_else(|| match &lookup {
            GroupLookup::Host { name, .. } | GroupLookup::Srv { name } => name.clone(),
        });
        if name.is_empty() {
            return Err(invalid(key("name"), "must not be empty"));
        }
        if let Some(j) = groups.iter().position(|g| g.name == name) {
            return Err(invalid(
                key("name"),
                format!("duplicate of replica_groups[{j}].name {name:?}"),
            ));
        }
        check_weight(&key("weight"), entry.weight)?;
        check_max_sessions(&key("max_sessions"), entry.max_sessions)?;
        if entry.primary {
            if let Some(first) = &primary_seen {
                return Err(invalid(
                    key("primary"),
                    format!(
                        "{first} is already primary; at most one replica or group may be primary"
                    ),
                ));
            }
            primary_seen = Some(format!("replica_groups[{i}]"));
        }
        groups.push(ReplicaGroup {
            name,
            lookup,
            tls,
            primary: entry.primary,
            weight: entry.weight,
            max_sessions: entry.max_sessions,
            drain: entry.drain,
        });
    }
    Ok(groups)
}

fn in_range<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!("must be between {min} and {max}, got {value}"),
        ));
    }
    Ok(())
}

/// A duration that must be on: greater than 0, at most a day.
fn positive_seconds(key: &str, value: f64) -> Result<Duration, ConfigError> {
    if !(value.is_finite() && value > 0.0 && value <= bounds::SECONDS) {
        return Err(invalid(
            key,
            format!(
                "must be greater than 0 and at most {} seconds, got {value}",
                bounds::SECONDS
            ),
        ));
    }
    Ok(Duration::from_secs_f64(value))
}

/// A duration where 0 means off, at most `max` seconds.
fn seconds_within(key: &str, value: f64, max: f64) -> Result<Option<Duration>, ConfigError> {
    if !(value.is_finite() && (0.0..=max).contains(&value)) {
        return Err(invalid(
            key,
            format!("must be a number of seconds from 0 (off) to {max}, got {value}"),
        ));
    }
    Ok((value > 0.0).then(|| Duration::from_secs_f64(value)))
}

/// A validated replica address: `http(s)://host:port` with the port made explicit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaAddr {
    /// Normalised url, without a trailing "/".
    pub url: String,
    /// `host:port` as sent in the Host header and used to connect.
    pub authority: String,
    pub host: String,
    /// `https://`: the connection is TLS.
    pub tls: bool,
}

/// Check a replica url: `http(s)://host[:port][/]`, nothing else. Returns the normalised form.
pub fn parse_replica_url(url: &str) -> Result<ReplicaAddr, String> {
    if url.contains('#') {
        return Err(format!("{url:?} must not have a fragment"));
    }
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a valid url ({e})"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(format!("{url:?} must start with http:// or https://")),
    };
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
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let host = authority.host();
    let scheme = if tls { "https" } else { "http" };
    Ok(ReplicaAddr {
        url: format!("{scheme}://{host}:{port}"),
        authority: format!("{host}:{port}"),
        host: host.to_string(),
        tls,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_data_plane_comes_from_the_file_unless_the_environment_overrides_it() {
        use super::{io_setting, Io};
        assert_eq!(io_setting(Io::IoUring, None).unwrap(), Io::IoUring);
        assert_eq!(
            io_setting(Io::Epoll, Some("io_uring")).unwrap(),
            Io::IoUring
        );
        assert_eq!(io_setting(Io::IoUring, Some("epoll")).unwrap(), Io::Epoll);
        let error = io_setting(Io::Epoll, Some("kqueue"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("WSROUTER_IO") && error.contains("kqueue"),
            "{error}"
        );
        let error = super::Config::parse(
            "[listen]\nio = \"kqueue\"\n[[replicas]]\nurl = \"http://127.0.0.1:1\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("io") && error.contains("kqueue"), "{error}");
    }

    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    const ONE: &str = "[[replicas]]\nurl = \"http://127.0.0.1:8001\"\n";

    #[test]
    fn defaults_match_reference() {
        let c = Config::parse(ONE).unwrap();
        assert_eq!(c.listen.addr, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(c.listen.stream_path, "/v1/stream");
        assert_eq!(c.health_check.path, "/health");
        assert_eq!(c.health_check.interval, Duration::from_secs(5));
        assert_eq!(c.health_check.timeout, Duration::from_secs(2));
        assert_eq!(
            (
                c.health_check.failure_threshold,
                c.health_check.recovery_threshold
            ),
            (3, 2)
        );
        assert_eq!(c.replicas[0].weight, 1.0);
        assert!(!c.replicas[0].primary);
        assert_eq!(c.replicas[0].name, "127.0.0.1:8001");
        assert_eq!(c.balance.policy, Policy::Failover);
        assert_eq!(c.replicas[0].max_sessions, None);
        assert_eq!(c.admin, None);
        assert!(c.limits.connections_by_default && c.limits.sessions_by_default);
        assert_eq!(
            (c.limits.max_connections, c.limits.max_sessions),
            (10_000, 8_000)
        );
        assert_eq!(c.sessions.ping_interval, Some(Duration::from_secs(30)));
        assert_eq!(c.sessions.idle_timeout, Some(Duration::from_secs(600)));
    }

    #[test]
    fn the_shipped_config_shows_the_defaults() {
        let shipped = include_str!("../config/router.toml");
        let replicas = &shipped[shipped.find("[[replicas]]").unwrap()..];
        assert_eq!(
            Config::parse(shipped).unwrap(),
            Config::parse(replicas).unwrap()
        );
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
        assert!(err("[[replicas]]\nurl = \"ws://x\"\n").contains("http:// or https://"));
        let e = err("[[replicas]]\nurl = \"http://x\"\ntls = { ca_file = \"/x\" }\n");
        assert!(e.contains("replicas[0].tls"), "{e}");
        let e = err("[[replicas]]\nurl = \"https://x\"\n[replicas.tls]\nca_file = \"/nonexistent/ca.pem\"\n");
        assert!(
            e.contains("replicas[0].tls.ca_file") && e.contains("cannot read"),
            "{e}"
        );
        let e = err(&format!(
            "[upstream_tls]\nclient_cert_file = \"/x.pem\"\n{ONE}"
        ));
        assert!(e.contains("upstream_tls.client_key_file"), "{e}");
        let e = err(&format!("[listen.tls]\ncert_file = \"/nonexistent/c.pem\"\nkey_file = \"/nonexistent/k.pem\"\n{ONE}"));
        assert!(
            e.contains("listen.tls.cert_file") && e.contains("cannot read"),
            "{e}"
        );
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
        assert!(err(&format!("[listen]\nstream_path = \"/status\"\n{ONE}"))
            .contains("listen.stream_path"));
        assert!(
            err(&format!("[listen]\nstream_path = \"v1\"\n{ONE}")).contains("listen.stream_path")
        );
        assert!(err(&format!(
            "[listen]\ntrusted_proxies = [\"10.0.0.0/33\"]\n{ONE}"
        ))
        .contains("listen.trusted_proxies[0]"));
        assert!(err(&format!("[admin]\nlisten = \"localhost\"\n{ONE}")).contains("admin.listen"));
        assert!(
            err(&format!("[admin]\nlisten = \"127.0.0.1:9000\"\n{ONE}")).contains("admin.listen")
        );
        assert!(err(&format!("[log]\nformat = \"xml\"\n{ONE}")).contains("unknown variant"));
        assert!(err(&format!(
            "[limits]\nmax_connections = 10\nmax_sessions = 20\n{ONE}"
        ))
        .contains("limits.max_sessions"));
    }

    #[test]
    fn every_duration_and_size_is_bounded() {
        // Each of these passed validation once and panicked later (Duration overflow).
        for (table, key, value) in [
            ("balance", "race_delay_seconds", "1e300"),
            ("sessions", "max_lifetime_seconds", "1e300"),
            ("sessions", "idle_timeout_seconds", "1e300"),
            ("sessions", "ping_interval_seconds", "inf"),
            ("limits", "connect_timeout_seconds", "1e300"),
            ("limits", "close_timeout_seconds", "nan"),
            ("health_check", "interval_seconds", "1e20"),
            ("limits", "max_frame_bytes", "4294967296"),
            ("limits", "max_sessions", "100000000000"),
            ("balance", "race_candidates", "1000000"),
        ] {
            let e = err(&format!("[{table}]\n{key} = {value}\n{ONE}"));
            assert!(
                e.contains(&format!("{table}.{key}")),
                "{table}.{key} = {value}: {e}"
            );
        }
        let e = err("[[replicas]]\nurl = \"http://a\"\nweight = 1e300\n");
        assert!(e.contains("replicas[0].weight"), "{e}");
    }

    #[test]
    fn replica_groups_are_checked_with_the_key_at_fault() {
        let group = |body: &str| format!("[[replica_groups]]\n{body}\n");
        for (body, key, words) in [
            (
                "dns = \"a.test\"\nurl = \"http://a.test:1\"",
                "replica_groups[0].url",
                "not a url",
            ),
            (
                "dns = \"a.test\"\nsrv = \"_ws._tcp.a.test\"",
                "replica_groups[0].srv",
                "not both",
            ),
            ("port = 80", "replica_groups[0].dns", "needs `dns`"),
            (
                "dns = \"a.test\"",
                "replica_groups[0].port",
                "required with `dns`",
            ),
            (
                "dns = \"a.test\"\nport = 70000",
                "replica_groups[0].port",
                "between 1 and 65535, got 70000",
            ),
            (
                "dns = \"a.test\"\nport = 0",
                "replica_groups[0].port",
                "got 0",
            ),
            (
                "srv = \"_ws._tcp.a.test\"\nport = 80",
                "replica_groups[0].port",
                "not with `srv`",
            ),
            (
                "srv = \"a.test\"",
                "replica_groups[0].srv",
                "not an SRV name",
            ),
            (
                "dns = \"a test\"\nport = 80",
                "replica_groups[0].dns",
                "not a DNS name",
            ),
            (
                "dns = \"a.test\"\nport = 80\nscheme = \"ws\"",
                "replica_groups[0].scheme",
                "\"http\" or \"https\"",
            ),
            (
                "dns = \"a.test\"\nport = 80\ntls = { ca_file = \"x\" }",
                "replica_groups[0].tls",
                "only https",
            ),
            (
                "dns = \"a.test\"\nport = 80\nweight = 0",
                "replica_groups[0].weight",
                "greater than 0",
            ),
        ] {
            let e = err(&group(body));
            assert!(e.contains(key) && e.contains(words), "{body}: {e}");
        }
        let two = format!(
            "{}{}",
            group("dns = \"a.test\"\nport = 80"),
            group("dns = \"a.test\"\nport = 81")
        );
        assert!(
            err(&two).contains("replica_groups[1].name: duplicate"),
            "{}",
            err(&two)
        );
        let primaries = format!(
            "{ONE}primary = true\n{}",
            group("dns = \"a.test\"\nport = 80\nprimary = true")
        );
        assert!(
            err(&primaries).contains("replica_groups[0].primary"),
            "{}",
            err(&primaries)
        );
        let e = err("[discovery]\nnameserver = \"localhost\"\n[[replica_groups]]\ndns = \"a.test\"\nport = 80\n");
        assert!(e.contains("discovery.nameserver"), "{e}");
        // A group alone is a fleet; nothing at all is not.
        let c = Config::parse(&group("srv = \"_ws._tcp.a.test\"\nscheme = \"https\"")).unwrap();
        assert_eq!(c.replica_groups[0].name, "_ws._tcp.a.test");
        assert!(c.replica_groups[0].tls.is_some());
        assert!(err("[listen]\nport = 1\n").contains("[[replica_groups]]"));
    }

    #[test]
    fn parse_errors_are_one_line() {
        let e = err("[limits\nmax_sessions = 1\n");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn cidrs_match_their_blocks() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one: Cidr = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("::2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        assert!("10.0.0.0/40".parse::<Cidr>().is_err());
        assert!("example.com".parse::<Cidr>().is_err());
    }

    #[test]
    fn strict_types_and_keys() {
        let e = err("[[replicas]]\nurl = \"http://a\"\nprimary = \"false\"\n");
        assert!(e.contains("primary") && e.contains("invalid type"), "{e}");
        let e = err(&format!("[listen]\nsplice = \"yes\"\n{ONE}"));
        assert!(e.contains("splice") && e.contains("invalid type"), "{e}");
        assert!(
            !Config::parse(ONE).unwrap().listen.splice,
            "splice is off unless asked"
        );
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
