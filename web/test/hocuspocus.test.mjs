// Interop tests of the server's multiplexed Hocuspocus endpoint `/sync` with the real @hocuspocus/provider client in Node.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  Cleanup,
  editorTokenFor,
  expiredToken,
  hpClient,
  hpSocket,
  tamperToken,
  useServer,
  viewerTokenFor,
  waitFor,
  waitHpSynced,
} from './harness.mjs';

const server = useServer();

async function withCleanup(body) {
  const cleanup = new Cleanup();
  try {
    await body(cleanup);
  } finally {
    await cleanup.run();
  }
}

describe('Hocuspocus endpoint', { timeout: 120_000 }, () => {
  test('editors authenticate read-write, converge after concurrent edits and see awareness', async () => {
    await withCleanup(async (cleanup) => {
      const tokenA = await editorTokenFor(server, 'p1', 'ada', 'Ada');
      const tokenB = await editorTokenFor(server, 'p1', 'bob', 'Bob');
      const a = hpClient(server, 'p1/doc', tokenA, cleanup, { user: { name: 'Ada' } });
      const b = hpClient(server, 'p1/doc', tokenB, cleanup, { user: { name: 'Bob' } });
      await waitHpSynced(a, 'client A');
      await waitHpSynced(b, 'client B');
      assert.deepEqual(a.events.authenticated, ['read-write']);
      assert.deepEqual(b.events.authenticated, ['read-write']);
      assert.equal(a.provider.authorizedScope, 'read-write');
      assert.deepEqual(a.events.authenticationFailed, []);

      let expectedLength = 0;
      for (let i = 0; i < 15; i++) {
        a.text.insert(0, `A${i}.`);
        b.text.insert(b.text.length, `B${i}.`);
        expectedLength += `A${i}.`.length + `B${i}.`.length;
      }
      await waitFor(
        () => a.text.toString() === b.text.toString() && a.text.length === expectedLength,
        {
          message: 'A and B to converge on all 30 inserts',
          describe: () =>
            `A=${JSON.stringify(a.text.toString())} B=${JSON.stringify(b.text.toString())}`,
        },
      );
      // Every update an editor sent was acknowledged with SyncStatus(applied).
      await waitFor(() => a.provider.unsyncedChanges === 0 && b.provider.unsyncedChanges === 0, {
        message: 'both editors to have no unsynced changes',
        describe: () => `A=${a.provider.unsyncedChanges} B=${b.provider.unsyncedChanges}`,
      });
      assert.ok(a.syncStatuses().some((s) => s.applied && s.doc === 'p1/doc'));

      await waitFor(
        () => b.provider.awareness.getStates().get(a.doc.clientID)?.user?.name === 'Ada',
        {
          message: "B to see A's awareness",
          describe: () => JSON.stringify([...b.provider.awareness.getStates()]),
        },
      );
      await waitFor(
        () => a.provider.awareness.getStates().get(b.doc.clientID)?.user?.name === 'Bob',
        { message: "A to see B's awareness" },
      );
      a.destroy();
      await waitFor(() => !b.provider.awareness.getStates().has(a.doc.clientID), {
        timeout: 5_000,
        message: "A's awareness to disappear from B after A's provider was destroyed",
      });
    });
  });

  test('a viewer authenticates readonly and its edits are not relayed', async () => {
    await withCleanup(async (cleanup) => {
      const editorToken = await editorTokenFor(server, 'p1', 'ed', 'Ed');
      const viewerToken = await viewerTokenFor(server, 'p1', 'vi', 'Vi');
      const editor = hpClient(server, 'p1/hp-viewer', editorToken, cleanup);
      const viewer = hpClient(server, 'p1/hp-viewer', viewerToken, cleanup, {
        user: { name: 'Vi' },
      });
      await waitHpSynced(editor, 'editor');
      await waitHpSynced(viewer, 'viewer');
      assert.deepEqual(viewer.events.authenticated, ['readonly']);
      assert.equal(viewer.provider.authorizedScope, 'readonly');
      assert.deepEqual(editor.events.authenticated, ['read-write']);

      editor.text.insert(0, 'editor-before ');
      await waitFor(() => viewer.text.toString().includes('editor-before'), {
        message: "the viewer to receive the editor's first edit",
      });

      // Its sync reply carried no changes: acknowledged, nothing rejected.
      await waitFor(() => viewer.provider.unsyncedChanges === 0, {
        message: "the viewer's change-free sync reply to be acknowledged (unsyncedChanges 0)",
        describe: () =>
          `unsyncedChanges=${viewer.provider.unsyncedChanges} ${JSON.stringify(viewer.syncStatuses())}`,
      });
      const rejectedBefore = viewer.syncStatuses().filter((s) => !s.applied).length;
      assert.equal(rejectedBefore, 0, 'no SyncStatus(false) before the viewer edits');
      viewer.text.insert(0, 'VIEWER-EDIT ');
      await waitFor(() => viewer.syncStatuses().filter((s) => !s.applied).length > rejectedBefore, {
        message: 'a SyncStatus(false) answer to the viewer’s update',
        describe: () => JSON.stringify(viewer.syncStatuses()),
      });
      assert.ok(viewer.provider.unsyncedChanges > 0, 'the viewer keeps an unsynced change');
      assert.equal(viewer.provider.hasUnsyncedChanges, true);

      editor.text.insert(editor.text.length, 'editor-after');
      await waitFor(() => viewer.text.toString().includes('editor-after'), {
        message: "the viewer to receive the editor's later edit (proves it is still connected)",
        describe: () => `viewer=${JSON.stringify(viewer.text.toString())}`,
      });
      assert.ok(
        !editor.text.toString().includes('VIEWER-EDIT'),
        `the viewer's edit must not reach the editor, editor has ${JSON.stringify(editor.text.toString())}`,
      );
      assert.ok(viewer.provider.unsyncedChanges > 0, 'the viewer still has its unsynced change');
      await waitFor(
        () => editor.provider.awareness.getStates().get(viewer.doc.clientID)?.user?.name === 'Vi',
        { message: "the editor to see the viewer's awareness (viewers share cursors)" },
      );
    });
  });

  const badTokens = {
    'a tampered token': async () =>
      tamperToken(await server.token({ project: 'p1', role: 'viewer', user: 'mallory' }), {
        role: 'editor',
      }),
    'a token for another project': async () =>
      server.token({ project: 'p2', role: 'editor', user: 'ada' }),
    'an expired (validly signed) token': async () =>
      expiredToken(server, { project: 'p1', role: 'editor', user: 'old' }),
    'garbage instead of a token': async () => 'not-a-jwt',
  };
  for (const [what, makeToken] of Object.entries(badTokens)) {
    test(`${what} gets authenticationFailed and no document`, async () => {
      await withCleanup(async (cleanup) => {
        const editorToken = await server.token({ project: 'p1', role: 'editor', user: 'ed' });
        const editor = hpClient(server, 'p1/hp-bad', editorToken, cleanup);
        await waitHpSynced(editor, 'editor');
        editor.text.insert(0, 'secret');
        await waitFor(() => editor.provider.unsyncedChanges === 0, {
          message: "the editor's edit to be acknowledged",
        });

        const bad = hpClient(server, 'p1/hp-bad', await makeToken(), cleanup);
        const reason = await waitFor(() => bad.events.authenticationFailed[0], {
          message: 'the authenticationFailed event',
          describe: () => JSON.stringify(bad.events),
        });
        assert.equal(typeof reason, 'string');
        assert.deepEqual(bad.events.authenticated, []);
        assert.equal(bad.provider.isAuthenticated, false);
        assert.equal(bad.provider.isSynced, false);
        assert.equal(
          bad.text.toString(),
          '',
          'no document content reaches an unauthenticated client',
        );
      });
    });
  }

  test('several documents share one HocuspocusProviderWebsocket without cross-talk', async () => {
    await withCleanup(async (cleanup) => {
      const tokenA = await editorTokenFor(server, 'p1', 'ada', 'Ada');
      const tokenB = await editorTokenFor(server, 'p1', 'bob', 'Bob');
      const p2Viewer = await viewerTokenFor(server, 'p2', 'ada', 'Ada');
      const p2Editor = await editorTokenFor(server, 'p2', 'bob', 'Bob');
      const names = ['p1/mux-a', 'p1/mux-b', 'p1'];
      const socketA = hpSocket(server, cleanup);
      const socketB = hpSocket(server, cleanup);
      const left = names.map((name) =>
        hpClient(server, name, tokenA, cleanup, {
          websocketProvider: socketA.socket,
          user: { name: 'Ada' },
        }),
      );
      const right = names.map((name) =>
        hpClient(server, name, tokenB, cleanup, {
          websocketProvider: socketB.socket,
          user: { name: 'Bob' },
        }),
      );
      // One more document of another project, with another role, on the same socket.
      const leftP2 = hpClient(server, 'p2/shared', p2Viewer, cleanup, {
        websocketProvider: socketA.socket,
      });
      const rightP2 = hpClient(server, 'p2/shared', p2Editor, cleanup, {
        websocketProvider: socketB.socket,
      });
      for (const [i, c] of [...left, ...right, leftP2, rightP2].entries()) {
        await waitHpSynced(c, `multiplexed client ${i}`);
      }
      assert.equal(socketA.counter.opened, 1, 'socket A opened exactly one WebSocket');
      assert.equal(socketB.counter.opened, 1, 'socket B opened exactly one WebSocket');
      assert.deepEqual(
        leftP2.events.authenticated,
        ['readonly'],
        'per-document scope on a shared socket',
      );
      assert.deepEqual(left[0].events.authenticated, ['read-write']);

      names.forEach((name, i) => {
        left[i].text.insert(0, `left:${name};`);
        right[i].text.insert(0, `right:${name};`);
      });
      rightP2.text.insert(0, 'p2-from-editor');
      leftP2.text.insert(0, 'p2-from-viewer');
      for (const [i, name] of names.entries()) {
        await waitFor(
          () =>
            left[i].text.toString() === right[i].text.toString() &&
            left[i].text.toString().includes(`left:${name};`) &&
            left[i].text.toString().includes(`right:${name};`),
          {
            message: `both sockets to converge on ${name}`,
            describe: () =>
              `left=${JSON.stringify(left[i].text.toString())} right=${JSON.stringify(right[i].text.toString())}`,
          },
        );
        await waitFor(
          () =>
            right[i].provider.awareness.getStates().get(left[i].doc.clientID)?.user?.name === 'Ada',
          { message: `awareness of ${name} to cross the shared sockets` },
        );
      }
      await waitFor(() => leftP2.text.toString().includes('p2-from-editor'), {
        message: 'the p2 viewer to receive the p2 edit over the shared socket',
      });
      for (const [i, name] of names.entries()) {
        const text = left[i].text.toString();
        for (const other of names.filter((n) => n !== name)) {
          assert.ok(
            !text.includes(`:${other};`),
            `${name} must not receive ${other}'s edits: ${text}`,
          );
        }
        assert.ok(!text.includes('p2-'), `${name} must not receive p2 edits: ${text}`);
      }
      assert.ok(
        !rightP2.text.toString().includes('p2-from-viewer'),
        'the p2 viewer edit is not relayed',
      );
      assert.equal(socketA.counter.opened, 1, 'still one WebSocket on socket A');
    });
  });
});
