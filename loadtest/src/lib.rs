//! loadtest: benchmarks of the collaboration engine, run by `cargo xtask bench`.
//!
//! Today: document loading and the cost of applying edits (`collab-bench load`), replaying the
//! real editing traces in `../shared/data/editing-traces` (CC BY 4.0); and a first classroom
//! scenario (`collab-bench classroom`) against one of our servers. The side-by-side runs against
//! the reference Yjs servers, the other scenarios, soak and fuzzing (issue #4) are not built yet.

pub mod classroom;
pub mod trace;
