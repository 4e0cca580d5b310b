// Test harness: starts the `collab` server binary on a free port with a fresh data dir, mints tokens, builds clients, polls with deadlines, and cleans up.
import { execFile, spawn } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { after, before, beforeEach } from 'node:test';
import * as decoding from 'lib0/decoding';
import WebSocket from 'ws';
import * as Y from 'yjs';
import { WebsocketProvider } from 'y-websocket';
import { HocuspocusProvider, HocuspocusProviderWebsocket } from '@hocuspocus/provider';

const execFileP = promisify(execFile);

export const WEB_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const DIST_DIR = path.join(WEB_DIR, 'dist');

/** Every child process started by the harness, killed on exit even if a test forgot to. */
const children = new Set();
process.on('exit', () => {
  for (const child of children) {
    child.kill('SIGKILL');
  }
});

/** The server binary: `$COLLAB_BIN`, else `../target/debug/collab`. A missing binary is an error. */
export function collabBin() {
  const bin = process.env.COLLAB_BIN ?? path.resolve(WEB_DIR, '..', 'target', 'debug', 'collab');
  if (!existsSync(bin)) {
    throw new Error(
      `collab server binary not found at ${bin}: build it with \`cargo build -p collab-server\` ` +
        'or point COLLAB_BIN at it',
    );
  }
  return bin;
}

/** Fails unless web/dist holds a build at least as new as every file in src/ and index.html. */
export function assertFreshDist() {
  const index = path.join(DIST_DIR, 'index.html');
  if (!existsSync(index)) {
    throw new Error(`${index} is missing: run \`npm run build\` in web/ before the browser tests`);
  }
  const built = statSync(index).mtimeMs;
  const sources = [
    path.join(WEB_DIR, 'index.html'),
    ...readdirSync(path.join(WEB_DIR, 'src')).map((f) => path.join(WEB_DIR, 'src', f)),
  ];
  const stale = sources.filter((f) => statSync(f).mtimeMs > built);
  if (stale.length > 0) {
    throw new Error(
      `web/dist is older than ${stale.map((f) => path.relative(WEB_DIR, f)).join(', ')}: run \`npm run build\``,
    );
  }
}

/**
 * Polls `fn` until it returns a truthy value (returned) or the deadline passes (throws with
 * `message`, plus `describe()`'s account of the last state when given).
 */
export async function waitFor(fn, { timeout = 10_000, interval = 20, message, describe } = {}) {
  const deadline = Date.now() + timeout;
  let lastError;
  for (;;) {
    try {
      const value = await fn();
      if (value) {
        return value;
      }
    } catch (error) {
      lastError = error;
    }
    if (Date.now() > deadline) {
      const state = describe ? `; last state: ${describe()}` : '';
      const cause = lastError ? `; last error: ${lastError.message ?? lastError}` : '';
      throw new Error(
        `timed out after ${timeout} ms waiting for ${message ?? fn.toString()}${state}${cause}`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, interval));
  }
}

export const CHROMIUM = process.env.CHROMIUM_BIN ?? '/usr/bin/chromium';

/**
 * Launches one headless Chromium (`$CHROMIUM_BIN` or /usr/bin/chromium, never a download) for the
 * calling test file, after checking that web/dist is fresh, and closes it after the file. A
 * missing build or browser fails every test of the file with the reason. `newPage(label)` opens a
 * page in its own context (own storage, no BroadcastChannel with the others) and records its
 * uncaught errors and console errors, except those matching `ignoreConsole`, in `problems`.
 */
