// The shared terminal pane: an xterm.js view of the project's terminal (one shell for everyone), fed by and typing into the exec channel.
import '@xterm/xterm/css/xterm.css';
import { FitAddon } from '@xterm/addon-fit';
import { Terminal } from '@xterm/xterm';
import type { ClientMsg, ServerMsg } from './exec';
import { utf8Bytes } from './exec';

/** Elements of the terminal pane in index.html. */
export interface TerminalElements {
  /** Where xterm.js renders. */
  host: HTMLElement;
  info: HTMLElement;
  openButton: HTMLButtonElement;
  closeButton: HTMLButtonElement;
  /** Shown instead of the terminal while there is none. */
  placeholder: HTMLElement;
}

export interface TerminalOptions {
  elements: TerminalElements;
  send: (msg: ClientMsg) => boolean;
}

/** What the page keeps of each terminal, enough to switch to it and replay it. */
interface TermState {
  term: number;
  by: string;
  cols: number;
  rows: number;
  /** Output so far, capped at about MAX_REPLAY_BYTES (the server's scrollback plus live output). */
  chunks: Uint8Array[];
  bytes: number;
  exited: boolean;
  exitCode: number | null;
}

const MAX_REPLAY_BYTES = 256 * 1024;

/** How long the pane must keep its size before the shared pty follows it. */
const RESIZE_DEBOUNCE_MS = 100;

const FONT = 'ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace';

/** Light colours in the page's palette (GitHub light), readable on its white panels. */
const THEME = {
  background: '#ffffff',
  foreground: '#1f2328',
  cursor: '#2f6fed',
  cursorAccent: '#ffffff',
  selectionBackground: '#2f6fed33',
  black: '#24292f',
  red: '#cf222e',
  green: '#116329',
  yellow: '#4d2d00',
  blue: '#0969da',
  magenta: '#8250df',
  cyan: '#1b7c83',
  white: '#6e7781',
  brightBlack: '#57606a',
  brightRed: '#a40e26',
  brightGreen: '#1a7f37',
  brightYellow: '#633c01',
  brightBlue: '#218bff',
  brightMagenta: '#a475f9',
  brightCyan: '#3192aa',
  brightWhite: '#8c959f',
};

export class SharedTerminal {
  private readonly el: TerminalElements;
  private readonly send: (msg: ClientMsg) => boolean;
  private readonly xterm: Terminal;
  private readonly fit = new FitAddon();
  private readonly terms = new Map<number, TermState>();
  /** The terminal on screen: the newest live one, else the newest that ended. */
  private shown: number | null = null;
  private connected = false;
  private role: 'editor' | 'viewer' | null = null;
  /** Set between asking for a terminal and the server's term_opened (or error). */
  private opening = false;
  private opened = false;

