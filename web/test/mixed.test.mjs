// Interop test: a y-websocket client (`/sync/{doc}`) and a Hocuspocus client (`/sync`) on the same document see each other.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  Cleanup,
  editorTokenFor,
  hpClient,
  useServer,
  waitFor,
  waitHpSynced,
  waitSynced,
  yClient,
} from './harness.mjs';

const server = useServer();

describe('y-websocket and Hocuspocus on one document', { timeout: 120_000 }, () => {
  test('edits and awareness flow both ways', async () => {
    const cleanup = new Cleanup();
    try {
      const tokenY = await editorTokenFor(server, 'p1', 'yuri', 'Yuri');
      const tokenH = await editorTokenFor(server, 'p1', 'hana', 'Hana');
      const y = yClient(server, 'p1/mixed', tokenY, cleanup, { user: { name: 'Yuri' } });
      const h = hpClient(server, 'p1/mixed', tokenH, cleanup, { user: { name: 'Hana' } });
      await waitSynced(y, 'y-websocket client');
      await waitHpSynced(h, 'Hocuspocus client');

      y.text.insert(0, 'from-y-websocket;');
      await waitFor(() => h.text.toString().includes('from-y-websocket;'), {
        message: "the Hocuspocus client to receive the y-websocket client's edit",
        describe: () => JSON.stringify(h.text.toString()),
      });
      h.text.insert(h.text.length, 'from-hocuspocus;');
      await waitFor(() => y.text.toString().includes('from-hocuspocus;'), {
        message: "the y-websocket client to receive the Hocuspocus client's edit",
        describe: () => JSON.stringify(y.text.toString()),
      });

      // Concurrent edits from both sides converge.
      y.text.insert(0, 'Y1;');
      h.text.insert(0, 'H1;');
      await waitFor(
        () =>
          y.text.toString() === h.text.toString() &&
          y.text.toString().includes('Y1;') &&
          y.text.toString().includes('H1;'),
        {
          message: 'both clients to converge',
          describe: () =>
            `y=${JSON.stringify(y.text.toString())} h=${JSON.stringify(h.text.toString())}`,
        },
      );
      assert.equal(y.text.toString().length, 'from-y-websocket;from-hocuspocus;Y1;H1;'.length);

      await waitFor(
        () => y.provider.awareness.getStates().get(h.doc.clientID)?.user?.name === 'Hana',
        {
          message: "the y-websocket client to see the Hocuspocus client's awareness",
          describe: () => JSON.stringify([...y.provider.awareness.getStates()]),
        },
      );
      await waitFor(
        () => h.provider.awareness.getStates().get(y.doc.clientID)?.user?.name === 'Yuri',
        {
          message: "the Hocuspocus client to see the y-websocket client's awareness",
          describe: () => JSON.stringify([...h.provider.awareness.getStates()]),
        },
      );
    } finally {
      await cleanup.run();
    }
  });
});