export function useBrowser({ ignoreConsole = [] } = {}) {
  const cleanup = new Cleanup();
  const ctx = {
    browser: null,
    /** Uncaught page errors and console errors, by page label; check them at the end. */
    problems: [],
    async newPage(label, { ignoreConsole: ignoreMore = [], viewport } = {}) {
      const context = await ctx.browser.newContext({
        viewport: viewport ?? { width: 1280, height: 760 },
      });
      cleanup.add(() => context.close());
      const page = await context.newPage();
      page.setDefaultTimeout(15_000);
      const ignored = [...ignoreConsole, ...ignoreMore];
      page.on('pageerror', (error) => ctx.problems.push(`${label}: page error: ${error.message}`));
      page.on('console', (message) => {
        const text = message.text();
        if (message.type() === 'error' && !ignored.some((re) => re.test(text))) {
          ctx.problems.push(`${label}: console error: ${text}`);
        }
      });
      return page;
    },
  };
  let setupError = null;
  before(async () => {
    try {
      assertFreshDist();
      if (!existsSync(CHROMIUM)) {
        throw new Error(
          `Chromium not found at ${CHROMIUM}: apt-get install -y chromium (or set CHROMIUM_BIN)`,
        );
      }
      const { chromium } = await import('playwright-core');
      ctx.browser = await chromium.launch({
        executablePath: CHROMIUM,
        headless: true,
        chromiumSandbox: false,
        // launch() runs Chromium with a fresh temporary user-data-dir of its own.
        args: [
          '--no-sandbox',
          '--disable-gpu',
          '--disable-background-networking',
          '--disable-component-update',
          '--no-first-run',
          '--disable-quic',
          '--disable-sync',
        ],
      });
      cleanup.add(() => ctx.browser.close());
    } catch (error) {
      setupError = error;
    }
  });
  beforeEach(() => {
    if (setupError !== null) {
      throw setupError;
    }
  });
  after(async () => {
    await cleanup.run();
  });
  return ctx;
}

/** Runs registered clean-up steps in reverse order; every step runs even if one fails. */
export class Cleanup {
  #steps = [];

  add(step) {
    this.#steps.push(step);
    return step;
  }

  async run() {
    const errors = [];
    while (this.#steps.length > 0) {
      const step = this.#steps.pop();
      try {
        await step();
      } catch (error) {
        errors.push(error);
      }
    }
    if (errors.length > 0) {
      throw new AggregateError(
        errors,
        `clean-up failed: ${errors.map((e) => e.message).join('; ')}`,
      );
    }
  }
}

/**
 * Starts one server for the calling test file and stops it after the file. Returns an object that
 * is filled with startServer()'s result once it runs. A server that cannot start (say, the binary
 * is missing) fails every test of the file with the reason, rather than cancelling them.
 */
export function useServer(opts = {}) {
  const server = {};
  let startError = null;
  before(async () => {
    try {
      Object.assign(server, await startServer(opts));
    } catch (error) {
      startError = error;
    }
  });
  beforeEach(() => {
    if (startError !== null) {
      throw startError;
    }
  });
  after(async () => {
    await server.stop?.();
  });
  return server;
}

/**
 * Starts `collab serve` on 127.0.0.1 with an OS-chosen port and a fresh data dir (and, with
 * `sandbox`, `--sandbox SANDBOX` for the exec channel's runs and terminals; `args`, more
 * flags such as `--database-url` or `--preview-listen 127.0.0.1:0`; `dataDir` and `listenPort`
 * to start again where a killed server was).
 * Resolves once the server printed `listening on http://127.0.0.1:PORT`.
 */
export async function startServer({
  demo = false,
  sandbox,
  webDir = DIST_DIR,
  timeout = 60_000,
  args: extraArgs = [],
  dataDir = mkdtempSync(path.join(tmpdir(), 'collab-web-test-')),
  listenPort = 0,
} = {}) {
  const bin = collabBin();
  const args = [
    'serve',
    '--listen',
    `127.0.0.1:${listenPort}`,
    '--data-dir',
    dataDir,
    '--web-dir',
    webDir,
  ];
  if (demo) {
    args.push('--demo');
  }
  args.push(...extraArgs);
  if (sandbox !== undefined) {
    // `local` (bubblewrap) turns the exec channel on; without it /exec answers 503.
    args.push('--sandbox', sandbox);
    // Run as root, the local sandbox drops to an unprivileged uid, which must be able to reach
    // the workspaces inside the data dir (mkdtemp makes it 0700).
    chmodSync(dataDir, 0o755);
  }
  const child = spawn(bin, args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'info' },
  });
  children.add(child);
  let stdout = '';
  let stderr = '';
  let exited = null;
  child.stdout.setEncoding('utf8').on('data', (chunk) => (stdout += chunk));
  child.stderr.setEncoding('utf8').on('data', (chunk) => (stderr += chunk));
  const exitPromise = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      exited = { code, signal };
      children.delete(child);
      resolve(exited);
    });
  });
  child.on('error', (error) => {
    exited = { error };
  });
  const log = () => `--- stdout ---\n${stdout}\n--- stderr ---\n${stderr}`;

  let stopped = false;
  const stop = async () => {
    if (stopped) {
      return;
    }
    stopped = true;
    if (exited === null) {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
      await exitPromise;
      clearTimeout(timer);
    }
    rmSync(dataDir, { recursive: true, force: true });
  };

  let port;
  try {
    port = await waitFor(
      () => {
        if (exited !== null) {
          throw new Error(`collab serve exited early (${JSON.stringify(exited)})`);
        }
        const match = /listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(stdout);
        return match ? Number(match[1]) : null;
      },
      {
        timeout,
        interval: 25,
        message: `"listening on http://127.0.0.1:PORT" from \`${bin} ${args.join(' ')}\``,
        describe: log,
      },
    );
  } catch (error) {
    await stop();
    throw error;
  }

  return {
    bin,
    dataDir,
    port,
    httpUrl: `http://127.0.0.1:${port}`,
    wsUrl: `ws://127.0.0.1:${port}/sync`,
    stdout: () => stdout,
    log,
    exited: () => exited,
    stop,
    /** SIGKILL, as a crash: nothing is flushed, and the data dir stays for a restart. */
    kill: async () => {
      stopped = true;
      if (exited === null) {
        child.kill('SIGKILL');
        await exitPromise;
      }
    },
    /** Mints a token with `collab token` against this server's data dir. */
    token: (opts) => mintToken(bin, dataDir, opts),
  };
}

