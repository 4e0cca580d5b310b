// End-to-end browser test: the built page (web/dist) served by `collab serve --demo`, driven in two headless Chromium contexts.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import * as Y from 'yjs';
import {
  Cleanup,
  editorTokenFor,
  expiredToken,
  tamperToken,
  useBrowser,
  useServer,
  viewerTokenFor,
  waitFor,
  waitSynced,
  yClient,
} from './harness.mjs';

const SCREENSHOT = '/tmp/web-browser-test.png';

// This server runs no sandbox (test/exec.test.mjs covers runs and terminals), so it refuses the
// page's exec socket with 503: the console and terminal panes say the runner is unavailable.
const EXEC_REFUSED = /WebSocket connection to '[^']*\/exec\/[^']*' failed/;

const server = useServer({ demo: true });
const browser = useBrowser({ ignoreConsole: [EXEC_REFUSED] });
const pageProblems = browser.problems;

function newPage(label, opts) {
  return browser.newPage(label, opts);
}

function pageUrl(token, project = 'demo') {
  return `${server.httpUrl}/?project=${project}&token=${encodeURIComponent(token)}`;
}

async function statusText(page) {
  return (await page.getByTestId('status').textContent())?.trim();
}

async function waitConnected(page, what) {
  await waitFor(async () => (await statusText(page)) === 'connected', {
    timeout: 20_000,
    message: `${what}: status "connected"`,
    describe: () => 'see the page screenshot',
  }).catch(async (error) => {
    const message = await page.getByTestId('message').textContent();
    throw new Error(`${error.message}; status=${await statusText(page)} message=${message}`);
  });
}

async function fileItems(page) {
  return page
    .getByTestId('file-tree')
    .getByTestId('file-item')
    .evaluateAll((items) =>
      items.map((i) => ({
        path: i.dataset.path,
        id: i.dataset.fileId,
        selected: i.classList.contains('selected'),
      })),
    );
}

async function openFile(page) {
  return page.evaluate(() => window.collabApp?.openFile ?? null);
}

describe('the page in Chromium', { timeout: 180_000 }, () => {
  let tokenA;
  let tokenB;
  let chosen;
  let pageA;
  let pageB;

  test('the server prints working demo links', async () => {
    const links = await waitFor(
      () => {
        const found = server
          .stdout()
          .match(/http:\/\/127\.0\.0\.1:\d+\/\?project=demo&token=[\w.-]+/g);
        return found && found.length > 0 ? found : null;
      },
      {
        message: 'a demo link http://127.0.0.1:PORT/?project=demo&token=... on stdout',
        describe: server.log,
      },
    );
    assert.ok(
      links[0].startsWith(`${server.httpUrl}/`),
      `demo link ${links[0]} points at this server`,
    );
    const page = await newPage('demo-link');
    await page.goto(links[0]);
    await waitConnected(page, 'page opened from a demo link');
    await waitFor(async () => (await fileItems(page)).length >= 2, {
      message: 'the demo project to list files',
    });
    assert.equal(await page.getByTestId('project').textContent(), 'demo');
    assert.equal(await page.evaluate(() => document.compatMode), 'CSS1Compat', 'standards mode');
  });

  test('the demo project follows the root document schema v1', async () => {
    const local = new Cleanup();
    try {
      const token = await server.token({ project: 'demo', role: 'viewer', user: 'schema' });
      const root = yClient(server, 'demo', token, local);
      await waitSynced(root, 'demo root document');
      assert.equal(root.doc.getMap('meta').get('schema'), 1, 'meta.schema');
      assert.ok(Array.isArray(root.doc.getArray('chat').toJSON()), 'chat is an array');
      assert.equal(typeof root.doc.getMap('settings').toJSON(), 'object', 'settings is a map');
      const files = [...root.doc.getMap('files').entries()];
      assert.ok(files.length >= 2, `the demo has a few files, got ${files.length}`);
      for (const [id, entry] of files) {
        assert.match(id, /^[0-9a-f]{16}$/, 'file ids are 16 lowercase hex chars');
        assert.ok(entry instanceof Y.Map, `entry ${id} is a Y.Map`);
        assert.match(entry.get('path'), /^[^/]/, `entry ${id} has a relative path`);
        assert.ok(['file', 'dir'].includes(entry.get('kind')), `entry ${id} kind`);
        if (entry.get('kind') === 'file') {
          const file = yClient(server, `demo/${id}`, token, local);
          await waitSynced(file, `demo/${id}`);
          assert.ok(file.text.length > 0, `${entry.get('path')} has text in Y.Text "content"`);
        }
      }
    } finally {
      await local.run();
    }
  });

  test('two users edit the same file concurrently and see named cursors', async () => {
    tokenA = await editorTokenFor(server, 'demo', 'alice', 'Alice Anders');
    tokenB = await editorTokenFor(server, 'demo', 'bob', 'Bob Brown');
    pageA = await newPage('A');
    pageB = await newPage('B');
    await Promise.all([pageA.goto(pageUrl(tokenA)), pageB.goto(pageUrl(tokenB))]);
    await waitConnected(pageA, 'page A');
    await waitConnected(pageB, 'page B');
    assert.equal((await pageA.getByTestId('user-name').textContent()).trim(), 'Alice Anders');
    assert.match(await pageA.getByTestId('user-role').textContent(), /editor/);

    const items = await waitFor(
      async () => {
        const found = await fileItems(pageA);
        return found.length >= 2 ? found : null;
      },
      { message: 'page A to list at least two demo files' },
    );
    // The first file opens by itself.
    await waitFor(async () => (await openFile(pageA))?.id === items[0].id, {
      message: 'page A to open the first file of the tree automatically',
    });

    // Both open the second file, so the reload check below cannot pass by auto-opening the first.
    chosen = items[1];
    for (const page of [pageA, pageB]) {
      await page.locator(`[data-testid="file-item"][data-file-id="${chosen.id}"]`).click();
      await waitFor(async () => (await openFile(page))?.id === chosen.id, {
        message: `opening ${chosen.path}`,
      });
    }
    assert.match(
      pageA.url(),
      new RegExp(`#file=${chosen.id}$`),
      'the open file id is in the URL hash',
    );
    await waitFor(
      async () => {
        const [a, b] = [await openFile(pageA), await openFile(pageB)];
        return a.text === b.text;
      },
      { message: 'both editors to show the same initial text' },
    );

    for (const page of [pageA, pageB]) {
      await page.getByTestId('editor').locator('.cm-content').click();
      await page.keyboard.press('Control+End');
    }
    const typedA = 'Alpha typed by Alice';
    const typedB = 'Bravo typed by Bob';
    await Promise.all([
      pageA.keyboard.type(typedA, { delay: 15 }),
      pageB.keyboard.type(typedB, { delay: 15 }),
    ]);
    await waitFor(
      async () => {
        const [a, b] = [await openFile(pageA), await openFile(pageB)];
        return a.text === b.text && a.text.includes(typedA) && a.text.includes(typedB);
      },
      {
        timeout: 15_000,
        message: 'both editors to converge on a text containing both typed strings',
      },
    ).catch(async (error) => {
      throw new Error(
        `${error.message}; A=${JSON.stringify(await openFile(pageA))} B=${JSON.stringify(await openFile(pageB))}`,
      );
    });

    // B sees A's cursor, labelled with A's display name.
    const labelB = pageB
      .getByTestId('editor')
      .locator('.cm-ySelectionInfo', { hasText: 'Alice Anders' });
    await waitFor(async () => (await labelB.count()) > 0, {
      message: "page B to show a cursor labelled 'Alice Anders'",
    });
    const labelA = pageA
      .getByTestId('editor')
      .locator('.cm-ySelectionInfo', { hasText: 'Bob Brown' });
    await waitFor(async () => (await labelA.count()) > 0, {
      message: "page A to show a cursor labelled 'Bob Brown'",
    });
    await waitFor(
      async () =>
        (await pageB.getByTestId('presence-user').allTextContents()).includes('Alice Anders'),
      {
        message: 'page B to list Alice Anders as present',
      },
    );

    await pageB.screenshot({ path: SCREENSHOT });
  });

  test('a reload stays on the file in the URL hash', async () => {
    await pageA.reload();
    await waitConnected(pageA, 'reloaded page A');
    await waitFor(async () => (await openFile(pageA))?.id === chosen.id, {
      message: `the reloaded page to reopen ${chosen.path} from the hash`,
    });
    await waitFor(async () => (await openFile(pageA))?.text.includes('Alpha typed by Alice'), {
      message: 'the reloaded editor to show the shared text',
    });
    const selected = (await fileItems(pageA)).filter((i) => i.selected);
    assert.deepEqual(
      selected.map((i) => i.id),
      [chosen.id],
      'exactly the reopened file is highlighted',
    );
  });

  test('a viewer gets a read-only editor', async () => {
    const token = await viewerTokenFor(server, 'demo', 'vera', 'Vera Viewer');
    const page = await newPage('viewer');
    await page.goto(`${pageUrl(token)}#file=${chosen.id}`);
    await waitConnected(page, 'viewer page');
    await waitFor(async () => (await openFile(page))?.text.includes('Bravo typed by Bob'), {
      message: 'the viewer to see the shared text',
    });
    const content = page.getByTestId('editor').locator('.cm-content');
    assert.equal(await content.getAttribute('contenteditable'), 'false');
    assert.equal(await page.getByTestId('readonly-badge').isVisible(), true);
    assert.match(await page.getByTestId('user-role').textContent(), /viewer/);
    const before = (await openFile(page)).text;
    await content.click();
    await page.keyboard.type('VIEWER WAS HERE');
    // Prove the viewer is still in sync after its attempt: a later edit by A arrives.
    await pageA.getByTestId('editor').locator('.cm-content').click();
    await pageA.keyboard.press('Control+End');
    await pageA.keyboard.type(' +later');
    await waitFor(async () => (await openFile(page)).text.includes('+later'), {
      message: "the viewer to receive A's later edit",
    });
    assert.ok(!(await openFile(page)).text.includes('VIEWER WAS HERE'), 'the viewer cannot type');
    assert.ok(!(await openFile(pageA)).text.includes('VIEWER WAS HERE'));
    assert.ok((await openFile(page)).text.startsWith(before.slice(0, 10)));
  });

  test('without a sandbox on the server, Run is off and the panel says the runner is unavailable', async () => {
    await waitFor(
      async () =>
        (await pageA.getByTestId('exec-status').getAttribute('data-state')) === 'unavailable',
      { timeout: 20_000, message: 'page A to call the runner unavailable' },
    );
    assert.match(await pageA.getByTestId('exec-status').textContent(), /unavailable/);
    assert.equal(await pageA.getByTestId('run-button').isDisabled(), true);
    assert.equal(await pageA.getByTestId('terminal-open').isDisabled(), true);
    assert.equal(await pageA.getByTestId('stdin-input').isDisabled(), true);
  });

  test('the tree is live and shows clashing paths by the clash rule', async () => {
    const local = new Cleanup();
    try {
      const token = await editorTokenFor(server, 'demo', 'bot', 'Bot');
      const root = yClient(server, 'demo', token, local);
      await waitSynced(root, 'root document client');
      const files = root.doc.getMap('files');
      root.doc.transact(() => {
        for (const id of ['bbbbbb0000000002', 'aaaaaa0000000001']) {
          const entry = new Y.Map();
          entry.set('path', 'clash/same.txt');
          entry.set('kind', 'file');
          files.set(id, entry);
        }
      });
      await waitFor(
        async () => {
          const paths = (await fileItems(pageB)).map((i) => `${i.path}=${i.id}`);
          return (
            paths.includes('clash/same.txt=aaaaaa0000000001') &&
            paths.includes('clash/same (bbbbbb).txt=bbbbbb0000000002')
          );
        },
        {
          message: 'page B to list clash/same.txt and clash/same (bbbbbb).txt',
          describe: () => 'see fileItems',
        },
      );
      root.doc.transact(() => {
        files.delete('aaaaaa0000000001');
        files.delete('bbbbbb0000000002');
      });
      await waitFor(
        async () => !(await fileItems(pageB)).some((i) => i.path.startsWith('clash/')),
        {
          message: 'page B to drop the deleted entries',
        },
      );
    } finally {
      await local.run();
    }
  });

  test('missing, refused and expired tokens show a clear message', async () => {
    const benign = [/WebSocket connection to .* failed/, /401/];
    const noToken = await newPage('no-token');
    await noToken.goto(`${server.httpUrl}/?project=demo`);
    await waitFor(
      async () => /no access token/i.test(await noToken.getByTestId('message').textContent()),
      {
        message: 'a "no access token" message',
      },
    );
    assert.notEqual(await statusText(noToken), 'connected');

    const forged = tamperToken(tokenA, { name: 'Forged Name' });
    const refused = await newPage('refused', { ignoreConsole: benign });
    await refused.goto(pageUrl(forged));
    await waitFor(async () => /refused/i.test(await refused.getByTestId('message').textContent()), {
      message: 'a "server refused" message for a forged token',
    });
    assert.equal(await statusText(refused), 'disconnected');
    assert.equal(await refused.getByTestId('message').isVisible(), true);

    const expired = await expiredToken(server, { project: 'demo', role: 'editor', user: 'late' });
    const expiredPage = await newPage('expired');
    await expiredPage.goto(pageUrl(expired));
    await waitFor(
      async () => /expired/i.test(await expiredPage.getByTestId('message').textContent()),
      {
        message: 'an "expired" message',
      },
    );
    assert.notEqual(await statusText(expiredPage), 'connected');
  });

  test('no page errors', () => {
    assert.deepEqual(pageProblems, []);
  });
});
