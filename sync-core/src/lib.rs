//! Sans-IO core of the collaboration engine: wire codecs, per-document sync state, the relay and
//! confirmation policy, and the project tree schema.
//!
//! Nothing in this crate opens a socket, spawns a task or reads a clock: callers hand it bytes and
//! a `now`, and get back bytes and events. That is what lets the fuzzers and property tests drive it
//! directly, and what lets every peer (server, agent, exec bridge, load generator) share it.

pub mod cost;
pub mod names;
pub mod peering;
pub mod relay;
pub mod room;
pub mod tree;
pub mod untrusted;
pub mod wire;

pub use names::{DocName, NameError};
pub use room::{DocState, Input, Output, PeerId, Reply};

/// What a peer may do with the documents of a project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Reads and writes documents.
    Editor,
    /// Reads documents and shares awareness (cursors); never writes content.
    Viewer,
}

impl Role {
    pub fn can_write(self) -> bool {
        matches!(self, Role::Editor)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Editor => "editor",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "editor" => Some(Role::Editor),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}
