// Interop tests of the server's y-websocket endpoint `/sync/{doc}` with the real yjs + y-websocket clients in Node.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import WebSocket from 'ws';
import {
  Cleanup,
  editorTokenFor,
  expiredToken,
  mintToken,
  tamperToken,
  useServer,
  viewerTokenFor,
  waitFor,
  waitSynced,
  yClient,
} from './harness.mjs';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

const server = useServer();

/** Runs `body` with a fresh Cleanup that is always run afterwards. */
async function withCleanup(body) {
  const cleanup = new Cleanup();
  try {
    await body(cleanup);
  } finally {
    await cleanup.run();
  }
}

/** Attempts a bare WebSocket upgrade and resolves with the HTTP status the server answered. */
function upgradeStatus(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    const timer = setTimeout(() => {
      ws.terminate();
      reject(new Error(`no answer to the upgrade of ${url} within 10 s`));
    }, 10_000);
    ws.on('upgrade', () => {
      clearTimeout(timer);
      ws.close();
      resolve(101);
    });
    ws.on('error', (error) => {
      clearTimeout(timer);
      const match = /Unexpected server response: (\d+)/.exec(error.message);
      if (match) {
        resolve(Number(match[1]));
      } else {
        reject(error);
      }
    });
  });
}

describe('y-websocket endpoint', { timeout: 120_000 }, () => {
  test('two editors converge after concurrent inserts, and a late joiner gets the result', async () => {
    await withCleanup(async (cleanup) => {
      const tokenA = await editorTokenFor(server, 'p1', 'ada', 'Ada');
      const tokenB = await editorTokenFor(server, 'p1', 'bob', 'Bob');
      const a = yClient(server, 'p1/notes', tokenA, cleanup);
      const b = yClient(server, 'p1/notes', tokenB, cleanup);
      await waitSynced(a, 'client A');
      await waitSynced(b, 'client B');

      // Concurrent: both edit before either can have seen the other's change.
      let expectedLength = 0;
      for (let i = 0; i < 20; i++) {
        a.text.insert(0, `a${i};`);
        b.text.insert(b.text.length, `b${i};`);
        expectedLength += `a${i};`.length + `b${i};`.length;
      }
      await waitFor(
        () => a.text.toString() === b.text.toString() && a.text.length === expectedLength,
        {
          message: 'A and B to converge on all 40 inserts',
          describe: () =>
            `A=${JSON.stringify(a.text.toString())} B=${JSON.stringify(b.text.toString())}`,
        },
      );
      for (let i = 0; i < 20; i++) {
        assert.ok(a.text.toString().includes(`a${i};`), `A's insert a${i} survived`);
        assert.ok(a.text.toString().includes(`b${i};`), `B's insert b${i} survived`);
      }

      const tokenC = await viewerTokenFor(server, 'p1', 'cy', 'Cy');
      const c = yClient(server, 'p1/notes', tokenC, cleanup);
      await waitSynced(c, 'late client C');
      await waitFor(() => c.text.toString() === a.text.toString(), {
        message: 'late joiner C to receive the converged text',
        describe: () =>
          `A=${JSON.stringify(a.text.toString())} C=${JSON.stringify(c.text.toString())}`,
      });
    });
  });

  test('awareness is shared, and removed within a few seconds after provider.destroy()', async () => {
    await withCleanup(async (cleanup) => {
      const tokenA = await editorTokenFor(server, 'p1', 'ada', 'Ada');
      const tokenB = await editorTokenFor(server, 'p1', 'bob', 'Bob');
      const a = yClient(server, 'p1/notes', tokenA, cleanup, { user: { name: 'Ada Lovelace' } });
      const b = yClient(server, 'p1/notes', tokenB, cleanup, { user: { name: 'Bob' } });
      await waitSynced(a, 'client A');
      await waitSynced(b, 'client B');
      const aId = a.doc.clientID;
      await waitFor(
        () => b.provider.awareness.getStates().get(aId)?.user?.name === 'Ada Lovelace',
        {
          message: "B to see A's awareness state { user: { name: 'Ada Lovelace' } }",
          describe: () => JSON.stringify([...b.provider.awareness.getStates()]),
        },
      );
      await waitFor(
        () => a.provider.awareness.getStates().get(b.doc.clientID)?.user?.name === 'Bob',
        {
          message: "A to see B's awareness state",
        },
      );
      // An update of a field is relayed too.
      a.provider.awareness.setLocalStateField('cursor', { anchor: 1 });
      await waitFor(() => b.provider.awareness.getStates().get(aId)?.cursor?.anchor === 1, {
        message: "B to see A's awareness update",
      });

      a.destroy();
      await waitFor(() => !b.provider.awareness.getStates().has(aId), {
        timeout: 5_000,
        message: "A's awareness state to disappear from B after A's provider.destroy()",
        describe: () => JSON.stringify([...b.provider.awareness.getStates()]),
      });
    });
  });

  test('awareness of a client whose connection drops without a goodbye is removed', async () => {
    await withCleanup(async (cleanup) => {
      const tokenA = await editorTokenFor(server, 'p1', 'ada', 'Ada');
      const tokenB = await editorTokenFor(server, 'p1', 'bob', 'Bob');
      const a = yClient(server, 'p1/drop', tokenA, cleanup, { user: { name: 'Ada' } });
      const b = yClient(server, 'p1/drop', tokenB, cleanup, { user: { name: 'Bob' } });
      await waitSynced(a, 'client A');
      await waitSynced(b, 'client B');
      const aId = a.doc.clientID;
      await waitFor(() => b.provider.awareness.getStates().has(aId), { message: 'B to see A' });
      // Cut A's TCP connection without sending the awareness removal y-websocket sends on destroy.
      a.provider.shouldConnect = false;
      a.provider.ws.terminate();
      await waitFor(() => !b.provider.awareness.getStates().has(aId), {
        timeout: 10_000,
        message:
          "A's awareness state to disappear from B after A's socket was cut (server-side clean-up)",
        describe: () => JSON.stringify([...b.provider.awareness.getStates()]),
      });
    });
  });

  test("a viewer's edits are dropped with a permission-denied message, while it still receives edits", async () => {
    await withCleanup(async (cleanup) => {
      const editorToken = await editorTokenFor(server, 'p1', 'ed', 'Ed');
      const viewerToken = await viewerTokenFor(server, 'p1', 'vi', 'Vi');
      const editor = yClient(server, 'p1/viewer-doc', editorToken, cleanup);
      const viewer = yClient(server, 'p1/viewer-doc', viewerToken, cleanup, {
        user: { name: 'Vi' },
      });
      await waitSynced(editor, 'editor');
      await waitSynced(viewer, 'viewer');

      editor.text.insert(0, 'editor-before ');
      await waitFor(() => viewer.text.toString().includes('editor-before'), {
        message: "the viewer to receive the editor's first edit",
      });

      assert.deepEqual(
        viewer.permissionDenials(),
        [],
        'no permission-denied message while the viewer sent nothing but its (empty) sync reply',
      );
      viewer.text.insert(0, 'VIEWER-EDIT ');
      const reason = await waitFor(() => viewer.permissionDenials()[0], {
        message: 'an auth permission-denied message (type 2, 0, reason) to reach the viewer',
        describe: () => `${viewer.frames.length} frames received`,
      });
      assert.equal(typeof reason, 'string');

      editor.text.insert(editor.text.length, 'editor-after');
      await waitFor(() => viewer.text.toString().includes('editor-after'), {
        message: "the viewer to receive the editor's later edit (proves it is still connected)",
        describe: () => `viewer=${JSON.stringify(viewer.text.toString())}`,
      });
      assert.equal(viewer.provider.wsconnected, true, 'the viewer stays connected');
      assert.ok(
        !editor.text.toString().includes('VIEWER-EDIT'),
        `the viewer's edit must not reach the editor, editor has ${JSON.stringify(editor.text.toString())}`,
      );
      // Viewers still share awareness (cursors).
      await waitFor(
        () => editor.provider.awareness.getStates().get(viewer.doc.clientID)?.user?.name === 'Vi',
        {
          message: "the editor to see the viewer's awareness state",
        },
      );

      // Nor was it stored: a client joining now gets the editor's text only.
      const lateToken = await editorTokenFor(server, 'p1', 'la', 'La');
      const late = yClient(server, 'p1/viewer-doc', lateToken, cleanup);
      await waitSynced(late, 'late editor');
      await waitFor(() => late.text.toString() === editor.text.toString(), {
        message: "the late editor to receive the editor's text",
        describe: () =>
          `late=${JSON.stringify(late.text.toString())} editor=${JSON.stringify(editor.text.toString())}`,
      });
      assert.ok(!late.text.toString().includes('VIEWER-EDIT'));
    });
  });

  describe('refused tokens', () => {
    let otherDataDir;
    before(() => {
      otherDataDir = mkdtempSync(path.join(tmpdir(), 'collab-web-test-other-'));
    });
    after(() => {
      rmSync(otherDataDir, { recursive: true, force: true });
    });

    const cases = {
      'a token with a tampered payload (role viewer → editor)': async () =>
        tamperToken(await server.token({ project: 'p1', role: 'viewer', user: 'mallory' }), {
          role: 'editor',
        }),
      'a token signed by another server (other data dir)': async () =>
        mintToken(server.bin, otherDataDir, { project: 'p1', role: 'editor', user: 'eve' }),
      'a token for another project': async () => editorTokenFor(server, 'p2', 'ada', 'Ada'),
      'an expired (validly signed) token': async () =>
        expiredToken(server, { project: 'p1', role: 'editor', user: 'old' }),
      'garbage instead of a token': async () => 'not-a-jwt',
    };

    for (const [name, makeToken] of Object.entries(cases)) {
      test(`${name} never connects (HTTP 401 at the upgrade)`, async () => {
        await withCleanup(async (cleanup) => {
          const token = await makeToken();
          const url = `${server.wsUrl}/p1/notes?token=${encodeURIComponent(token)}`;
          assert.equal(await upgradeStatus(url), 401, `upgrade of ${url}`);
          const client = yClient(server, 'p1/notes', token, cleanup);
          await waitFor(() => client.closes.length >= 2, {
            message: 'the provider to see two refused connection attempts',
            describe: () => `statuses=${JSON.stringify(client.statuses)}`,
          });
          assert.ok(
            !client.statuses.includes('connected'),
            `statuses: ${client.statuses.join(',')}`,
          );
          assert.equal(client.provider.synced, false);
        });
      });
    }

    test('no token at all is refused with HTTP 401', async () => {
      assert.equal(await upgradeStatus(`${server.wsUrl}/p1/notes`), 401);
    });
  });
});
