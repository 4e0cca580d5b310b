//! exec-bridge: mirrors a project's files into sandboxes for runs (and later shared terminals
//! and live previews), and mirrors files written there back into the documents (issue #6).
//!
//! Built so far, as a library with tests:
//! - [`paths`]: tree paths from the documents (untrusted) to safe relative workspace paths;
//! - [`workspace`]: a workspace folder reached only through a `cap-std` directory handle, with
//!   atomic writes, ignore patterns, a size limit, binaries left alone, symlinks never followed;
//! - [`mirror`]: documents to files and files to documents as minimal three-way merged CRDT
//!   edits, echo suppression and debouncing state;
//! - [`peer`]: the bridge as a peer of the server (one multiplexed socket, its own token and
//!   display name), running the mirror against a workspace folder;
//! - [`sandbox`]: the `Sandbox` trait, the local bubblewrap sandbox ([`sandbox::local`]) and the
//!   Docker sandbox ([`sandbox::docker`]), one long-lived container per project;
//! - [`run`]: limits, verdicts, and compile-then-run programs; [`detect`] picks a project's
//!   program from its `run` setting or its files.
//!
//! The `collab-bridge` binary runs [`peer`] for one project, reconnecting with the same mirror.
//!
//! Not built yet: runs started by peers and their output relayed to the project's peers (with
//! history for late joiners), terminals, previews, a warm sandbox pool, ownership
//! across several bridges, and the browser's Run button and terminal pane.

pub mod detect;
pub mod mirror;
pub mod paths;
pub mod peer;
pub mod protocol;
pub mod run;
pub mod sandbox;
pub mod session;
pub mod workspace;
