// End-to-end test of the run console and shared terminal: `collab serve --demo --sandbox local`, three Chromium pages (two editors, one viewer) on one project.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import WebSocket from 'ws';
import {
  Cleanup,
  editorTokenFor,
  useBrowser,
  useServer,
  viewerTokenFor,
  waitFor,
  waitSynced,
  yClient,
} from './harness.mjs';

const SCREENSHOT = '/tmp/web-exec-test.png';

const server = useServer({ demo: true, sandbox: 'local' });
const browser = useBrowser();

function pageUrl(token, project = 'demo') {
  return `${server.httpUrl}/?project=${project}&token=${encodeURIComponent(token)}`;
}

/** What a page shows of the exec channel, read through the page's test hooks and the DOM. */
async function execView(page) {
  return page.evaluate(() => {
    const exec = window.collabApp?.exec;
    const byId = (id) => document.querySelector(`[data-testid="${id}"]`);
    return {
      channel: exec?.channel.state ?? null,
      console: exec?.console.text ?? '',
      verdict: byId('run-verdict').textContent,
      verdictState: byId('run-verdict').dataset.state,
      runInfo: byId('run-info').textContent,
      terminal: exec?.terminal.text ?? '',
      termId: exec?.terminal.termId ?? null,
      error: byId('exec-error').hidden ? null : byId('exec-error').textContent,
      errors: [...(exec?.errors ?? [])],
    };
  });
}

/** Polls `page` until `check(view)` holds; the failure names the page and its last view. */
async function waitView(page, label, what, check, timeout = 30_000) {
  let last = null;
  return waitFor(
    async () => {
      last = await execView(page);
      return check(last) ? last : null;
    },
    { timeout, message: `${label}: ${what}`, describe: () => JSON.stringify(last) },
  );
}

/** The terminal's lines (screen and scrollback), right-trimmed. */
function lines(text) {
  return text.split('\n').map((line) => line.trimEnd());
}

/** Sets a file's text through the shared document, as another editor would. */
async function setFileText(token, path, text) {
  const local = new Cleanup();
  try {
    const root = yClient(server, 'demo', token, local);
    await waitSynced(root, 'demo root');
    const id = [...root.doc.getMap('files').entries()].find(([, e]) => e.get('path') === path)?.[0];
    assert.ok(id, `the demo project has ${path}`);
    const file = yClient(server, `demo/${id}`, token, local);
    await waitSynced(file, `demo/${id}`);
    file.doc.transact(() => {
      file.text.delete(0, file.text.length);
      file.text.insert(0, text);
    });
    // Synced once the server has it: a fresh client sees the new text.
    const check = yClient(server, `demo/${id}`, token, local);
    await waitFor(() => check.text.toString() === text, {
      timeout: 10_000,
      message: `the server to hold the new ${path}`,
    });
  } finally {
    await local.run();
  }
}

