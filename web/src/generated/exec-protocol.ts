// The exec channel's wire types, generated from exec-bridge/src/protocol.rs; do not edit.
// Byte fields (`data`, `scrollback`) are base64 strings. Regenerate with:
// UPDATE_GENERATED=1 cargo test -p sync-core -p exec-bridge --lib generated_typescript

/**
 * Which output stream of a run a chunk came from.
 */
export type StreamName = "stdout" | "stderr";

/**
 * A verdict on the wire: a machine-readable `kind` and a sentence for people.
 */
export type VerdictInfo = { 
/**
 * `exited`, `signaled`, `time_limit`, `memory_limit`, `output_limit`, `compile_error`,
 * `stopped` (by a peer) or `failed` (the run could not be started).
 */
kind: string, code: number | null, signal: number | null, summary: string, };

export type OutputChunk = { stream: StreamName, data: string, };

/**
 * A run as a late joiner learns it.
 */
export type RunInfo = { run: number, 
/**
 * Display name of who started it.
 */
by: string, command: string, 
/**
 * Recent output, oldest first (at most [`crate::session::HISTORY_BYTES`] in all).
 */
history: Array<OutputChunk>, 
/**
 * Set once the run ended.
 */
verdict: VerdictInfo | null, };

/**
 * A terminal as a late joiner learns it.
 */
export type TermInfo = { term: number, by: string, cols: number, rows: number, 
/**
 * The last [`crate::session::SCROLLBACK_BYTES`] the terminal printed.
 */
scrollback: string, 
/**
 * True once the shell ended.
 */
exited: boolean, 
/**
 * The shell's exit code once it ended by itself (`None` while it runs, and when it was
 * killed, e.g. closed by a peer).
 */
exit_code: number | null, };

/**
 * What a peer asks for. Every message except none is for editors only: viewers watch.
 */
export type ClientMsg = { "type": "run", } | { "type": "stdin", run: number, data: string, } | { "type": "stdin_eof", run: number, } | { "type": "stop", run: number, } | { "type": "term_open", cols: number, rows: number, } | { "type": "term_input", term: number, data: string, } | { "type": "term_resize", term: number, cols: number, rows: number, } | { "type": "term_close", term: number, };

/**
 * What the server sends a peer.
 */
export type ServerMsg = { "type": "hello", role: "editor" | "viewer", runs: Array<RunInfo>, terms: Array<TermInfo>, } | { "type": "run_started", run: number, by: string, command: string, } | { "type": "run_output", run: number, stream: StreamName, data: string, } | { "type": "run_finished", run: number, verdict: VerdictInfo, } | { "type": "term_opened", term: number, by: string, cols: number, rows: number, } | { "type": "term_output", term: number, data: string, } | { "type": "term_resized", term: number, cols: number, rows: number, } | { "type": "term_exited", term: number, exit_code: number | null, } | { "type": "error", message: string, };
