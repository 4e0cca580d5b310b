//! The exec channel's wire types: what a project's peers send to start and watch runs and
//! terminals, and what they receive. JSON text frames on `GET /exec/{project}?token=...`; bytes
//! (program output, keystrokes) travel base64-encoded in `data`.
//!
//! On connect a peer gets one [`ServerMsg::Hello`] with every run and terminal the project has,
//! each with its recent history, then live events in order. Anything a peer sends that it may
//! not (a viewer typing, a message that does not parse) is answered with [`ServerMsg::Error`] and
//! changes nothing.
//!
//! The web page's TypeScript for these types, `web/src/generated/exec-protocol.ts`, is rendered
//! from them (test builds derive `ts_rs::TS`); a test fails when the committed file is stale.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::run::{TimeLimit, Verdict};

/// Bytes as base64 in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Data(pub Vec<u8>);

impl Serialize for Data {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD.decode(text.as_bytes()).map(Data).map_err(serde::de::Error::custom)
    }
}

/// Which output stream of a run a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
#[serde(rename_all = "snake_case")]
pub enum StreamName {
    Stdout,
    Stderr,
}

/// What a peer asks for. Every message except none is for editors only: viewers watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMsg {
    /// Starts the project's program (its `run` setting, or detected from its files). Refused
    /// while another run of the project is still going.
    Run {},
    /// Bytes for a running program's stdin.
    Stdin {
        run: u64,
        #[cfg_attr(test, ts(type = "string"))]
        data: Data,
    },
    /// Closes a running program's stdin (end of input).
    StdinEof {
        run: u64,
    },
    /// Stops a running program.
    Stop {
        run: u64,
    },
    /// Opens a new shell in the project's sandbox.
    TermOpen {
        cols: u16,
        rows: u16,
    },
    /// Keystrokes for a terminal.
    TermInput {
        term: u64,
        #[cfg_attr(test, ts(type = "string"))]
        data: Data,
    },
    TermResize {
        term: u64,
        cols: u16,
        rows: u16,
    },
    /// Ends a terminal's shell.
    TermClose {
        term: u64,
    },
}

/// A run as a late joiner learns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
pub struct RunInfo {
    pub run: u64,
    /// Display name of who started it.
    pub by: String,
    pub command: String,
    /// Recent output, oldest first (at most [`crate::session::HISTORY_BYTES`] in all).
    pub history: Vec<OutputChunk>,
    /// Set once the run ended.
    pub verdict: Option<VerdictInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
pub struct OutputChunk {
    pub stream: StreamName,
    #[cfg_attr(test, ts(type = "string"))]
    pub data: Data,
}

/// A terminal as a late joiner learns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
pub struct TermInfo {
    pub term: u64,
    pub by: String,
    pub cols: u16,
    pub rows: u16,
    /// The last [`crate::session::SCROLLBACK_BYTES`] the terminal printed.
    #[cfg_attr(test, ts(type = "string"))]
    pub scrollback: Data,
    /// True once the shell ended.
    pub exited: bool,
    /// The shell's exit code once it ended by itself (`None` while it runs, and when it was
    /// killed, e.g. closed by a peer).
    pub exit_code: Option<i32>,
}

/// What the server sends a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// First message on every connection: the peer's role and the project's runs and terminals.
    Hello {
        #[cfg_attr(test, ts(type = "\"editor\" | \"viewer\""))]
        role: String,
        runs: Vec<RunInfo>,
        terms: Vec<TermInfo>,
    },
    RunStarted {
        run: u64,
        by: String,
        command: String,
    },
    RunOutput {
        run: u64,
        stream: StreamName,
        #[cfg_attr(test, ts(type = "string"))]
        data: Data,
    },
    RunFinished {
        run: u64,
        verdict: VerdictInfo,
    },
    TermOpened {
        term: u64,
        by: String,
        cols: u16,
        rows: u16,
    },
    TermOutput {
        term: u64,
        #[cfg_attr(test, ts(type = "string"))]
        data: Data,
    },
    TermResized {
        term: u64,
        cols: u16,
        rows: u16,
    },
    TermExited {
        term: u64,
        exit_code: Option<i32>,
    },
    /// A request was refused or failed; nothing changed.
    Error {
        message: String,
    },
}

/// A verdict on the wire: a machine-readable `kind` and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
pub struct VerdictInfo {
    /// `exited`, `signaled`, `time_limit`, `memory_limit`, `output_limit`, `compile_error`,
    /// `stopped` (by a peer) or `failed` (the run could not be started).
    pub kind: String,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub summary: String,
}

impl VerdictInfo {
    pub fn failed(message: impl Into<String>) -> VerdictInfo {
        VerdictInfo { kind: "failed".into(), code: None, signal: None, summary: message.into() }
    }
}

