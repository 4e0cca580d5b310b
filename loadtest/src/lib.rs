//! loadtest: the load generator and benchmark scenarios, run by `cargo xtask bench` (and in
//! short smoke runs by the tests). Every simulated peer is a real yrs document behind
//! `collab-client`; scenarios talk to our server or to the reference Yjs servers ([`target`]),
//! started as pinned processes by [`server`]. The editing traces come from
//! `../shared/data/editing-traces` (CC BY 4.0).

pub mod classroom;
pub mod idle;
pub mod plot;
pub mod replay;
pub mod server;
pub mod soak;
pub mod stats;
pub mod storm;
pub mod target;
pub mod trace;