  constructor({ elements, send }: TerminalOptions) {
    this.el = elements;
    this.send = send;
    this.xterm = new Terminal({
      fontFamily: FONT,
      fontSize: 13,
      lineHeight: 1.2,
      cursorBlink: true,
      scrollback: 5000,
      theme: THEME,
      // Read-only until the server says this page is an editor.
      disableStdin: true,
    });
    this.xterm.loadAddon(this.fit);
    this.xterm.onData((data) => {
      this.input(utf8Bytes(data));
    });
    this.xterm.onBinary((data) => {
      this.input(Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff));
    });
    elements.openButton.addEventListener('click', () => {
      this.openTerminal();
    });
    elements.closeButton.addEventListener('click', () => {
      const state = this.shownState();
      if (this.canAct && state !== null && !state.exited) {
        this.send({ type: 'term_close', term: state.term });
      }
    });
    // Clicking the empty pane opens a terminal, like the button.
    elements.placeholder.addEventListener('click', () => {
      this.openTerminal();
    });
    // The shared pty follows the size of the pane of whoever resized last (or focused it).
    // Debounced: dragging the splitter would otherwise resize the pty on every frame.
    let resizeTimer: number | null = null;
    new ResizeObserver(() => {
      if (resizeTimer !== null) {
        window.clearTimeout(resizeTimer);
      }
      resizeTimer = window.setTimeout(() => {
        resizeTimer = null;
        this.fitToPane();
      }, RESIZE_DEBOUNCE_MS);
    }).observe(elements.host);
    elements.host.addEventListener('focusin', () => {
      this.fitToPane();
    });
    this.render();
  }

  /** The terminal's screen and scrollback as text, one line per row (a hook for the browser tests). */
  get text(): string {
    const buffer = this.xterm.buffer.active;
    const lines: string[] = [];
    for (let i = 0; i < buffer.length; i++) {
      lines.push(buffer.getLine(i)?.translateToString(true) ?? '');
    }
    return lines.join('\n').trimEnd();
  }

  /** The size xterm.js renders at: the shared pty's (a hook for the browser tests). */
  get size(): { cols: number; rows: number } {
    return { cols: this.xterm.cols, rows: this.xterm.rows };
  }

  /** The shown terminal's id, or null. */
  get termId(): number | null {
    return this.shown;
  }

  setConnected(connected: boolean): void {
    this.connected = connected;
    if (!connected) {
      this.opening = false;
    }
    this.render();
  }

  handle(msg: ServerMsg): void {
    switch (msg.type) {
      case 'hello':
        this.role = msg.role;
        this.opening = false;
        this.terms.clear();
        for (const info of msg.terms) {
          this.terms.set(info.term, {
            term: info.term,
            by: info.by,
            cols: info.cols,
            rows: info.rows,
            chunks: [info.scrollback],
            bytes: info.scrollback.length,
            exited: info.exited,
            exitCode: info.exit_code,
          });
        }
        this.shown = null;
        this.choose();
        break;
      case 'term_opened':
        this.opening = false;
        this.terms.set(msg.term, {
          term: msg.term,
          by: msg.by,
          cols: msg.cols,
          rows: msg.rows,
          chunks: [],
          bytes: 0,
          exited: false,
          exitCode: null,
        });
        this.choose();
        break;
      case 'term_output': {
        const state = this.terms.get(msg.term);
        if (state === undefined) {
          return;
        }
        state.chunks.push(msg.data);
        state.bytes += msg.data.length;
        while (state.bytes > MAX_REPLAY_BYTES && state.chunks.length > 1) {
          state.bytes -= state.chunks.shift()?.length ?? 0;
        }
        if (msg.term === this.shown) {
          this.xterm.write(msg.data);
        }
        return;
      }
      case 'term_resized': {
        const state = this.terms.get(msg.term);
        if (state === undefined) {
          return;
        }
        state.cols = msg.cols;
        state.rows = msg.rows;
        if (msg.term === this.shown) {
          this.resizeView(state);
        }
        break;
      }
      case 'term_exited': {
        const state = this.terms.get(msg.term);
        if (state === undefined) {
          return;
        }
        state.exited = true;
        state.exitCode = msg.exit_code;
        if (msg.term === this.shown) {
          this.xterm.write(this.exitNote(state));
        }
        // Another live terminal (say, opened at the same time by someone else) takes over.
        this.choose();
        break;
      }
      case 'error':
        this.opening = false;
        break;
      default:
        return;
    }
    this.render();
  }

  private get canAct(): boolean {
    return this.connected && this.role === 'editor';
  }

  private shownState(): TermState | null {
    return this.shown === null ? null : (this.terms.get(this.shown) ?? null);
  }

  private exitNote(state: TermState): string {
    const how = state.exitCode === null ? 'ended' : `exited with code ${state.exitCode}`;
    return `\r\n\x1b[2m[shell ${how}]\x1b[0m\r\n`;
  }

  /**
   * Shows the newest live terminal, else the newest ended one; replays it if it changed. Every
   * page applies the same rule to the same events, so all show the same terminal.
   */
  private choose(): void {
    const all = [...this.terms.values()].sort((a, b) => b.term - a.term);
    const pick = all.find((t) => !t.exited) ?? all[0] ?? null;
    if (pick?.term === this.shown) {
      return;
    }
    this.shown = pick?.term ?? null;
    this.xterm.reset();
    if (pick === null) {
      return;
    }
    this.ensureOpened();
    this.resizeView(pick);
    for (const chunk of pick.chunks) {
      this.xterm.write(chunk);
    }
    if (pick.exited) {
      this.xterm.write(this.exitNote(pick));
    } else if (this.canAct) {
      // Joining a live shell: make it fit this page's pane.
      this.fitToPane();
    }
  }

  /** xterm.js renders into the host only once it is visible; done on the first terminal. */
  private ensureOpened(): void {
    if (!this.opened) {
      this.opened = true;
      this.el.host.hidden = false;
      this.el.placeholder.hidden = true;
      this.xterm.open(this.el.host);
    }
  }

  /** Renders at the shared pty's size, so lines wrap where the shell expects them to. */
  private resizeView(state: TermState): void {
    if (state.cols > 0 && state.rows > 0) {
      if (state.cols !== this.xterm.cols || state.rows !== this.xterm.rows) {
        this.xterm.resize(state.cols, state.rows);
      }
    }
  }

  /** The size that fills this page's pane, if the pane is laid out. */
  private paneSize(): { cols: number; rows: number } | null {
    if (!this.opened || this.el.host.clientWidth === 0 || this.el.host.clientHeight === 0) {
      return null;
    }
    const dims = this.fit.proposeDimensions();
    if (dims === undefined || !Number.isFinite(dims.cols) || !Number.isFinite(dims.rows)) {
      return null;
    }
    return { cols: Math.max(dims.cols, 20), rows: Math.max(dims.rows, 4) };
  }

  /** Asks for the shown live terminal to take this pane's size (editors only; last one wins). */
  private fitToPane(): void {
    const state = this.shownState();
    const size = this.paneSize();
    if (state === null || state.exited || size === null || !this.canAct) {
      return;
    }
    if (size.cols !== state.cols || size.rows !== state.rows) {
      this.send({ type: 'term_resize', term: state.term, ...size });
    }
  }

  private openTerminal(): void {
    const state = this.shownState();
    if (!this.canAct || this.opening || (state !== null && !state.exited)) {
      return;
    }
    // Before the first terminal, xterm.js is not in the page yet: measure with it in place.
    this.ensureOpened();
    const size = this.paneSize() ?? { cols: 80, rows: 24 };
    if (this.send({ type: 'term_open', ...size })) {
      this.opening = true;
      this.render();
    }
  }

  private input(data: Uint8Array): void {
    const state = this.shownState();
    if (this.canAct && state !== null && !state.exited) {
      this.send({ type: 'term_input', term: state.term, data });
    }
  }

  private render(): void {
    const state = this.shownState();
    const live = state !== null && !state.exited;
    const viewer = this.role === 'viewer';
    this.xterm.options.disableStdin = !(this.canAct && live);
    this.el.openButton.hidden = live;
    this.el.openButton.disabled = !this.canAct || this.opening;
    this.el.openButton.textContent = this.opening
      ? 'Opening…'
      : state === null
        ? 'Open terminal'
        : 'New terminal';
    this.el.openButton.title = viewer ? 'Viewers can watch the terminal but not open one' : '';
    this.el.closeButton.hidden = !live;
    this.el.closeButton.disabled = !this.canAct;
    this.el.host.dataset.readonly = String(!(this.canAct && live));
    this.el.info.textContent =
      state === null
        ? ''
        : `${live ? 'shared' : 'ended'} · opened by ${state.by}${viewer ? ' · read-only' : ''}`;
    if (!this.opened) {
      this.el.placeholder.textContent = !this.connected
        ? 'Waiting for the runner…'
        : viewer
          ? 'No terminal is open. Editors can open one.'
          : 'No terminal is open. Click here or press Open terminal to start a shared shell.';
      this.el.placeholder.dataset.clickable = String(this.canAct);
    }
  }
}
