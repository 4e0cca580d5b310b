//! The shared test harness (the collab-test-support crate) under the names these tests use, and
//! the exec channel's test peer, which only this crate's tests need.
#![allow(dead_code, unused_imports)]

pub mod exec_peer;

pub use collab_test_support::server::http;
pub use collab_test_support::{TestServer, WAIT, cluster, seed, until, until_async};
