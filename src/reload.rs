//! Hot reload: a new config is applied to a running router on SIGHUP and when the file
//! changes. All or nothing: the file is read and validated whole, the new settings are built,
//! and only then swapped in. A file that cannot be read leaves everything as it is; one that
//! is invalid is logged with the key at fault and the running config stays.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{Config, ConfigError};
use crate::http::Proxy;
use crate::metrics::Metrics;
use crate::registry::{Changes, Registry};

/// Applies reloaded configs to a running router: replicas, health checks, balancing, session
/// settings and the per-client limits, for new sessions. Live sessions are untouched;
/// replicas whose url is unchanged keep their health state; a renewed listener certificate
/// serves connections accepted from then on. `[listen]` (but its certificate), `[admin]` and
/// the router-wide connection and session limits are fixed at start: a change to them is
/// reported and needs a restart.
#[derive(Clone)]
pub struct Reloader {
    registry: Arc<Registry>,
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    running: Arc<Mutex<Config>>,
    /// max_connections and max_sessions in force.
    limits: (usize, usize),
}

/// What a reload did.
#[derive(Debug)]
pub enum Reload {
    Applied(Changes),
    /// The file could not be read (say, for want of descriptors): nothing changed.
    Unread(ConfigError),
    /// The file was read and is invalid: nothing changed.
    Rejected(ConfigError),
}

impl Reloader {
    pub(crate) fn new(
        registry: Arc<Registry>,
        proxy: Arc<Proxy>,
        metrics: Arc<Metrics>,
        running: Arc<Mutex<Config>>,
        limits: (usize, usize),
    ) -> Reloader {
        Reloader {
            registry,
            proxy,
            metrics,
            running,
            limits,
        }
    }

    /// Apply a validated config.
    pub fn apply(&self, config: Config) -> Changes {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        self.warn_about_fixed_settings(&running, &config);
        // Everything is built from a config that passed validation: nothing below can fail.
        let changes = self.registry.reconfigure(&config);
        self.proxy.reconfigure(&config);
        tracing::info!(
            added = %changes.added.join(","),
            removed = %changes.removed.join(","),
            draining = %changes.draining.join(","),
            kept = changes.kept.len(),
            "config reloaded"
        );
        self.metrics.reloads.ok.fetch_add(1, Ordering::Relaxed);
        self.metrics.reloads.last_ok_unix_ms.store(
            (crate::registry::unix_now() * 1000.0) as u64,
            Ordering::Relaxed,
        );
        *running = config;
        changes
    }

    /// Settings that only a restart changes: say so, naming old and new, when they changed.
    fn warn_about_fixed_settings(&self, running: &Config, new: &Config) {
        for change in fixed_setting_changes(running, new, self.limits) {
            tracing::warn!(
                setting = change.setting,
                running = %change.running,
                configured = %change.configured,
                "{} changed in the config; it takes effect on restart",
                change.setting
            );
        }
    }

    /// Load `path` and apply it; a file that cannot be read or is invalid changes nothing.
    pub fn reload_file(&self, path: &Path) -> Reload {
        match Config::load(path) {
            Ok(config) => Reload::Applied(self.apply(config)),
            Err(error) if error.is_read_error() => {
                tracing::warn!(path = %path.display(), %error, "config file unreadable; the running config stays unchanged");
                Reload::Unread(error)
            }
            Err(error) => {
                self.metrics.reloads.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(path = %path.display(), %error, "config reload rejected; the running config stays");
                Reload::Rejected(error)
            }
        }
    }

    /// Reload on SIGHUP, and whenever the file's contents or those of a TLS file it names
    /// change (a renewed certificate, say; looked at every `poll`).
    /// The SIGHUP handler is installed before this returns, so a signal sent once the router
    /// listens cannot hit SIGHUP's default action (exit). Call it inside the runtime.
    pub fn watch(self, path: PathBuf, poll: Duration) -> impl Future<Output = ()> {
        let seen = look(&path).ok();
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        self.watch_loop(path, poll, seen, hangups)
    }

