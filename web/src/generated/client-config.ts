// What GET /api/config answers, generated from collab-server/src/edge/preview.rs; do not edit.
// Regenerate with: UPDATE_GENERATED=1 cargo test -p collab-server --lib generated_typescript

/**
 * What the IDE's page needs to know about this server: `GET /api/config` (wire type; the
 * page reads it as `web/src/generated/client-config.ts`).
 */
export type ClientConfig = { 
/**
 * Where previews are served (`http://host:port`, no trailing slash; a `{project}` in it
 * stands for the project's name); `null` when they are off. A preview's address is
 * `{preview_url}/preview/{project}/{port}/?token=...`.
 */
preview_url: string | null, };
