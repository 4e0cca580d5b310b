// The project tree's stored shapes (schema v1), generated from sync-core/src/tree.rs; do not edit.
// Regenerate with:
// UPDATE_GENERATED=1 cargo test -p sync-core -p exec-bridge --lib generated_typescript

/**
 * An entry's `kind` as stored: `"file"` or `"dir"`.
 */
export type EntryKind = "file" | "dir";

/**
 * The root document's `settings` map; both keys may be absent.
 */
export type Settings = { run?: string, language?: string, };

/**
 * One message of the root document's `chat` array (a plain object; `at` in unix milliseconds).
 */
export type ChatMessage = { id: string, author: string, text: string, at: number, };

/** The top-level shared types of a project's root document `{project}`. */
export type RootKey = "meta" | "files" | "chat" | "settings";

/** `meta.schema` of a root document of this schema. */
export type SchemaVersion = 1;

/** The Y.Text holding a file's text in its document `{project}/{fileId}`. */
export type ContentKey = "content";

/** Longest accepted path, in UTF-8 bytes. */
export type MaxPathLen = 1024;
