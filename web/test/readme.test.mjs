// Runs the README's snippets as written against a real `collab serve --demo`: every fenced block marked `<!-- readme-test: sh|node -->`, in order, in one shell.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { jwtClaims, useServer, WEB_DIR } from './harness.mjs';

const README = path.join(WEB_DIR, '..', 'README.md');
const MARKER = /^\s*<!-- readme-test: (sh|node) -->\s*$/;

/** The marked fenced blocks of `markdown`, dedented: `[{ kind, code, line }]`. */
function runnableBlocks(markdown) {
  const lines = markdown.split('\n');
  const blocks = [];
  for (let i = 0; i < lines.length; i++) {
    const marker = MARKER.exec(lines[i]);
    if (!marker) {
      continue;
    }
    const fence = /^(\s*)```\w*\s*$/.exec(lines[i + 1] ?? '');
    assert.ok(fence, `README.md:${i + 1}: a readme-test marker must stand right above a fence`);
    const indent = fence[1].length;
    const code = [];
    let j = i + 2;
    for (; j < lines.length && !/^\s*```\s*$/.test(lines[j]); j++) {
      code.push(lines[j].slice(indent));
    }
    assert.ok(j < lines.length, `README.md:${i + 1}: the fence never closes`);
    blocks.push({ kind: marker[1], code: code.join('\n'), line: i + 1 });
    i = j;
  }
  return blocks;
}

/**
 * One bash script that runs every block in order, each announced by a `::block N::` line: sh
 * blocks inline (so what one exports, the next sees), node blocks on node's stdin as ES modules.
 * curl fails on HTTP errors here, so a refused request fails the run.
 */
function script(blocks, port) {
  const parts = [
    'set -euo pipefail',
    'curl() { command curl --fail-with-body --silent --show-error "$@"; }',
  ];
  blocks.forEach((block, index) => {
    const code = block.code.replaceAll('127.0.0.1:8080', `127.0.0.1:${port}`);
    parts.push(`echo "::block ${index}::"`);
    if (block.kind === 'sh') {
      parts.push(code);
    } else {
      parts.push(`node --input-type=module <<'README_SNIPPET'\n${code}\nREADME_SNIPPET`);
    }
  });
  return parts.join('\n') + '\n';
}

describe('README.md', () => {
  const server = useServer({ demo: true });
  let dir;

  before(() => {
    // A folder laid out as the README assumes: the binary at target/debug/collab, the server's
    // data directory at data, and node_modules where `npm install` would put it.
    dir = mkdtempSync(path.join(tmpdir(), 'collab-readme-test-'));
    mkdirSync(path.join(dir, 'target', 'debug'), { recursive: true });
    symlinkSync(server.bin, path.join(dir, 'target', 'debug', 'collab'));
    symlinkSync(server.dataDir, path.join(dir, 'data'));
    symlinkSync(path.join(WEB_DIR, 'node_modules'), path.join(dir, 'node_modules'));
  });

  after(() => {
    if (dir !== undefined) {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('every runnable snippet runs as written against a real server', async () => {
    const blocks = runnableBlocks(readFileSync(README, 'utf8'));
    assert.deepEqual(
      blocks.map((b) => b.kind),
      ['sh', 'node', 'node', 'sh', 'sh'],
      'the marked blocks: tokens, y-websocket, Hocuspocus, metrics, checkpoints and export',
    );
    const { stdout, stderr, code } = await new Promise((resolve) => {
      const child = execFile(
        'bash',
        ['-c', script(blocks, server.port)],
        { cwd: dir, timeout: 60_000, env: { ...process.env, T: '' } },
        (error, out, err) => resolve({ stdout: out, stderr: err, code: error?.code ?? 0 }),
      );
      child.stdin?.end();
    });
    const context = `--- stdout ---\n${stdout}\n--- stderr ---\n${stderr}\n${server.log()}`;
    assert.equal(code, 0, `the README's snippets failed\n${context}`);
    const outputs = stdout.split(/^::block \d+::\n/m).slice(1);
    assert.equal(outputs.length, blocks.length, context);

    // Step 4: the printed token is a viewer's for demo, signed by this server's key (the
    // later blocks run on the editor token the same block exported).
    const viewer = outputs[0].trim();
    assert.deepEqual(
      (({ project, role, sub }) => ({ project, role, sub }))(jwtClaims(viewer)),
      { project: 'demo', role: 'viewer', sub: 'eve' },
      context,
    );
    const accepted = await fetch(`${server.httpUrl}/api/projects/demo/checkpoints`, {
      headers: { Authorization: `Bearer ${viewer}` },
    });
    assert.equal(accepted.status, 200, 'the server accepts the minted token');

    // Step 5: the file id read from the root document opens main.py's text.
    assert.match(outputs[1], /^main\.py is demo\/[0-9a-f]{16}:\n/, context);
    assert.ok(outputs[1].includes('print(greet("world"))'), context);
    assert.ok(outputs[2].includes("'README.md', 'main.py', 'src/util.js'"), context);

    // Step 6: the metrics, which count the snippets' own connections.
    assert.match(outputs[3], /^collab_connections_total \d+/m, context);

    // Step 7: the checkpoint, its diff and restore answered, and the export is a zip.
    assert.ok(readFileSync(path.join(dir, 'demo.zip')).subarray(0, 2).equals(Buffer.from('PK')));
  });
});
