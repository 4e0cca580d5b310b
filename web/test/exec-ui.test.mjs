// Browser test of the console and terminal panes against a scripted exec channel (Playwright's routeWebSocket): reconnects, replay, shared terminal size, roles, refusals.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { editorTokenFor, useBrowser, useServer, viewerTokenFor, waitFor } from './harness.mjs';

// The server runs no sandbox: every /exec socket of these pages is answered by the script below.
const server = useServer({ demo: true });
const browser = useBrowser();

const b64 = (text) => Buffer.from(text).toString('base64');

/**
 * Routes the page's exec sockets to `onConnect(socket, index)`; records what the page sends.
 * `socket.send(msg)` sends a server message, `socket.close()` drops the connection.
 */
async function scriptExec(page, onConnect) {
  const script = { sent: [], connections: 0 };
  await page.routeWebSocket(/\/exec\//, (ws) => {
    const index = script.connections++;
    ws.onMessage((text) => {
      const msg = JSON.parse(text);
      script.sent.push(msg);
      script.onMessage?.(msg, ws);
    });
    onConnect(
      {
        send: (msg) => ws.send(JSON.stringify(msg)),
        close: () => ws.close({ code: 1011, reason: 'scripted drop' }),
      },
      index,
    );
  });
  return script;
}

async function openPage(label, role = 'editor') {
  const token =
    role === 'editor'
      ? await editorTokenFor(server, 'demo', `${label}-user`, label)
      : await viewerTokenFor(server, 'demo', `${label}-user`, label);
  const page = await browser.newPage(label);
  return { page, url: `${server.httpUrl}/?project=demo&token=${encodeURIComponent(token)}` };
}

async function view(page) {
  return page.evaluate(() => {
    const exec = window.collabApp.exec;
    const byId = (id) => document.querySelector(`[data-testid="${id}"]`);
    return {
      channel: exec.channel.state,
      console: exec.console.text,
      verdict: byId('run-verdict').textContent,
      verdictState: byId('run-verdict').dataset.state,
      status: byId('exec-status').dataset.state,
      terminal: exec.terminal.text,
      termId: exec.terminal.termId,
      size: exec.terminal.size,
      info: byId('terminal-info').textContent,
      error: byId('exec-error').hidden ? null : byId('exec-error').textContent,
    };
  });
}

async function waitView(page, what, check) {
  let last = null;
  return waitFor(
    async () => {
      last = await view(page);
      return check(last) ? last : null;
    },
    { message: what, describe: () => JSON.stringify(last) },
  );
}

const hello = (fields) => ({ type: 'hello', role: 'editor', runs: [], terms: [], ...fields });

