//! exec-bridge: mirrors a project's files into sandboxed containers for runs, shared terminals
//! and live previews, and mirrors files written there back into the documents.
//!
//! Not built yet (issue #6). It will be a peer of the server over the multiplexed endpoint,
//! using `collab-client` for sync and `sync_core::tree` for the project schema; nothing in this
//! crate works today and nothing depends on it.
