// Confirmed means saved, through the real y-websocket provider (issue #14 items 11 to 13): while
// the store is stalled (its update log locked by `psql` in an open transaction), a writer's echo,
// its only confirmation on `/sync/{doc}`, waits; meanwhile every writer sees the others' edits at
// once. Needs COLLAB_TEST_POSTGRES_URL (`cargo xtask postgres start` prints it).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { describe, test } from 'node:test';
import * as decoding from 'lib0/decoding';
import * as Y from 'yjs';
import {
  Cleanup,
  editorTokenFor,
  startServer,
  useServer,
  waitFor,
  waitSynced,
  yClient,
} from './harness.mjs';

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

  test('an echoed edit survives kill -9; an unechoed one comes back from its client', async () => {
    const cleanup = new Cleanup();
    const args = ['--database-url', POSTGRES_URL];
    const first = await startServer({ args });
    let second = null;
    try {
      const project = `crash${Date.now()}`;
      const doc = `${project}/notes`;
      const ada = yClient(first, doc, await editorTokenFor(first, project, 'ada', 'Ada'), cleanup);
      const bob = yClient(first, doc, await editorTokenFor(first, project, 'bob', 'Bob'), cleanup);
      await waitSynced(ada, 'ada');
      await waitSynced(bob, 'bob');
      ada.text.insert(0, 'saved;');
      await waitFor(() => echoed(ada), { timeout: 20_000, message: 'ada confirmed' });

      const release = await stallStore();
      try {
        ada.text.insert(0, 'stalled;');
        await waitFor(() => bob.text.toString().includes('stalled;'), {
          message: 'bob sees the stalled edit',
        });
        const confirmed = updatesIn(ada.frames).length;
        bob.text.insert(0, 'bob;');
        await waitFor(() => ada.text.toString().includes('bob;'), { message: 'ada sees bob' });
        // Ada has read whatever the server sent her before bob's edit: no new echo among it.
        const own = updatesIn(ada.frames)
          .slice(confirmed)
          .some((update) =>
            Y.decodeUpdate(update).structs.some((s) => s.id.client === ada.doc.clientID),
          );
        assert.equal(own, false, 'the stalled edit was confirmed');
        // Nobody can resend anything until the check below: what the store holds is what it saved.
        bob.destroy();
        ada.provider.disconnect();
        await first.kill();
      } finally {
        await release();
      }
      second = await startServer({ args, dataDir: first.dataDir, listenPort: first.port });
      const late = yClient(second, doc, await editorTokenFor(second, project, 'cy', 'Cy'), cleanup);
      await waitSynced(late, 'late joiner');
      const stored = late.text.toString();
      assert.ok(stored.includes('saved;'), `the confirmed edit was lost to kill -9: ${stored}`);
      assert.ok(
        !stored.includes('stalled;'),
        'the unconfirmed edit was saved after all (the store was stalled)',
      );
      // Ada's provider connects again and its sync step 2 brings the unconfirmed edit back.
      ada.provider.connect();
      await waitFor(() => late.text.toString().includes('stalled;'), {
        message: 'ada resent the unconfirmed edit',
      });
    } finally {
      await cleanup.run();
      await first.stop();
      await second?.stop();
    }
  });
});
