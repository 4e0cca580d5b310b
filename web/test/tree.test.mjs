// Unit tests of src/tree.ts (project tree schema v1 and the path-clash rule), loaded by transpiling it with TypeScript.
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import ts from 'typescript';
import * as Y from 'yjs';
import { WEB_DIR } from './harness.mjs';

let tree;
let tmp;

before(async () => {
  const source = readFileSync(path.join(WEB_DIR, 'src', 'tree.ts'), 'utf8');
  const { outputText } = ts.transpileModule(source, {
    compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 },
  });
  assert.ok(!/^\s*import\s/m.test(outputText), 'tree.ts must have no runtime imports');
  tmp = mkdtempSync(path.join(tmpdir(), 'collab-tree-test-'));
  const file = path.join(tmp, 'tree.mjs');
  writeFileSync(file, outputText);
  tree = await import(pathToFileURL(file).href);
});

after(() => {
  rmSync(tmp, { recursive: true, force: true });
});

/** Adds `{ path, kind }` entries (a Y.Map each, as the schema says) to a root document. */
function addEntries(doc, entries) {
  const files = doc.getMap('files');
  doc.transact(() => {
    for (const [id, fields] of Object.entries(entries)) {
      const entry = new Y.Map();
      for (const [key, value] of Object.entries(fields)) {
        entry.set(key, value);
      }
      files.set(id, entry);
    }
  });
}

function sync(a, b) {
  Y.applyUpdate(a, Y.encodeStateAsUpdate(b));
  Y.applyUpdate(b, Y.encodeStateAsUpdate(a));
}

/** The path and clash-rule cases sync-core's tests check too (one file, never copied). */
const FIXTURE = JSON.parse(
  readFileSync(
    path.join(WEB_DIR, '..', 'sync-core', 'tests', 'fixtures', 'clash-rule.json'),
    'utf8',
  ),
);

/** A tree case's expectation, as the fixture writes it: [id, shown path, kind] in order. */
function shown(entries) {
  return entries.map((e) => [e.id, e.displayPath, e.kind]);
}

describe('tree.ts', () => {
  test('clash display names follow the shared fixture (sync_core::tree::disambiguate)', () => {
    assert.ok(FIXTURE.display_names.length > 0);
    for (const { path: p, id, shown: expected } of FIXTURE.display_names) {
      assert.equal(tree.clashDisplayPath(p, id), expected, JSON.stringify({ p, id }));
    }
  });

  test('paths are validated like sync_core::tree::validate_path (shared fixture)', () => {
    for (const ok of FIXTURE.valid_paths) {
      assert.equal(tree.isValidPath(ok), true, JSON.stringify(ok));
    }
    for (const bad of FIXTURE.invalid_paths) {
      assert.equal(tree.isValidPath(bad), false, JSON.stringify(bad));
    }
  });

  test('every tree case of the shared fixture reads as sync_core::tree::entries reads it', () => {
    for (const { what, files, shown: expected } of FIXTURE.trees) {
      const doc = new Y.Doc();
      const maps = Object.fromEntries(
        Object.entries(files).filter(([, v]) => typeof v === 'object'),
      );
      addEntries(doc, maps);
      for (const [id, value] of Object.entries(files)) {
        if (typeof value !== 'object') {
          doc.getMap('files').set(id, value);
        }
      }
      const entries = tree.readProjectFiles(doc);
      assert.deepEqual(shown(entries), expected, what);
      for (const entry of entries) {
        assert.equal(entry.clashed, entry.displayPath !== entry.path, what);
      }
    }
  });

  test('concurrent creation of one path keeps every entry; peers resolve the clash alike', () => {
    const [clash] = FIXTURE.trees;
    const docs = Object.entries(clash.files).map(([id, fields]) => {
      const doc = new Y.Doc();
      addEntries(doc, { [id]: fields });
      return doc;
    });
    for (let round = 0; round < 2; round++) {
      for (let i = 1; i < docs.length; i++) {
        sync(docs[i - 1], docs[i]);
      }
    }
    const first = tree.readProjectFiles(docs[0]);
    for (const doc of docs) {
      assert.deepEqual(tree.readProjectFiles(doc), first, 'every peer resolves the clash alike');
    }
    assert.deepEqual(shown(first), clash.shown);
    assert.ok(
      first.every((e) => e.path === 'notes.md'),
      'the stored path is kept',
    );
  });

  test('the tree nests implied folders, keeps empty folders, and lists folders first', () => {
    const doc = new Y.Doc();
    addEntries(doc, {
      a000000000000001: { path: 'README.md', kind: 'file' },
      a000000000000002: { path: 'src/main.py', kind: 'file' },
      a000000000000003: { path: 'src/util/helpers.py', kind: 'file' },
      a000000000000004: { path: 'docs', kind: 'dir' },
      a000000000000005: { path: 'src/util', kind: 'dir' },
      b000000000000006: { path: 'src/main.py', kind: 'file' },
    });
    const root = tree.buildTree(tree.readProjectFiles(doc));
    const shape = (node) =>
      node.kind === 'dir' ? { [node.name + '/']: node.children.map(shape) } : node.name;
    assert.deepEqual(root.children.map(shape), [
      { 'docs/': [] },
      { 'src/': [{ 'util/': ['helpers.py'] }, 'main (b00000).py', 'main.py'] },
      'README.md',
    ]);
    assert.deepEqual(
      tree.filesInTreeOrder(root).map((e) => e.displayPath),
      ['src/util/helpers.py', 'src/main (b00000).py', 'src/main.py', 'README.md'],
    );
  });

  test('a rename changes only the path', () => {
    const doc = new Y.Doc();
    addEntries(doc, { c000000000000001: { path: 'old.txt', kind: 'file' } });
    doc.getMap('files').get('c000000000000001').set('path', 'new/name.txt');
    assert.deepEqual(
      tree.readProjectFiles(doc).map((e) => [e.id, e.displayPath]),
      [['c000000000000001', 'new/name.txt']],
    );
  });
});