/** `collab token --data-dir DIR --project P --role R --user ID --name NAME`; the JWT alone on stdout. */
export async function mintToken(bin, dataDir, { project, role = 'editor', user, name, ttl }) {
  const args = ['token', '--data-dir', dataDir, '--project', project, '--role', role];
  args.push('--user', user ?? `${role}-${Math.random().toString(36).slice(2, 8)}`);
  args.push('--name', name ?? user ?? role);
  if (ttl !== undefined) {
    args.push('--ttl', String(ttl));
  }
  let out;
  try {
    out = await execFileP(bin, args, { timeout: 30_000 });
  } catch (error) {
    throw new Error(
      `\`collab ${args.join(' ')}\` failed: ${error.message}\n${error.stderr ?? ''}`,
      {
        cause: error,
      },
    );
  }
  const token = out.stdout.trim();
  if (!/^[\w-]+\.[\w-]+\.[\w-]+$/.test(token)) {
    throw new Error(`\`collab ${args.join(' ')}\` printed no JWT: ${JSON.stringify(out.stdout)}`);
  }
  return token;
}

/**
 * A properly signed token that has expired: minted with `--ttl 0` (exp = now), then waited on
 * until the clock is past exp (the server allows no leeway).
 */
/** An editor's token for `project`, minted by the server under test. */
export function editorTokenFor(server, project, user, name) {
  return server.token({ project, role: 'editor', user, name });
}

/** A viewer's token for `project`, minted by the server under test. */
export function viewerTokenFor(server, project, user, name) {
  return server.token({ project, role: 'viewer', user, name });
}

/** Registers `fn` with `cleanup` and returns it made idempotent, for explicit early calls too. */
function once(cleanup, fn) {
  let done = false;
  const wrapped = () => {
    if (!done) {
      done = true;
      fn();
    }
  };
  cleanup.add(wrapped);
  return wrapped;
}

export async function expiredToken(server, opts) {
  const token = await server.token({ ...opts, ttl: 0 });
  const { exp } = jwtClaims(token);
  await waitFor(() => Date.now() / 1000 > exp + 1, {
    timeout: 5_000,
    message: `the clock to pass the token's exp ${exp}`,
  });
  return token;
}

/** Decodes a JWT's payload (no verification). */
export function jwtClaims(token) {
  return JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString('utf8'));
}

/** Re-signs nothing: returns `token` with its payload replaced, so its signature no longer matches. */
export function tamperToken(token, changes) {
  const [header, , signature] = token.split('.');
  const payload = Buffer.from(JSON.stringify({ ...jwtClaims(token), ...changes })).toString(
    'base64url',
  );
  return `${header}.${payload}.${signature}`;
}

/** A `ws` WebSocket class that records every binary frame it receives into `sink`, and counts instances. */
export function recordingWebSocket(sink = [], counter = { opened: 0 }) {
  return class RecordingWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      counter.opened += 1;
      this.addEventListener('message', (event) => {
        if (typeof event.data !== 'string') {
          sink.push(new Uint8Array(event.data));
        }
      });
    }
  };
}

/**
 * Reads a y-websocket auth message (type 2, then varUint 0 = permission denied, then varString
 * reason); returns the reason, or null for any other message.
 */
