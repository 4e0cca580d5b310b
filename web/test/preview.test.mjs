// End-to-end test of previews in Chromium: a Python site started in the project's sandbox, opened from its own origin, with CSS, JS, an image, a fetch and a WebSocket working, and the IDE origin's cookies untouched.
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { gzipSync } from 'node:zlib';
import { describe, test } from 'node:test';
import WebSocket from 'ws';
import { editorTokenFor, useBrowser, useServer, waitFor } from './harness.mjs';

/** A port that was free a moment ago: the preview URL names it before the server binds it. */
async function freePort() {
  const probe = createServer();
  await new Promise((resolve) => probe.listen(0, '127.0.0.1', resolve));
  const { port } = probe.address();
  await new Promise((resolve) => probe.close(resolve));
  return port;
}

// Each project gets a host (so an origin) of its own under localhost, as `cargo xtask run` does.
const PREVIEW_PORT = await freePort();
const server = useServer({
  sandbox: 'local',
  args: [
    '--preview-listen',
    `127.0.0.1:${PREVIEW_PORT}`,
    '--preview-url',
    `http://{project}.localhost:${PREVIEW_PORT}`,
  ],
});
const browser = useBrowser({ ignoreConsole: [/favicon/] });

const PROJECT = 'ptest';

/**
 * The program: static files from its folder, `api/hello` (what it was sent, as JSON), a
 * WebSocket echo at `ws`, and a cookie for `/` on every answer.
 */
const SITE = `
import base64, hashlib, http.server, json

class Handler(http.server.SimpleHTTPRequestHandler):
    def end_headers(self):
        self.send_header('Set-Cookie', 'x=1; Path=/')
        super().end_headers()

    def do_GET(self):
        path = self.path.split('?')[0]
        if path == '/api/hello':
            seen = {name: self.headers.get(name) for name in ('Cookie', 'Referer', 'Authorization')}
            body = json.dumps({'hello': 'from the program', 'path': self.path, 'seen': seen}).encode()
            self.send_response(200)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == '/ws':
            self.websocket()
        else:
            super().do_GET()

    def websocket(self):
        key = self.headers['Sec-WebSocket-Key'].encode()
        accept = base64.b64encode(hashlib.sha1(key + b'258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest())
        self.wfile.write(b'HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n'
                         b'Sec-WebSocket-Accept: ' + accept + b'\\r\\n\\r\\n')
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2 or head[0] & 15 == 8:
                return
            mask = self.rfile.read(4)
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(head[1] & 127)))
            reply = b'echo:' + data
            self.wfile.write(bytes([0x81, len(reply)]) + reply)
            self.wfile.flush()

server = http.server.ThreadingHTTPServer(('', 8000), Handler)
print('site ready', flush=True)
server.serve_forever()
`;

const FILES = {
  'site.py': SITE,
  'index.html':
    '<!doctype html><html><head><meta charset="utf-8"><title>site</title>' +
    '<link rel="stylesheet" href="style.css"><script src="app.js" defer></script></head>' +
    '<body><div id="box">box</div><img id="dot" src="img/dot.svg" alt="dot"></body></html>\n',
  'style.css': '#box { width: 123px; }\n',
  'img/dot.svg':
    '<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect width="4" height="4" fill="red"/></svg>\n',
  'app.js': [
    'window.results = { js: true };',
    "fetch('api/hello').then((r) => r.json()).then((j) => { window.results.fetch = j; });",
    "const url = new URL('ws', location.href);",
    "url.protocol = 'ws:';",
    'const socket = new WebSocket(url);',
    "socket.onopen = () => socket.send('ping');",
    'socket.onmessage = (event) => { window.results.ws = event.data; };',
    'socket.onerror = () => { window.results.wsError = true; };',
    "document.cookie = 'fromjs=1; path=/';",
    '',
  ].join('\n'),
};

/** A `.tar.gz` of `files` (path → text), for the import API. */
function tarGz(files) {
  const blocks = [];
  for (const [name, text] of Object.entries(files)) {
    const body = Buffer.from(text, 'utf8');
    const header = Buffer.alloc(512);
    const field = (offset, length, value) => header.write(value, offset, length, 'ascii');
    field(0, 100, name);
    field(100, 8, '0000644\0');
    field(108, 8, '0000000\0');
    field(116, 8, '0000000\0');
    field(124, 12, `${body.length.toString(8).padStart(11, '0')}\0`);
    field(
      136,
      12,
      `${Math.floor(Date.now() / 1000)
        .toString(8)
        .padStart(11, '0')}\0`,
    );
    field(148, 8, '        ');
    field(156, 1, '0');
    field(257, 6, 'ustar\0');
    field(263, 2, '00');
    const sum = header.reduce((total, byte) => total + byte, 0);
    field(148, 8, `${sum.toString(8).padStart(6, '0')}\0 `);
    blocks.push(header, body, Buffer.alloc((512 - (body.length % 512)) % 512));
  }
  blocks.push(Buffer.alloc(1024));
  return gzipSync(Buffer.concat(blocks));
}

