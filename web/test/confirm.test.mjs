// Confirmed means saved, through the real y-websocket provider (issue #14 items 11 to 13): while
// the store is stalled (its update log locked by `psql` in an open transaction), a writer's echo,
// its only confirmation on `/sync/{doc}`, waits; meanwhile every writer sees the others' edits at
// once. Needs COLLAB_TEST_POSTGRES_URL (`cargo xtask postgres start` prints it).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { describe, test } from 'node:test';
import * as decoding from 'lib0/decoding';
import * as Y from 'yjs';
import { Cleanup, editorTokenFor, useServer, waitFor, waitSynced, yClient } from './harness.mjs';

const POSTGRES_URL = process.env.COLLAB_TEST_POSTGRES_URL;
if (!POSTGRES_URL) {
  throw new Error(
    'confirm.test.mjs needs COLLAB_TEST_POSTGRES_URL (run `cargo xtask postgres start`)',
  );
}

const server = useServer({ args: ['--database-url', POSTGRES_URL] });

/**
 * Locks `doc_updates` in an open transaction with `psql`, so every save waits. Resolves once the
 * lock is held, with a function that releases it. Held for seconds only: other tests share the
 * database.
 */
async function stallStore() {
  const psql = spawn('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', POSTGRES_URL], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let out = '';
  psql.stdout.setEncoding('utf8').on('data', (chunk) => (out += chunk));
  psql.stderr.setEncoding('utf8').on('data', (chunk) => (out += chunk));
  const exited = new Promise((resolve) => psql.on('exit', resolve));
  psql.stdin.write(
    "BEGIN; LOCK TABLE doc_updates IN ACCESS EXCLUSIVE MODE; SELECT 'locked-now';\n",
  );
  await waitFor(() => out.includes('locked-now'), {
    message: 'psql to hold the lock',
    describe: () => out,
  });
  return async () => {
    psql.stdin.end('ROLLBACK;\n');
    await exited;
  };
}

/** The sync updates (message 0, kind 2) among the frames a client received. */
function updatesIn(frames) {
  const updates = [];
  for (const frame of frames) {
    const decoder = decoding.createDecoder(frame);
    if (decoding.readVarUint(decoder) !== 0 || decoding.readVarUint(decoder) !== 2) {
      continue;
    }
    updates.push(decoding.readVarUint8Array(decoder));
  }
  return updates;
}

/** Whether the server echoed any of this client's own edits (an update with its client's blocks). */
function echoed(client) {
  const me = client.doc.clientID;
  return updatesIn(client.frames).some((update) =>
    Y.decodeUpdate(update).structs.some((s) => s.id.client === me),
  );
}

describe('confirmations on the y-websocket endpoint', { timeout: 120_000 }, () => {
  test('during a store stall writers see each other at once, and echoes wait for the save', async () => {
    const cleanup = new Cleanup();
    try {
      const project = `confirm${Date.now()}`;
      const ada = yClient(
        server,
        `${project}/notes`,
        await editorTokenFor(server, project, 'ada', 'Ada'),
        cleanup,
      );
      const bob = yClient(
        server,
        `${project}/notes`,
        await editorTokenFor(server, project, 'bob', 'Bob'),
        cleanup,
      );
      await waitSynced(ada, 'ada');
      await waitSynced(bob, 'bob');

      const release = await stallStore();
      let released = false;
      try {
        for (let round = 0; round < 3; round += 1) {
          ada.text.insert(0, `ada${round};`);
          await waitFor(() => bob.text.toString().includes(`ada${round};`), {
            message: `bob sees ada${round}`,
          });
          bob.text.insert(0, `bob${round};`);
          await waitFor(() => ada.text.toString().includes(`bob${round};`), {
            message: `ada sees bob${round}`,
          });
        }
        // Each saw the other's last edit, which the server sent after anything it sent before.
        assert.equal(echoed(ada), false, 'ada was confirmed while the store was stalled');
        assert.equal(echoed(bob), false, 'bob was confirmed while the store was stalled');
        await release();
        released = true;
      } finally {
        if (!released) {
          await release();
        }
      }
      await waitFor(() => echoed(ada) && echoed(bob), {
        timeout: 20_000,
        message: 'both confirmed once the store is back',
      });
      assert.equal(ada.text.toString(), bob.text.toString());

      // And a late joiner gets the same document.
      const late = yClient(
        server,
        `${project}/notes`,
        await editorTokenFor(server, project, 'cy', 'Cy'),
        cleanup,
      );
      await waitSynced(late, 'late joiner');
      assert.equal(late.text.toString(), ada.text.toString());
    } finally {
      await cleanup.run();
    }
  });
});
