//! exec-bridge: mirrors a project's files into a sandbox and runs what people ask for there:
//! runs with limits and verdicts, shared terminals and live previews (issue #6). The collab
//! server hosts it (`collab serve --sandbox local|docker`, see `collab_server::exec`).
//!
//! - [`paths`]: tree paths from the documents (untrusted) to safe relative workspace paths;
//! - [`workspace`]: a workspace folder reached only through a `cap-std` directory handle, with
//!   atomic writes, ignore patterns, a size limit, binaries left alone, symlinks never followed;
//! - [`mirror`]: documents to files and files to documents as minimal three-way merged CRDT
//!   edits, echo suppression and debouncing state;
//! - [`peer`]: the bridge as a peer of the server (one multiplexed socket, its own token and
//!   display name), running the mirror against a workspace folder and answering a run's
//!   "catch up and write everything out" request;
//! - [`sandbox`]: the `Sandbox` trait (runs, terminals, connections to a port inside), the
//!   local bubblewrap sandbox ([`sandbox::local`]) and the Docker sandbox ([`sandbox::docker`]);
//! - [`job`]: what the sandbox seam speaks: commands, limits, run events, verdicts, terminals;
//! - [`run`]: compile-then-run programs; [`detect`] picks a project's
//!   program from its `run` setting or its files;
//! - [`session`]: a project's runs and terminals shared by its peers, with history for late
//!   joiners, roles and flow control; [`protocol`] is its JSON wire format.
//!
//! The `collab-bridge` binary runs [`peer`] alone for one project (a mirror without runs).

pub mod detect;
pub mod job;
pub mod mirror;
pub mod paths;
pub mod peer;
pub mod protocol;
pub mod run;
pub mod sandbox;
pub mod session;
pub mod workspace;