describe('runs and the shared terminal in Chromium', { timeout: 240_000 }, () => {
  let tokenA;
  let pageA;
  let pageB;
  let viewer;

  test('the exec channel greets a client with hello', async () => {
    const token = await editorTokenFor(server, 'demo', 'probe', 'Probe');
    const socket = new WebSocket(
      `ws://127.0.0.1:${server.port}/exec/demo?token=${encodeURIComponent(token)}`,
    );
    try {
      const hello = await new Promise((resolve, reject) => {
        socket.once('message', (data) => resolve(JSON.parse(data.toString())));
        socket.once('error', reject);
        socket.once('close', (code) => reject(new Error(`closed with ${code} before a hello`)));
      });
      assert.equal(hello.type, 'hello');
      assert.equal(hello.role, 'editor');
      assert.ok(Array.isArray(hello.runs) && Array.isArray(hello.terms));
    } finally {
      socket.close();
    }
  });

  test('an editor runs the program and every page sees its output and verdict', async () => {
    tokenA = await editorTokenFor(server, 'demo', 'alice', 'Alice Anders');
    const tokenB = await editorTokenFor(server, 'demo', 'bob', 'Bob Brown');
    const tokenV = await viewerTokenFor(server, 'demo', 'vera', 'Vera Viewer');
    pageA = await browser.newPage('A');
    pageB = await browser.newPage('B');
    viewer = await browser.newPage('viewer');
    await Promise.all([
      pageA.goto(pageUrl(tokenA)),
      pageB.goto(pageUrl(tokenB)),
      viewer.goto(pageUrl(tokenV)),
    ]);
    for (const [page, label] of [
      [pageA, 'A'],
      [pageB, 'B'],
      [viewer, 'viewer'],
    ]) {
      await waitView(page, label, 'the exec channel to connect', (v) => v.channel === 'connected');
    }
    await waitFor(async () => !(await pageA.getByTestId('run-button').isDisabled()), {
      message: "A's Run button to be enabled",
    });
    assert.equal(await viewer.getByTestId('run-button').isDisabled(), true, 'viewers cannot run');

    await pageA.getByTestId('run-button').click();
    for (const [page, label] of [
      [pageA, 'A'],
      [pageB, 'B'],
      [viewer, 'viewer'],
    ]) {
      const view = await waitView(
        page,
        label,
        'the output "Hello, world!" and the verdict "exited with code 0"',
        (v) => v.console.includes('Hello, world!') && v.verdictState === 'ok',
        60_000,
      );
      assert.match(view.verdict, /exited with code 0/);
      assert.match(view.runInfo, /python3 main\.py/);
      assert.match(view.runInfo, /started by Alice Anders/);
    }
    await pageB.screenshot({ path: SCREENSHOT });
  });

  test('input typed on one page reaches the program; EOF ends it', async () => {
    await setFileText(
      tokenA,
      'main.py',
      [
        'import sys',
        'name = input("name? ")',
        'print(f"Hi {name}!", flush=True)',
        'rest = sys.stdin.read()',
        'print(f"rest={len(rest)}")',
        '',
      ].join('\n'),
    );
    await pageB.getByTestId('run-button').click();
    await waitView(pageA, 'A', 'the run started by Bob', (v) =>
      /started by Bob Brown/.test(v.runInfo),
    );
    await waitFor(async () => !(await pageA.getByTestId('stdin-input').isDisabled()), {
      message: "A's stdin line to open while the program runs",
    });
    assert.equal(await viewer.getByTestId('stdin-input').isDisabled(), true, 'viewers cannot type');
    await pageA.getByTestId('stdin-input').fill('Ada');
    await pageA.getByTestId('stdin-input').press('Enter');
    await waitView(pageB, 'B', '"Hi Ada!" in the output', (v) => v.console.includes('Hi Ada!'));
    assert.equal(await pageA.getByTestId('stdin-input').inputValue(), '', 'the line was sent');
    await pageA.getByTestId('stdin-eof').click();
    for (const [page, label] of [
      [pageA, 'A'],
      [pageB, 'B'],
      [viewer, 'viewer'],
    ]) {
      const view = await waitView(
        page,
        label,
        'the program to finish after EOF',
        (v) => v.console.includes('rest=0') && v.verdictState === 'ok',
      );
      assert.match(view.console, /Hi Ada!/);
    }
  });

  test('Stop ends a running program for everyone', async () => {
    await setFileText(
      tokenA,
      'main.py',
      'import time\nprint("sleeping", flush=True)\ntime.sleep(120)\n',
    );
    await pageA.getByTestId('run-button').click();
    await waitView(pageB, 'B', '"sleeping" in the output', (v) => v.console.includes('sleeping'));
    assert.equal(await pageA.getByTestId('run-button').isDisabled(), true, 'one run at a time');
    await pageB.getByTestId('stop-button').click();
    for (const [page, label] of [
      [pageA, 'A'],
      [viewer, 'viewer'],
    ]) {
      const view = await waitView(page, label, 'a verdict after Stop', (v) =>
        ['stopped', 'failed'].includes(v.verdictState),
      );
      assert.match(view.verdict, /stop|kill|signal/i);
    }
    await waitFor(async () => !(await pageA.getByTestId('run-button').isDisabled()), {
      message: "A's Run button to be enabled again",
    });
  });

  test('the terminal is shared: what A types runs once and every page shows it', async () => {
    assert.equal(await viewer.getByTestId('terminal-open').isDisabled(), true, 'viewer');
    const errorsBefore = (await execView(pageA)).errors.length;
    await pageA.getByTestId('terminal-open').click();
    const opened = await waitView(
      pageA,
      'A',
      'a terminal to open (or a refusal)',
      (v) => v.termId !== null || v.errors.length > errorsBefore,
    );
    assert.deepEqual(opened.errors.slice(errorsBefore), [], 'the server refused the terminal');
    for (const [page, label] of [
      [pageB, 'B'],
      [viewer, 'viewer'],
    ]) {
      await waitView(page, label, 'the terminal to show', (v) => v.termId === opened.termId);
    }
    // Wait for the shell's prompt before typing.
    await waitView(pageA, 'A', 'a shell prompt', (v) => v.terminal.trim() !== '');
    await pageA.getByTestId('terminal').locator('.xterm').click();
    await pageA.keyboard.type('echo hello-$((6*7))');
    await pageA.keyboard.press('Enter');
    for (const [page, label] of [
      [pageA, 'A'],
      [pageB, 'B'],
      [viewer, 'viewer'],
    ]) {
      const view = await waitView(page, label, 'the line "hello-42" in the terminal', (v) =>
        lines(v.terminal).includes('hello-42'),
      );
      assert.match(view.terminal, /echo hello-\$\(\(6\*7\)\)/, 'the typed command is echoed');
    }
    // The DOM rows show it too (what people see, not only the buffer).
    await waitFor(
      async () =>
        (await pageB.getByTestId('terminal').locator('.xterm-rows').textContent()).includes(
          'hello-42',
        ),
      { message: "hello-42 in B's rendered terminal rows" },
    );
    await pageA.screenshot({ path: SCREENSHOT });
  });

  test("a viewer's keystrokes are ignored, and the server refuses them anyway", async () => {
    assert.equal(
      await viewer.getByTestId('terminal').getAttribute('data-readonly'),
      'true',
      "the viewer's terminal is read-only",
    );
    await viewer.getByTestId('terminal').locator('.xterm').click();
    await viewer.keyboard.type('echo viewer-$((2*3))');
    await viewer.keyboard.press('Enter');
    // Bypass the page: the server must refuse a viewer's input too.
    await viewer.evaluate(
      (term) => {
        window.collabApp.exec.channel.send({
          type: 'term_input',
          term,
          data: new TextEncoder().encode('echo sneaky-$((3*3))\r'),
        });
      },
      (await execView(viewer)).termId,
    );
    await waitView(viewer, 'viewer', 'an error from the server', (v) => v.error !== null, 10_000);
    // A later command from A arrives everywhere, so anything the viewer sent would have too.
    await pageA.getByTestId('terminal').locator('.xterm').click();
    await pageA.keyboard.type('echo after-$((1+1))');
    await pageA.keyboard.press('Enter');
    for (const [page, label] of [
      [pageA, 'A'],
      [viewer, 'viewer'],
    ]) {
      const view = await waitView(page, label, 'the line "after-2"', (v) =>
        lines(v.terminal).includes('after-2'),
      );
      assert.ok(!view.terminal.includes('viewer-'), `${label}: the viewer's typing never ran`);
      assert.ok(!view.terminal.includes('sneaky-'), `${label}: the viewer's input was refused`);
    }
  });

  test('a page that joins later replays the run and the terminal', async () => {
    await pageB.reload();
    const view = await waitView(
      pageB,
      'reloaded B',
      'the last run and the terminal replayed',
      (v) =>
        v.channel === 'connected' &&
        v.console.includes('sleeping') &&
        ['stopped', 'failed'].includes(v.verdictState) &&
        lines(v.terminal).includes('after-2'),
    );
    assert.ok(lines(view.terminal).includes('hello-42'), 'the scrollback holds hello-42');
    // The open terminal is shown, not replaced by a new one.
    assert.equal(view.termId, (await execView(pageA)).termId);
  });

  test('closing the terminal ends it on every page, and an editor can open a new one', async () => {
    const before = (await execView(pageA)).termId;
    await pageA.getByTestId('terminal-close').click();
    for (const [page, label] of [
      [pageA, 'A'],
      [pageB, 'B'],
      [viewer, 'viewer'],
    ]) {
      await waitFor(
        async () => (await page.getByTestId('terminal-info').textContent()).startsWith('ended'),
        { message: `${label}: the terminal to be shown as ended` },
      );
    }
    assert.equal(await pageB.getByTestId('terminal-open').textContent(), 'New terminal');
    assert.equal(await viewer.getByTestId('terminal-open').isDisabled(), true);
    await pageB.getByTestId('terminal-open').click();
    await waitView(
      pageA,
      'A',
      "B's new terminal, with a prompt",
      (v) => v.termId !== null && v.termId !== before && v.terminal.trim() !== '',
    );
  });

  test('no page errors', () => {
    assert.deepEqual(browser.problems, []);
  });
});
