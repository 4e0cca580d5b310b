// Tokens on open sockets, through the npm clients: a token's exp ends the y-websocket socket
// and the Hocuspocus document it opened (nothing sent after is applied), and a second Auth for
// a document already open re-authorises it with the new token's role, consistently.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  Cleanup,
  editorTokenFor,
  hpClient,
  jwtClaims,
  useServer,
  viewerTokenFor,
  waitFor,
  waitHpSynced,
  waitSynced,
  yClient,
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

/** Waits until the wall clock is past the token's exp (the server allows no leeway). */
async function pastExpiry(token) {
  const { exp } = jwtClaims(token);
  await waitFor(() => Date.now() / 1000 > exp, {
    timeout: 5_000,
    message: `the clock to pass the token's exp ${exp}`,
  });
}

/** The document's text as a fresh editor gets it from the server. */
async function serverText(docName, cleanup) {
  const token = await editorTokenFor(server, docName.split('/')[0], 'checker', 'Checker');
  const check = yClient(server, docName, token, cleanup);
  await waitSynced(check, 'checker');
  const text = check.text.toString();
  check.destroy();
  return text;
}

describe('tokens on open sockets', { timeout: 120_000 }, () => {
  test('y-websocket: the socket closes with 1008 at exp and later edits are not applied', async () => {
    await withCleanup(async (cleanup) => {
      const token = await server.token({ project: 'tk', role: 'editor', user: 'late', ttl: 2 });
      const late = yClient(server, 'tk/yws', token, cleanup);
      await waitSynced(late, 'expiring client');
      late.text.insert(0, 'IN-TIME ');
      await waitFor(async () => (await serverText('tk/yws', cleanup)).includes('IN-TIME'), {
        message: 'the edit made in time to be applied',
      });
      await pastExpiry(token);
      late.text.insert(0, 'AFTER-EXPIRY ');
      await waitFor(() => late.closes.includes(1008), {
        message: 'the server to close the socket with 1008',
        describe: () => JSON.stringify(late.closes),
      });
      // It reconnects with the same (expired) token and is refused: the edit has nowhere to go.
      await waitFor(() => late.closes.length >= 2, {
        message: 'a refused reconnect',
        describe: () => JSON.stringify(late.closes),
      });
      const text = await serverText('tk/yws', cleanup);
      assert.ok(text.includes('IN-TIME'), text);
      assert.ok(!text.includes('AFTER-EXPIRY'), `an edit after expiry was applied: ${text}`);
    });
  });

  test('Hocuspocus: the document is closed at exp ("token expired") and later edits are not applied', async () => {
    await withCleanup(async (cleanup) => {
      const token = await server.token({ project: 'tk', role: 'editor', user: 'late', ttl: 2 });
      const late = hpClient(server, 'tk/hp', token, cleanup);
      await waitHpSynced(late, 'expiring client');
      late.text.insert(0, 'IN-TIME ');
      await waitFor(async () => (await serverText('tk/hp', cleanup)).includes('IN-TIME'), {
        message: 'the edit made in time to be applied',
      });
      await pastExpiry(token);
      late.text.insert(0, 'AFTER-EXPIRY ');
      await waitFor(() => late.events.authenticationFailed.includes('token expired'), {
        message: 'a permission-denied "token expired" for the document',
        describe: () => JSON.stringify(late.events),
      });
      // Its only document gone, the socket is closed (and its reconnects are refused).
      await waitFor(() => late.events.status.includes('disconnected'), {
        message: 'the socket to close',
        describe: () => JSON.stringify(late.events),
      });
      const text = await serverText('tk/hp', cleanup);
      assert.ok(text.includes('IN-TIME'), text);
      assert.ok(!text.includes('AFTER-EXPIRY'), `an edit after expiry was applied: ${text}`);
    });
  });

  test('Hocuspocus: a viewer token sent for an open editor document makes it read-only, for real', async () => {
    await withCleanup(async (cleanup) => {
      const editorToken = await editorTokenFor(server, 'tk', 'dana', 'Dana');
      const viewerToken = await viewerTokenFor(server, 'tk', 'dana', 'Dana');
      let current = editorToken;
      const client = hpClient(server, 'tk/down', () => current, cleanup);
      await waitHpSynced(client, 'editor');
      assert.equal(client.provider.authorizedScope, 'read-write');
      client.text.insert(0, 'AS-EDITOR ');
      await waitFor(async () => (await serverText('tk/down', cleanup)).includes('AS-EDITOR'), {
        message: 'the editor edit to be applied',
      });
      current = viewerToken;
      await client.provider.sendToken();
      await waitFor(() => client.provider.authorizedScope === 'readonly', {
        message: 'the document to be re-authorised read-only',
        describe: () => JSON.stringify(client.events),
      });
      const refusedBefore = client.syncStatuses().filter((s) => !s.applied).length;
      client.text.insert(0, 'AS-VIEWER ');
      await waitFor(() => client.syncStatuses().filter((s) => !s.applied).length > refusedBefore, {
        message: 'a SyncStatus(false) for the edit made after the downgrade',
        describe: () => JSON.stringify(client.syncStatuses()),
      });
      const text = await serverText('tk/down', cleanup);
      assert.ok(text.includes('AS-EDITOR'), text);
      assert.ok(!text.includes('AS-VIEWER'), `a write after the downgrade was applied: ${text}`);
      assert.deepEqual(client.events.authenticated, ['read-write', 'readonly']);
    });
  });

  test('Hocuspocus: an editor token sent for an open viewer document makes it read-write, for real', async () => {
    await withCleanup(async (cleanup) => {
      const viewerToken = await viewerTokenFor(server, 'tk', 'eve', 'Eve');
      const editorToken = await editorTokenFor(server, 'tk', 'eve', 'Eve');
      let current = viewerToken;
      const client = hpClient(server, 'tk/up', () => current, cleanup);
      await waitHpSynced(client, 'viewer');
      assert.equal(client.provider.authorizedScope, 'readonly');
      current = editorToken;
      await client.provider.sendToken();
      await waitFor(() => client.provider.authorizedScope === 'read-write', {
        message: 'the document to be re-authorised read-write',
        describe: () => JSON.stringify(client.events),
      });
      const appliedBefore = client.syncStatuses().filter((s) => s.applied).length;
      client.text.insert(0, 'AS-EDITOR ');
      await waitFor(() => client.syncStatuses().filter((s) => s.applied).length > appliedBefore, {
        message: 'a SyncStatus(true) for the edit made after the upgrade',
        describe: () => JSON.stringify(client.syncStatuses()),
      });
      await waitFor(async () => (await serverText('tk/up', cleanup)).includes('AS-EDITOR'), {
        message: 'the write after the upgrade to be applied',
      });
      assert.deepEqual(client.events.authenticated, ['readonly', 'read-write']);
    });
  });
});
