//! exec-bridge: mirrors a project's files into sandboxes for runs (and later shared terminals
//! and live previews), and mirrors files written there back into the documents (issue #6).
//!
//! Built so far, as a library with tests:
//! - [`paths`]: tree paths from the documents (untrusted) to safe relative workspace paths;
//! - [`workspace`]: a workspace folder reached only through a `cap-std` directory handle, with
//!   atomic writes, ignore patterns, a size limit, binaries left alone, symlinks never followed;
//! - [`mirror`]: documents to files and files to documents as minimal three-way merged CRDT
//!   edits, echo suppression and debouncing state;
//! - [`sandbox`]: the `Sandbox` trait and the local bubblewrap sandbox ([`sandbox::local`]);
//! - [`run`]: limits, verdicts, and compile-then-run programs.
//!
//! Not built yet: the bridge as a peer of the server (the async driver around [`mirror`]), the
//! Docker sandbox, run output relayed to the project's peers, terminals, previews and the
//! browser's Run button and terminal pane.

pub mod mirror;
pub mod paths;
pub mod run;
pub mod sandbox;
pub mod workspace;
