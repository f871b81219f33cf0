//! wsrouter: a WebSocket load balancer and reverse proxy for fleets of streaming replicas.
//!
//! Along the data path, each module depending only on those after it:
//!
//! - [`http`]: the tower stack per connection: routing, upgrade check, drain gate, session
//!   permits, replica selection, the upstream join, and the one place refusals are answered;
//!   the admin endpoints.
//! - [`upstream`]: the connector (TCP, with a timeout layer) and the upstream handshake.
//! - [`session`]: a session's life from its 101 to its end, and its access-log line.
//! - [`relay`]: the two frame pumps and the bridge between them (orders, streaming of large
//!   frames, keepalive).
//! - [`frames`]: reading, writing, masking and checking WebSocket frames.
//!
//! Beside the path: [`server`] (listeners, workers, accept loop, drain), [`reload`],
//! [`registry`] (replicas, health state, the lock-free snapshot), [`health`] (probe loop),
//! [`balance`] (ordering candidates), [`admission`] (connection and session limits),
//! [`config`], and the vocabularies everything shares: [`close`] (how sessions end),
//! [`metrics`] (what is counted), [`client`] (who a client is), [`net`] and [`process`].
//!
//! Not the router: [`echo`] is the echo replica used by the demo, the tests and the load
//! tools.

// Public where a test, bench, fuzz target or the binary needs them; the rest stays inside.
pub(crate) mod admission;
pub mod balance;
pub mod client;
pub mod close;
pub mod config;
pub mod discovery;
pub mod frames;
pub mod health;
pub mod http;
pub mod log;
pub mod metrics;
pub(crate) mod net;
pub(crate) mod process;
pub mod registry;
pub mod relay;
pub mod reload;
pub(crate) mod server;
pub(crate) mod session;
pub mod tls;
pub mod upstream;
pub(crate) mod uring;

pub mod echo;

pub use config::Config;
pub use reload::{Reload, Reloader};
pub use server::{Drain, Router, StartError};

/// The commit this build was made from (`git rev-parse`, "-dirty" for uncommitted changes).
pub const BUILD_COMMIT: &str = env!("WSROUTER_COMMIT");
