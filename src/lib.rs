//! wsrouter: a WebSocket load balancer and reverse proxy for fleets of streaming replicas.
//!
//! Modules, one per concern: [`config`] (TOML, validation), [`registry`] (replicas, health
//! state, lock-free snapshot), [`health`] (probe loop), [`balance`] (selection), [`proxy`]
//! (HTTP service, upgrade, upstream connect, frame pumps), [`admin`] (/status, /health),
//! [`server`] (listener, accept loop, drain) and [`echo`] (an in-process echo replica).

pub mod admin;
pub mod balance;
pub mod config;
pub mod echo;
pub mod health;
pub mod proxy;
pub mod registry;
pub mod server;

pub use config::Config;
pub use server::{Drain, Reloader, Router};