/** Opens a terminal over `/exec` and starts the site once its files are in the workspace. */
async function startSite(token) {
  const socket = new WebSocket(
    `ws://127.0.0.1:${server.port}/exec/${PROJECT}?token=${encodeURIComponent(token)}`,
  );
  let output = '';
  let term = null;
  socket.on('message', (data) => {
    const msg = JSON.parse(data.toString());
    if (msg.type === 'term_opened') {
      term = msg.term;
    } else if (msg.type === 'term_output') {
      output += Buffer.from(msg.data, 'base64').toString('utf8');
    }
  });
  await new Promise((resolve, reject) => {
    socket.once('open', resolve);
    socket.once('error', reject);
  });
  socket.send(JSON.stringify({ type: 'term_open', cols: 120, rows: 24 }));
  await waitFor(() => term !== null, { message: 'the terminal to open' });
  const files = Object.keys(FILES)
    .map((f) => `[ -f ${f} ]`)
    .join(' && ');
  // The bridge mirrors the imported files into the workspace; the shell waits for all of them.
  const command = `until ${files}; do sleep 0.1; done; python3 site.py\n`;
  socket.send(
    JSON.stringify({ type: 'term_input', term, data: Buffer.from(command).toString('base64') }),
  );
  await waitFor(() => output.includes('site ready'), {
    timeout: 30_000,
    message: 'the site to start in the sandbox',
    describe: () => output,
  });
  return socket;
}

describe('previews from their own origin in Chromium', { timeout: 120_000 }, () => {
  test("a preview's relative links work, and the IDE origin's cookies stay as they were", async () => {
    const token = await editorTokenFor(server, PROJECT, 'ada', 'Ada');
    const imported = await fetch(`${server.httpUrl}/api/projects/${PROJECT}/import`, {
      method: 'POST',
      headers: { authorization: `Bearer ${token}` },
      body: tarGz(FILES),
    });
    assert.equal(imported.status, 200, await imported.text());
    const config = await (await fetch(`${server.httpUrl}/api/config`)).json();
    assert.equal(config.preview_url, `http://{project}.localhost:${PREVIEW_PORT}`);
    const origin = `http://${PROJECT}.localhost:${PREVIEW_PORT}`;
    const site = await startSite(token);
    try {
      const ide = await browser.newPage('ide');
      await ide.goto(`${server.httpUrl}/?project=${PROJECT}&token=${encodeURIComponent(token)}`);
      await ide.evaluate(() => {
        document.cookie = 'ide=keep; path=/';
      });
      const context = ide.context();
      const before = await context.cookies(server.httpUrl);
      assert.deepEqual(
        before.map((c) => `${c.name}=${c.value}`),
        ['ide=keep'],
      );

      // The IDE's Preview link opens the preview origin in a new tab.
      await ide.getByTestId('preview').waitFor({ state: 'visible' });
      const link = `${origin}/preview/${PROJECT}/8000/?token=${encodeURIComponent(token)}`;
      assert.equal(await ide.getByTestId('preview-open').getAttribute('href'), link);
      const opened = context.waitForEvent('page');
      await ide.getByTestId('preview-open').click();
      const preview = await opened;
      preview.setDefaultTimeout(15_000);
      preview.on('pageerror', (error) => browser.problems.push(`preview: ${error.message}`));
      await preview.waitForLoadState('load');
      assert.equal(preview.url(), `${origin}/preview/${PROJECT}/8000/`, 'no token left');
      const results = await waitFor(
        () =>
          preview.evaluate(() =>
            window.results?.fetch && window.results?.ws ? window.results : null,
          ),
        { message: 'the fetch and the WebSocket echo in the preview' },
      );
      assert.equal(results.js, true, 'app.js ran');
      assert.equal(results.ws, 'echo:ping');
      assert.equal(results.fetch.hello, 'from the program');
      const seen = results.fetch.seen;
      assert.equal(seen.Referer, null, 'no Referer reaches the program');
      assert.equal(seen.Authorization, null);
      assert.ok(seen.Cookie.includes('x=1'), `the program's own cookie comes back: ${seen.Cookie}`);
      assert.ok(!seen.Cookie.includes('collab_preview'), seen.Cookie);
      assert.ok(!JSON.stringify(results.fetch).includes(token.slice(0, 20)), 'no token');
      const page = await preview.evaluate(() => ({
        width: getComputedStyle(document.getElementById('box')).width,
        dot: document.getElementById('dot').naturalWidth,
        cookie: document.cookie,
      }));
      assert.equal(page.width, '123px', 'style.css applied');
      assert.equal(page.dot, 4, 'the image loaded');
      assert.ok(
        !page.cookie.includes('collab_preview'),
        `the login cookie is HttpOnly: ${page.cookie}`,
      );

      const login = (await context.cookies(`${origin}/preview/${PROJECT}/8000/`)).find(
        (c) => c.name === 'collab_preview',
      );
      assert.ok(login, 'the preview cookie is set on the preview origin');
      assert.deepEqual(
        [login.path, login.httpOnly, login.sameSite],
        [`/preview/${PROJECT}/`, true, 'Lax'],
      );
      const after = await context.cookies(server.httpUrl);
      assert.deepEqual(
        after.map((c) => `${c.name}=${c.value};${c.path}`),
        ['ide=keep;/'],
        "the program's cookies did not land on the IDE origin",
      );
      assert.deepEqual(browser.problems, []);
    } finally {
      site.close();
    }
  });
});