export function yPermissionDenied(frame) {
  const decoder = decoding.createDecoder(frame);
  if (decoding.readVarUint(decoder) !== 2) {
    return null;
  }
  if (decoding.readVarUint(decoder) !== 0) {
    return null;
  }
  return decoding.readVarString(decoder);
}

/**
 * Opens a y-websocket client (Node, `ws`) on `docName`. BroadcastChannel is disabled, so two
 * clients in this process can only meet through the server.
 */
export function yClient(server, docName, token, cleanup, { user } = {}) {
  const doc = new Y.Doc();
  const frames = [];
  const statuses = [];
  const closes = [];
  const provider = new WebsocketProvider(server.wsUrl, docName, doc, {
    params: { token },
    WebSocketPolyfill: recordingWebSocket(frames),
    disableBc: true,
    maxBackoffTime: 500,
  });
  provider.on('status', ({ status }) => statuses.push(status));
  provider.on('connection-close', (event) => closes.push(event?.code ?? null));
  if (user !== undefined) {
    provider.awareness.setLocalStateField('user', user);
  }
  const destroy = once(cleanup, () => {
    provider.destroy();
    doc.destroy();
  });
  return {
    doc,
    provider,
    text: doc.getText('content'),
    frames,
    statuses,
    closes,
    destroy,
    permissionDenials: () => frames.map(yPermissionDenied).filter((r) => r !== null),
  };
}

/** Waits until a y-websocket client is connected and has received the server's state. */
export async function waitSynced(client, what = 'client') {
  await waitFor(() => client.provider.wsconnected && client.provider.synced, {
    timeout: 15_000,
    message: `${what} to connect and sync`,
    describe: () =>
      `statuses=${JSON.stringify(client.statuses)} closes=${JSON.stringify(client.closes)}`,
  });
}

/** Reads a Hocuspocus SyncStatus frame (varString doc, varUint 8, varInt applied): returns {doc, applied} or null. */
export function hpSyncStatus(frame) {
  try {
    const decoder = decoding.createDecoder(frame);
    const doc = decoding.readVarString(decoder);
    if (decoding.readVarUint(decoder) !== 8) {
      return null;
    }
    return { doc, applied: decoding.readVarInt(decoder) === 1 };
  } catch {
    return null;
  }
}

/**
 * Opens a @hocuspocus/provider client on `name` against `/sync`. With `websocketProvider` the
 * client shares that socket (multiplexing) and is attached explicitly.
 */
export function hpClient(server, name, token, cleanup, { websocketProvider, user } = {}) {
  const doc = new Y.Doc();
  const frames = [];
  const events = { authenticated: [], authenticationFailed: [], synced: 0, status: [] };
  const config = {
    name,
    token,
    document: doc,
    onAuthenticated: ({ scope }) => events.authenticated.push(scope),
    onAuthenticationFailed: ({ reason }) => events.authenticationFailed.push(reason),
    onSynced: () => (events.synced += 1),
    onStatus: ({ status }) => events.status.push(status),
  };
  if (websocketProvider) {
    config.websocketProvider = websocketProvider;
  } else {
    config.url = server.wsUrl;
    config.WebSocketPolyfill = WebSocket;
  }
  const provider = new HocuspocusProvider(config);
  // Frames routed to this document (on a shared socket, the others' frames go elsewhere).
  provider.on('message', ({ event }) => {
    frames.push(new Uint8Array(event.data));
  });
  if (websocketProvider) {
    provider.attach();
  }
  if (user !== undefined) {
    provider.setAwarenessField('user', user);
  }
  const destroy = once(cleanup, () => {
    provider.destroy();
    doc.destroy();
  });
  return {
    doc,
    provider,
    text: doc.getText('content'),
    frames,
    events,
    destroy,
    syncStatuses: () => frames.map(hpSyncStatus).filter((s) => s !== null),
  };
}

/** A shared Hocuspocus socket for multiplexing tests; `counter.opened` counts the sockets it opened. */
export function hpSocket(server, cleanup) {
  const counter = { opened: 0 };
  const socket = new HocuspocusProviderWebsocket({
    url: server.wsUrl,
    WebSocketPolyfill: recordingWebSocket([], counter),
  });
  cleanup.add(() => socket.destroy());
  return { socket, counter };
}

/** Waits until a Hocuspocus client is authenticated and synced. */
export async function waitHpSynced(client, what = 'client') {
  await waitFor(() => client.provider.isAuthenticated && client.provider.isSynced, {
    timeout: 15_000,
    message: `${what} to authenticate and sync`,
    describe: () => JSON.stringify(client.events),
  });
}
