//! agent-peer: the AI pair programmer as one more collaborator of a project.
//!
//! Not built yet. It will join over the multiplexed endpoint like any peer (`collab-client`),
//! show a cursor through awareness, and edit with CRDT operations driven by an
//! OpenAI-compatible API; nothing in this crate works today and nothing depends on it.
