// Wires the exec channel to the run console and the shared terminal below the editor: connection status, refusals from the server, and the resizable split.
import type { Claims } from './token';
import { RunConsole } from './console';
import { ExecChannel, type ClientMsg, type ExecState, type ServerMsg } from './exec';
import { SharedTerminal } from './terminal';
import { mountPreviewLink } from './preview';

/** How long a refusal from the server (say, "a run is already going") stays on screen. */
const ERROR_SHOWN_MS = 8_000;

function byTestId<T extends HTMLElement>(id: string, type: new () => T): T {
  const element = document.querySelector(`[data-testid="${id}"]`);
  if (!(element instanceof type)) {
    throw new Error(`page is missing a ${type.name} [data-testid="${id}"]`);
  }
  return element;
}

export interface ExecPanel {
  readonly console: RunConsole;
  readonly terminal: SharedTerminal;
  readonly channel: ExecChannel;
  /** The server's latest refusals, oldest first (a hook for the browser tests). */
  readonly errors: readonly string[];
}

/** How many refusals `ExecPanel.errors` keeps. */
const ERRORS_KEPT = 20;

/** Connects to `/exec/{project}` and drives the console and terminal panes. */
export function mountExecPanel(project: string, token: string, claims: Claims): ExecPanel {
  const status = byTestId('exec-status', HTMLElement);
  const errorBox = byTestId('exec-error', HTMLElement);
  let errorTimer: number | null = null;
  const errors: string[] = [];

  const showError = (message: string | null): void => {
    if (errorTimer !== null) {
      window.clearTimeout(errorTimer);
      errorTimer = null;
    }
    errorBox.hidden = message === null;
    errorBox.textContent = message ?? '';
    if (message !== null) {
      errorTimer = window.setTimeout(() => {
        showError(null);
      }, ERROR_SHOWN_MS);
    }
  };

  const setStatus = (state: ExecState, failures: number): void => {
    status.dataset.state = state;
    if (state === 'connected') {
      status.textContent = claims.role === 'viewer' ? 'watching' : '';
      status.title = 'Connected to the project runner';
    } else if (state === 'connecting') {
      status.textContent = 'connecting to the runner…';
      status.title = '';
    } else if (!everConnected && failures >= 2) {
      // The browser does not say why (503: no sandbox on this server; 401: bad token).
      status.dataset.state = 'unavailable';
      status.textContent = 'runner unavailable, retrying…';
      status.title =
        'Running programs and the terminal are not available: the server may not have a ' +
        'sandbox enabled, or it refused this link.';
    } else {
      status.textContent = 'runner disconnected, reconnecting…';
      status.title = 'Runs and the terminal come back when the connection does';
    }
  };
  let everConnected = false;
  setStatus('connecting', 0);

  // The views send through the channel, which exists only after them: bind late.
  let channel: ExecChannel | null = null;
  const send = (msg: ClientMsg): boolean => channel?.send(msg) ?? false;

  const runConsole = new RunConsole({
    elements: {
      runButton: byTestId('run-button', HTMLButtonElement),
      stopButton: byTestId('stop-button', HTMLButtonElement),
      runInfo: byTestId('run-info', HTMLElement),
      output: byTestId('console-output', HTMLElement),
      verdict: byTestId('run-verdict', HTMLElement),
      stdinForm: byTestId('stdin-form', HTMLFormElement),
      stdinInput: byTestId('stdin-input', HTMLInputElement),
      stdinSend: byTestId('stdin-send', HTMLButtonElement),
      stdinEof: byTestId('stdin-eof', HTMLButtonElement),
    },
    send,
  });
  const terminal = new SharedTerminal({
    elements: {
      host: byTestId('terminal', HTMLElement),
      info: byTestId('terminal-info', HTMLElement),
      openButton: byTestId('terminal-open', HTMLButtonElement),
      closeButton: byTestId('terminal-close', HTMLButtonElement),
      placeholder: byTestId('terminal-placeholder', HTMLElement),
    },
    send,
  });

  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const url = `${scheme}://${location.host}/exec/${encodeURIComponent(project)}?token=${encodeURIComponent(token)}`;
  channel = new ExecChannel({
    url,
    onState(state, failures) {
      everConnected ||= state === 'connected';
      setStatus(state, failures);
      runConsole.setConnected(state === 'connected');
      terminal.setConnected(state === 'connected');
    },
    onMessage(msg: ServerMsg) {
      if (msg.type === 'error') {
        console.warn(`exec channel: the server refused a request: ${msg.message}`);
        errors.push(msg.message);
        errors.splice(0, errors.length - ERRORS_KEPT);
        showError(msg.message);
      } else if (msg.type === 'hello') {
        showError(null);
      }
      runConsole.handle(msg);
      terminal.handle(msg);
    },
  });

  mountSplitter(byTestId('panel-splitter', HTMLElement), byTestId('exec-panel', HTMLElement));
  const preview = {
    box: byTestId('preview', HTMLElement),
    port: byTestId('preview-port', HTMLInputElement),
    open: byTestId('preview-open', HTMLAnchorElement),
  };
  mountPreviewLink(preview, project, token).catch((error: unknown) => {
    console.warn('cannot tell where previews are served', error);
  });
  return { console: runConsole, terminal, channel, errors };
}

const MIN_PANEL_PX = 120;
const PANEL_HEIGHT_KEY = 'collab.execPanelHeight';

/** Lets the user drag (or arrow-key) the border between the editor and the panel below it. */
function mountSplitter(splitter: HTMLElement, panel: HTMLElement): void {
  const maxHeight = (): number => Math.max(MIN_PANEL_PX, window.innerHeight - 200);
  const setHeight = (px: number): void => {
    const height = Math.round(Math.min(maxHeight(), Math.max(MIN_PANEL_PX, px)));
    panel.style.height = `${height}px`;
    splitter.setAttribute('aria-valuenow', String(height));
  };
  const saved = Number(localStorage.getItem(PANEL_HEIGHT_KEY));
  if (saved > 0) {
    setHeight(saved);
  }
  const save = (): void => {
    localStorage.setItem(PANEL_HEIGHT_KEY, String(panel.getBoundingClientRect().height));
  };

  splitter.addEventListener('pointerdown', (down) => {
    down.preventDefault();
    splitter.setPointerCapture(down.pointerId);
    const startY = down.clientY;
    const startHeight = panel.getBoundingClientRect().height;
    const move = (event: PointerEvent): void => {
      setHeight(startHeight + startY - event.clientY);
    };
    const up = (): void => {
      splitter.removeEventListener('pointermove', move);
      splitter.removeEventListener('pointerup', up);
      splitter.removeEventListener('pointercancel', up);
      save();
    };
    splitter.addEventListener('pointermove', move);
    splitter.addEventListener('pointerup', up);
    splitter.addEventListener('pointercancel', up);
  });
  splitter.addEventListener('keydown', (event) => {
    const step = event.shiftKey ? 80 : 20;
    const height = panel.getBoundingClientRect().height;
    if (event.key === 'ArrowUp') {
      setHeight(height + step);
    } else if (event.key === 'ArrowDown') {
      setHeight(height - step);
    } else {
      return;
    }
    event.preventDefault();
    save();
  });
}
