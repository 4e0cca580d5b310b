// Reads a project's root document (schema v1: meta, files, chat, settings) into a file tree, with the path-clash display rule.
//
// The stored shapes come from generated/tree-schema.ts (rendered from sync-core/src/tree.rs); the
// constants below are typed by it, so a change on the Rust side fails the type check here.
//
// Only type imports: this module must stay free of runtime imports so the Node tests can
// transpile and load it on its own.
import type * as Y from 'yjs';
import type { ContentKey, EntryKind, MaxPathLen, RootKey } from './generated/tree-schema';

export type { EntryKind };

/** The root document's map of file entries. */
export const FILES_KEY: RootKey = 'files';

/** The Y.Text holding a file's text in its own document. */
export const CONTENT_KEY: ContentKey = 'content';

/** One entry of the `files` map, as stored. */
export interface RawEntry {
  /** Normally 16 lowercase hex chars; also names the file's text document `{project}/{id}`. */
  id: string;
  path: string;
  kind: EntryKind;
}

/** An entry with the path it is displayed under (differs from `path` only for clashes). */
export interface FileEntry extends RawEntry {
  displayPath: string;
  /** True when another entry with a smaller id has the same path. */
  clashed: boolean;
}

export interface DirNode {
  kind: 'dir';
  name: string;
  /** Display path of the folder, `''` for the project root. */
  path: string;
  /** Set for an explicit (empty-folder) entry. */
  id?: string;
  children: TreeNode[];
}

export interface FileNode {
  kind: 'file';
  name: string;
  /** Display path. */
  path: string;
  entry: FileEntry;
}

export type TreeNode = DirNode | FileNode;

export const FILE_ID_RE = /^[0-9a-f]{16}$/;

export function isFileId(id: string): boolean {
  return FILE_ID_RE.test(id);
}

/** Longest accepted path, in UTF-8 bytes (as in the Rust module). */
export const MAX_PATH_LEN: MaxPathLen = 1024;

/**
 * Relative, `/`-separated, at most 1024 bytes, and no segment that is empty, `.` or `..`, or that
 * holds a control character or a backslash. Same rule as `sync_core::tree::validate_path`.
 */
export function isValidPath(path: string): boolean {
  if (path === '' || new TextEncoder().encode(path).length > MAX_PATH_LEN) {
    return false;
  }
  return path.split('/').every(
    (segment) =>
      segment !== '' &&
      segment !== '.' &&
      segment !== '..' &&
      // eslint-disable-next-line no-control-regex
      !/[\u0000-\u001f\u007f-\u009f\\]/.test(segment),
  );
}

/**
 * The name a clashing entry is shown under: `<stem> (<first 6 chars of id>)<ext>` in the same
 * folder, where ext starts at the last `.` of the last segment unless that `.` is its first char.
 */
export function clashDisplayPath(path: string, id: string): string {
  const slash = path.lastIndexOf('/');
  const folder = path.slice(0, slash + 1);
  const last = path.slice(slash + 1);
  const dot = last.lastIndexOf('.');
  const [stem, ext] = dot > 0 ? [last.slice(0, dot), last.slice(dot)] : [last, ''];
  return `${folder}${stem} (${Array.from(id).slice(0, 6).join('')})${ext}`;
}

function compareStrings(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Applies the clash rule: per path, the entry with the smallest id keeps it. */
export function resolveEntries(raw: readonly RawEntry[]): FileEntry[] {
  const byPath = new Map<string, RawEntry[]>();
  for (const entry of raw) {
    const group = byPath.get(entry.path);
    if (group === undefined) {
      byPath.set(entry.path, [entry]);
    } else {
      group.push(entry);
    }
  }
  const resolved: FileEntry[] = [];
  for (const group of byPath.values()) {
    group.sort((a, b) => compareStrings(a.id, b.id));
    group.forEach((entry, index) => {
      resolved.push({
        ...entry,
        displayPath: index === 0 ? entry.path : clashDisplayPath(entry.path, entry.id),
        clashed: index !== 0,
      });
    });
  }
  resolved.sort(
    (a, b) => compareStrings(a.displayPath, b.displayPath) || compareStrings(a.id, b.id),
  );
  return resolved;
}

interface MapLike {
  get(key: string): unknown;
}

function isMapLike(value: unknown): value is MapLike {
  return (
    typeof value === 'object' &&
    value !== null &&
    typeof (value as { get?: unknown }).get === 'function'
  );
}

/**
 * Reads the valid entries of a `files` map, like the Rust module: an entry that is not a map or
 * whose path is missing, not a string or invalid is left out; any kind but `dir` means `file`.
 */
export function readEntries(files: Y.Map<unknown>): RawEntry[] {
  const entries: RawEntry[] = [];
  files.forEach((value, id) => {
    if (!isMapLike(value)) {
      return;
    }
    const path = value.get('path');
    if (typeof path !== 'string' || !isValidPath(path)) {
      return;
    }
    entries.push({ id, path, kind: value.get('kind') === 'dir' ? 'dir' : 'file' });
  });
  return entries;
}

/** All entries of a project root document, clash rule applied, sorted by display path. */
export function readProjectFiles(root: Y.Doc): FileEntry[] {
  return resolveEntries(readEntries(root.getMap(FILES_KEY)));
}

function sortNodes(dir: DirNode): void {
  dir.children.sort((a, b) => {
    if (a.kind !== b.kind) {
      return a.kind === 'dir' ? -1 : 1;
    }
    return compareStrings(a.name, b.name);
  });
  for (const child of dir.children) {
    if (child.kind === 'dir') {
      sortNodes(child);
    }
  }
}

/** Builds the folder tree: folders implied by file paths plus explicit (empty) folder entries. */
export function buildTree(entries: readonly FileEntry[]): DirNode {
  const root: DirNode = { kind: 'dir', name: '', path: '', children: [] };
  const folders = new Map<string, DirNode>([['', root]]);
  const folder = (path: string): DirNode => {
    const existing = folders.get(path);
    if (existing !== undefined) {
      return existing;
    }
    const slash = path.lastIndexOf('/');
    const parent = folder(slash < 0 ? '' : path.slice(0, slash));
    const node: DirNode = { kind: 'dir', name: path.slice(slash + 1), path, children: [] };
    parent.children.push(node);
    folders.set(path, node);
    return node;
  };
  for (const entry of entries) {
    if (entry.kind === 'dir') {
      const node = folder(entry.displayPath);
      node.id ??= entry.id;
      continue;
    }
    const slash = entry.displayPath.lastIndexOf('/');
    const parent = folder(slash < 0 ? '' : entry.displayPath.slice(0, slash));
    parent.children.push({
      kind: 'file',
      name: entry.displayPath.slice(slash + 1),
      path: entry.displayPath,
      entry,
    });
  }
  sortNodes(root);
  return root;
}

/** Files in the order the tree shows them (folders first, then by name), depth first. */
export function filesInTreeOrder(root: DirNode): FileEntry[] {
  const out: FileEntry[] = [];
  const walk = (dir: DirNode): void => {
    for (const child of dir.children) {
      if (child.kind === 'dir') {
        walk(child);
      } else {
        out.push(child.entry);
      }
    }
  };
  walk(root);
  return out;
}
