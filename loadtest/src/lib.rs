//! loadtest: benchmarks of the collaboration engine, run by `cargo xtask bench`.
//!
//! Today it measures document loading and the cost of applying edits (`collab-bench load`),
//! replaying the real editing traces in `../shared/data/editing-traces` (CC BY 4.0). The load
//! generator with thousands of peers and the side-by-side runs against the reference Yjs
//! servers (issue #4) are not built yet.

pub mod trace;
