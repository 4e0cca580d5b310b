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

describe('tree.ts', () => {
  test('clash display names follow the rule of sync_core::tree::disambiguate', () => {
    assert.equal(
      tree.clashDisplayPath('a/b/c.tar.gz', '0123456789abcdef'),
      'a/b/c.tar (012345).gz',
    );
    assert.equal(tree.clashDisplayPath('.env', 'abcdef0000000000'), '.env (abcdef)');
    assert.equal(tree.clashDisplayPath('Makefile', 'ffffff0000000000'), 'Makefile (ffffff)');
    assert.equal(tree.clashDisplayPath('src/main.py', '1234567890abcdef'), 'src/main (123456).py');
    assert.equal(tree.clashDisplayPath('dir.d/file', '1234567890abcdef'), 'dir.d/file (123456)');
  });

  test('paths are validated like sync_core::tree::validate_path', () => {
    for (const ok of [
      'a',
      'src/main.py',
      '.env',
      'a b/c d.txt',
      'ünïcode/ß.md',
      'x'.repeat(1024),
    ]) {
      assert.equal(tree.isValidPath(ok), true, JSON.stringify(ok));
    }
    for (const bad of [
      '',
      '/abs',
      'a/',
      'a//b',
      './a',
      'a/../b',
      '..',
      'a\\b',
      'a\nb',
      'a\u0085b',
      'x'.repeat(1025),
    ]) {
      assert.equal(tree.isValidPath(bad), false, JSON.stringify(bad));
    }
  });

  test('concurrent creation of one path keeps both entries; the smallest id keeps the path', () => {
    const a = new Y.Doc();
    const b = new Y.Doc();
    const c = new Y.Doc();
    addEntries(a, { ff00000000000001: { path: 'notes.md', kind: 'file' } });
    addEntries(b, { '0a00000000000002': { path: 'notes.md', kind: 'file' } });
    addEntries(c, { 5500000000000003: { path: 'notes.md', kind: 'file' } });
    sync(a, b);
    sync(b, c);
    sync(a, b);
    const fromA = tree.readProjectFiles(a);
    assert.deepEqual(fromA, tree.readProjectFiles(c), 'every peer resolves the clash alike');
    assert.deepEqual(
      fromA.map((e) => [e.id, e.displayPath, e.clashed]),
      // Sorted by display path (' ' sorts before '.').
      [
        ['5500000000000003', 'notes (550000).md', true],
        ['ff00000000000001', 'notes (ff0000).md', true],
        ['0a00000000000002', 'notes.md', false],
      ],
    );
    assert.ok(
      fromA.every((e) => e.path === 'notes.md'),
      'the stored path is kept',
    );
  });

  test('malformed entries are skipped; any kind but dir is a file', () => {
    const doc = new Y.Doc();
    addEntries(doc, {
      1111111111111111: { path: 'ok.txt', kind: 'file' },
      2222222222222222: { path: '../escape', kind: 'file' },
      3333333333333333: { kind: 'file' },
      4444444444444444: { path: 42, kind: 'file' },
      5555555555555555: { path: 'no-kind.py' },
      6666666666666666: { path: 'weird-kind', kind: 'symlink' },
      7777777777777777: { path: 'empty-dir', kind: 'dir' },
    });
    doc.getMap('files').set('8888888888888888', 'not a map');
    const entries = tree.readProjectFiles(doc);
    assert.deepEqual(
      entries.map((e) => [e.displayPath, e.kind]),
      [
        ['empty-dir', 'dir'],
        ['no-kind.py', 'file'],
        ['ok.txt', 'file'],
        ['weird-kind', 'file'],
      ],
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