    async fn watch_loop(
        self,
        path: PathBuf,
        poll: Duration,
        mut seen: Option<Looked>,
        mut hangups: Option<tokio::signal::unix::Signal>,
    ) {
        loop {
            let hangup = async {
                match hangups.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            let forced = tokio::select! {
                _ = hangup => true,
                () = tokio::time::sleep(poll) => false,
            };
            if forced {
                tracing::info!(path = %path.display(), "SIGHUP: reloading the config");
            }
            match look(&path) {
                // Unread is not changed: keep what was seen and try again at the next look.
                Err(error) => {
                    if forced {
                        tracing::warn!(path = %path.display(), %error, "config file unreadable; the running config stays unchanged");
                    }
                }
                Ok(contents) => {
                    if forced || seen.as_ref() != Some(&contents) {
                        // Remembered even when invalid, so a bad file is reported once, not
                        // every poll.
                        seen = Some(contents);
                        let _ = self.reload_file(&path);
                    }
                }
            }
        }
    }
}

/// A setting that only a restart changes, changed in a reloaded config.
#[derive(Debug, PartialEq)]
struct FixedChange {
    setting: &'static str,
    running: String,
    configured: String,
}

/// What a reload of `new` over `running` changes that needs a restart, compared by the values
/// in effect (workers left unset equal one per core; limits left at their defaults equal
/// the `limits` the router fitted at start), so nothing that did not change is reported.
fn fixed_setting_changes(
    running: &Config,
    new: &Config,
    (max_connections, max_sessions): (usize, usize),
) -> Vec<FixedChange> {
    let mut changes = Vec::new();
    let mut compare = |setting, running: String, configured: String| {
        if running != configured {
            changes.push(FixedChange {
                setting,
                running,
                configured,
            });
        }
    };
    compare(
        "listen address",
        running.listen_addr().to_string(),
        new.listen_addr().to_string(),
    );
    let tls = |config: &Config| {
        if config.listen.tls.is_some() {
            "tls"
        } else {
            "plain"
        }
        .to_string()
    };
    // A changed certificate applies now; turning TLS on or off does not.
    compare("listen.tls", tls(running), tls(new));
    compare(
        "listen.io",
        running.listen.io.name().to_string(),
        new.listen.io.name().to_string(),
    );
    compare(
        "listen.workers",
        running.workers().to_string(),
        new.workers().to_string(),
    );
    let admin = |config: &Config| {
        config
            .admin
            .as_ref()
            .map_or("-".to_string(), |a| a.addr.to_string())
    };
    compare("admin.listen", admin(running), admin(new));
    if !new.limits.connections_by_default {
        compare(
            "limits.max_connections",
            max_connections.to_string(),
            new.limits.max_connections.to_string(),
        );
    }
    if !new.limits.sessions_by_default {
        compare(
            "limits.max_sessions",
            max_sessions.to_string(),
            new.limits.max_sessions.to_string(),
        );
    }
    changes
}

/// The config file's contents and those of every TLS file it names (`None`: unreadable).
type Looked = (Vec<u8>, Vec<(PathBuf, Option<Vec<u8>>)>);

/// Read the config file and the TLS files it names; an unreadable config file is an error
/// (nothing to compare), an unreadable TLS file just one more state to compare.
fn look(path: &Path) -> std::io::Result<Looked> {
    let text = std::fs::read(path)?;
    let files = Config::tls_files_named(path, &text)
        .into_iter()
        .map(|file| {
            let contents = std::fs::read(&file).ok();
            (file, contents)
        })
        .collect();
    Ok((text, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::parse(&format!(
            "{extra}\n[[replicas]]\nurl = \"http://127.0.0.1:8001\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn only_settings_that_really_changed_are_reported_with_old_and_new_values() {
        let running = config("[listen]\nport = 9000");
        let cores = running.workers();
        // Equal in effect: nothing to say.
        let same = config(&format!(
            "[listen]\nport = 9000\nworkers = {cores}\nstream_path = \"/other\"\n[balance]\npolicy = \"round_robin\""
        ));
        assert_eq!(fixed_setting_changes(&running, &same, (100, 50)), []);
        let moved = config(
            "[listen]\nport = 9001\n[admin]\nlisten = \"127.0.0.1:9901\"\n[limits]\nmax_sessions = 40",
        );
        let changes = fixed_setting_changes(&running, &moved, (100, 50));
        let named: Vec<_> = changes
            .iter()
            .map(|c| (c.setting, c.running.as_str(), c.configured.as_str()))
            .collect();
        assert_eq!(
            named,
            [
                ("listen address", "0.0.0.0:9000", "0.0.0.0:9001"),
                ("admin.listen", "-", "127.0.0.1:9901"),
                ("limits.max_sessions", "50", "40"),
            ]
        );
    }
}
