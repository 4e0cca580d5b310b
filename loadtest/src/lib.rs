//! loadtest: the load generator and benchmark scenarios (classroom, hot document, trace replay,
//! idle connections, reconnect storm) side by side with the reference Yjs servers.
//!
//! Not built yet (issue #4). It will drive thousands of `collab-client` peers from one process;
//! today the trace replay lives as an integration test in `collab-server/tests/trace_replay.rs`.