impl From<&Verdict> for VerdictInfo {
    fn from(verdict: &Verdict) -> VerdictInfo {
        let (kind, code, signal, summary) = match verdict {
            Verdict::Exited { code } => ("exited", Some(*code), None, format!("exited with code {code}")),
            Verdict::Signaled { signal } => ("signaled", None, Some(*signal), format!("killed by signal {signal}")),
            Verdict::TimeLimit(TimeLimit::Cpu) => ("time_limit", None, None, "CPU time limit exceeded".to_owned()),
            Verdict::TimeLimit(TimeLimit::Wall) => ("time_limit", None, None, "wall time limit exceeded".to_owned()),
            Verdict::MemoryLimit => ("memory_limit", None, None, "memory limit exceeded".to_owned()),
            Verdict::OutputLimit => ("output_limit", None, None, "output limit exceeded".to_owned()),
            Verdict::DiskLimit => ("disk_limit", None, None, "workspace size limit exceeded".to_owned()),
            Verdict::CompileError(inner) => {
                let inner = VerdictInfo::from(inner.as_ref());
                ("compile_error", inner.code, inner.signal, format!("compile error (compiler {})", inner.summary))
            }
        };
        VerdictInfo { kind: kind.to_owned(), code, signal, summary }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_parse_from_json() {
        let msg: ClientMsg = serde_json::from_str(r#"{"type":"term_input","term":3,"data":"bHMK"}"#).unwrap();
        assert_eq!(msg, ClientMsg::TermInput { term: 3, data: Data(b"ls\n".to_vec()) });
        assert_eq!(serde_json::from_str::<ClientMsg>(r#"{"type":"run"}"#).unwrap(), ClientMsg::Run {});
    }

    #[test]
    fn bad_messages_are_errors() {
        for bad in [
            r#"{"type":"term_input","term":3,"data":"not base64!"}"#,
            r#"{"type":"launch_missiles"}"#,
            r#"{"type":"run","extra":1}"#,
            r#"{"type":"term_open","cols":-1,"rows":24}"#,
            "[]",
        ] {
            assert!(serde_json::from_str::<ClientMsg>(bad).is_err(), "{bad} parsed");
        }
    }

    /// The TypeScript the web page uses for these types (`web/src/exec.ts` reads it) is rendered
    /// from them; a difference means the committed file is stale.
    #[test]
    fn generated_typescript_is_current() {
        use ts_rs::TS;
        // Run and terminal ids are counters, far below 2^53.
        let cfg = ts_rs::Config::new().with_large_int("number");
        let decls = [
            (StreamName::docs(), StreamName::decl(&cfg)),
            (VerdictInfo::docs(), VerdictInfo::decl(&cfg)),
            (OutputChunk::docs(), OutputChunk::decl(&cfg)),
            (RunInfo::docs(), RunInfo::decl(&cfg)),
            (TermInfo::docs(), TermInfo::decl(&cfg)),
            (ClientMsg::docs(), ClientMsg::decl(&cfg)),
            (ServerMsg::docs(), ServerMsg::decl(&cfg)),
        ];
        let mut text = String::from(
            "// The exec channel's wire types, generated from exec-bridge/src/protocol.rs; do not edit.\n\
             // Byte fields (`data`, `scrollback`) are base64 strings. Regenerate with:\n\
             // UPDATE_GENERATED=1 cargo test -p sync-core -p exec-bridge --lib generated_typescript\n",
        );
        for (docs, decl) in decls {
            text.push('\n');
            text.push_str(&docs.unwrap_or_default());
            text.push_str("export ");
            text.push_str(&decl);
            text.push('\n');
        }
        check_generated("web/src/generated/exec-protocol.ts", &text);
    }

    /// Compares `rendered` with the committed file at `relative` (from the workspace root), or
    /// writes it there when `UPDATE_GENERATED` is set.
    fn check_generated(relative: &str, rendered: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative);
        if std::env::var_os("UPDATE_GENERATED").is_some() {
            std::fs::write(&path, rendered).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            return;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == rendered,
            "{relative} is stale; regenerate it with\n  \
             UPDATE_GENERATED=1 cargo test -p sync-core -p exec-bridge --lib generated_typescript\n\
             --- expected ---\n{rendered}"
        );
    }

    #[test]
    fn verdicts_have_kinds_and_summaries() {
        let v = VerdictInfo::from(&Verdict::CompileError(Box::new(Verdict::Exited { code: 1 })));
        assert_eq!((v.kind.as_str(), v.code), ("compile_error", Some(1)));
        let json = serde_json::to_string(&ServerMsg::RunFinished { run: 1, verdict: v }).unwrap();
        assert!(json.starts_with(r#"{"type":"run_finished","run":1,"#), "{json}");
    }
}
