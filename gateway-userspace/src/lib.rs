//! The gateway: usage-plan engine, HTTP data plane, admin API, CLI and XDP loader.

pub mod admin;
pub mod cli;
pub mod client;
pub mod clock;
pub mod control;
pub mod demo;
pub mod engine;
pub mod fastpath;
pub mod fleet;
pub mod limit;
pub mod metrics;
pub mod plan;
pub mod proxy;
pub mod quota;
pub mod serve;
pub mod sigv4;
pub mod state;
pub mod store;
pub mod xdp;