describe('console and terminal panes against a scripted exec channel', { timeout: 120_000 }, () => {
  test('a dropped channel reconnects and the new hello replaces the old state', async () => {
    const { page, url } = await openPage('reconnect');
    let first = null;
    const script = await scriptExec(page, (socket, index) => {
      if (index === 0) {
        first = socket;
        socket.send(
          hello({
            runs: [
              {
                run: 1,
                by: 'Bob',
                command: 'python3 main.py',
                history: [{ stream: 'stdout', data: b64('first\n') }],
                verdict: null,
              },
            ],
          }),
        );
      } else {
        socket.send(
          hello({
            runs: [
              {
                run: 1,
                by: 'Bob',
                command: 'python3 main.py',
                history: [
                  { stream: 'stdout', data: b64('first\n') },
                  { stream: 'stderr', data: b64('second\n') },
                ],
                verdict: { kind: 'exited', code: 0, signal: null, summary: 'exited with code 0' },
              },
            ],
          }),
        );
      }
    });
    await page.goto(url);
    await waitView(page, 'the first run, still going', (v) => v.verdictState === 'running');
    assert.equal((await view(page)).console, 'first\n');
    assert.equal(await page.getByTestId('stop-button').isVisible(), true);
    first.close();
    const after = await waitView(
      page,
      'the replayed run after the reconnect',
      (v) => v.channel === 'connected' && v.verdictState === 'ok',
    );
    assert.equal(after.console, 'first\nsecond\n', 'history replayed once, not appended');
    assert.equal(after.verdict, 'exited with code 0');
    assert.equal(script.connections, 2);
    assert.equal(
      await page.locator('[data-testid="console-output"] .out-stderr').textContent(),
      'second\n',
      'stderr is marked',
    );
  });

  test('an open terminal is shown (not reopened), follows the shared size, and ends', async () => {
    const { page, url } = await openPage('term');
    let exec = null;
    const script = await scriptExec(page, (socket) => {
      exec = socket;
      socket.send(
        hello({
          terms: [
            {
              term: 3,
              by: 'Bob',
              cols: 50,
              rows: 10,
              scrollback: b64('bob$ echo hi\r\nhi\r\nbob$ '),
              exit_code: null,
            },
          ],
        }),
      );
    });
    script.onMessage = (msg) => {
      if (msg.type === 'term_resize') {
        exec.send({ type: 'term_resized', term: msg.term, cols: msg.cols, rows: msg.rows });
      }
    };
    await page.goto(url);
    // xterm.js parses what it is given asynchronously: wait for the text, not just the id.
    const shown = await waitView(
      page,
      'the open terminal, replayed',
      (v) => v.termId === 3 && /bob\$ echo hi\nhi\nbob\$/.test(v.terminal),
    );
    assert.match(shown.info, /opened by Bob/);
    // Joining, an editor fits the shared pty to its pane.
    const resize = await waitFor(() => script.sent.find((m) => m.type === 'term_resize'), {
      message: 'a term_resize for the joined terminal',
    });
    assert.equal(resize.term, 3);
    assert.ok(resize.cols >= 20 && resize.rows >= 4, JSON.stringify(resize));
    await waitView(
      page,
      'the view at the size it asked for',
      (v) => v.size.cols === resize.cols && v.size.rows === resize.rows,
    );
    // Someone else resizes: this page renders at their size.
    exec.send({ type: 'term_resized', term: 3, cols: 40, rows: 8 });
    await waitView(page, 'the view at 40x8', (v) => v.size.cols === 40 && v.size.rows === 8);
    // This page's pane grows: the shared pty follows it (the last resize wins).
    const resizes = () => script.sent.filter((m) => m.type === 'term_resize');
    const sentBefore = resizes().length;
    await page.setViewportSize({ width: 1600, height: 760 });
    // Other resizes may come first (the pane re-fitting after the 40x8 view): wait for the
    // one that follows the wider window.
    await waitFor(
      () =>
        resizes()
          .slice(sentBefore)
          .find((m) => m.cols > resize.cols),
      {
        message: `a term_resize wider than ${resize.cols} columns after the window grew`,
      },
    );
    await waitView(
      page,
      'the view at the size it asked for last',
      (v) => v.size.cols === resizes().at(-1).cols && v.size.cols > resize.cols,
    );

    await page.getByTestId('terminal').locator('.xterm').click();
    await page.keyboard.type('ls');
    await waitFor(
      () =>
        script.sent
          .filter((m) => m.type === 'term_input' && m.term === 3)
          .map((m) => Buffer.from(m.data, 'base64').toString())
          .join('') === 'ls',
      { message: 'the keystrokes "ls" sent as term_input' },
    );
    exec.send({ type: 'term_output', term: 3, data: b64('ls') });
    exec.send({ type: 'term_exited', term: 3, exit_code: 0 });
    await waitView(
      page,
      'the ended terminal, with a note',
      (v) => /ended/.test(v.info) && /\[shell exited with code 0\]/.test(v.terminal),
    );
    assert.equal(await page.getByTestId('terminal-open').textContent(), 'New terminal');
    assert.ok(!script.sent.some((m) => m.type === 'term_open'), 'no terminal was opened');
  });

  test('a viewer sees the panes but cannot run, type or open a terminal', async () => {
    const { page, url } = await openPage('viewer', 'viewer');
    const script = await scriptExec(page, (socket) => {
      socket.send(
        hello({
          role: 'viewer',
          runs: [
            {
              run: 2,
              by: 'Bob',
              command: 'python3 main.py',
              history: [{ stream: 'stdout', data: b64('name? ') }],
              verdict: null,
            },
          ],
          terms: [
            { term: 1, by: 'Bob', cols: 60, rows: 12, scrollback: b64('$ '), exit_code: null },
          ],
        }),
      );
    });
    await page.goto(url);
    await waitView(page, 'the run and the terminal', (v) => v.termId === 1 && v.console !== '');
    for (const id of ['run-button', 'stop-button', 'stdin-input', 'stdin-eof', 'terminal-close']) {
      assert.equal(await page.getByTestId(id).isDisabled(), true, `${id} is disabled`);
    }
    assert.equal(await page.getByTestId('terminal').getAttribute('data-readonly'), 'true');
    await page.getByTestId('terminal').locator('.xterm').click();
    await page.keyboard.type('rm -rf /\n');
    await page.getByTestId('run-button').click({ force: true });
    // A marker sent past the UI: messages on a socket keep their order, so anything the page
    // had sent for the clicks and keys above would arrive before it.
    await page.evaluate(() => window.collabApp.exec.channel.send({ type: 'stdin_eof', run: 2 }));
    await waitFor(() => script.sent.length > 0, { message: 'the marker to arrive' });
    assert.deepEqual(script.sent, [{ type: 'stdin_eof', run: 2 }], 'the page sent nothing else');
  });

  test("the server's refusals are shown, and a refused Run can be retried", async () => {
    const { page, url } = await openPage('refused');
    const script = await scriptExec(page, (socket) => {
      socket.send(hello({}));
    });
    script.onMessage = (msg, ws) => {
      if (msg.type === 'run') {
        ws.send(JSON.stringify({ type: 'error', message: 'a run of this project is going' }));
      }
    };
    await page.goto(url);
    await waitFor(async () => !(await page.getByTestId('run-button').isDisabled()), {
      message: 'Run to be enabled',
    });
    await page.getByTestId('run-button').click();
    const refused = await waitView(page, 'the refusal', (v) => v.error !== null);
    assert.equal(refused.error, 'a run of this project is going');
    await waitFor(async () => !(await page.getByTestId('run-button').isDisabled()), {
      message: 'Run to be enabled again after the refusal',
    });
  });

  test('no page errors', () => {
    assert.deepEqual(browser.problems, []);
  });
});
