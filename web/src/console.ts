// The run console: Run/Stop buttons, the shared output of the project's latest run, its verdict, and a stdin line, fed by the exec channel.
import type { ClientMsg, ServerMsg, StreamName, Verdict } from './exec';
import { utf8Bytes } from './exec';

/** Elements of the console pane in index.html. */
export interface ConsoleElements {
  runButton: HTMLButtonElement;
  stopButton: HTMLButtonElement;
  runInfo: HTMLElement;
  output: HTMLElement;
  verdict: HTMLElement;
  stdinForm: HTMLFormElement;
  stdinInput: HTMLInputElement;
  stdinSend: HTMLButtonElement;
  stdinEof: HTMLButtonElement;
}

export interface ConsoleOptions {
  elements: ConsoleElements;
  /** Sends a message on the exec channel; false when it is not connected. */
  send: (msg: ClientMsg) => boolean;
}

/** Keeps the DOM bounded: older output is dropped beyond this many characters. */
const MAX_OUTPUT_CHARS = 400_000;

// CSI and OSC escape sequences (colours, cursor moves): the console is plain text.
// eslint-disable-next-line no-control-regex
const ANSI_RE = /\u001b(?:\[[0-?]*[ -/]*[@-~]|\][^\u0007\u001b]*(?:\u0007|\u001b\\)|[@-Z\\-_])/g;

function plainText(text: string): string {
  return text.replace(ANSI_RE, '').replace(/\r\n/g, '\n');
}

interface RunView {
  run: number;
  by: string;
  command: string;
  verdict: Verdict | null;
}

/** Whether a verdict counts as success (for its colour). */
function verdictOk(verdict: Verdict): boolean {
  return verdict.kind === 'exited' && verdict.code === 0;
}

export class RunConsole {
  private readonly el: ConsoleElements;
  private readonly send: (msg: ClientMsg) => boolean;
  private connected = false;
  private role: 'editor' | 'viewer' | null = null;
  private current: RunView | null = null;
  /** Set between pressing Run and the server's answer (run_started or error). */
  private starting = false;
  /** One decoder per stream, so a character split across chunks is decoded whole. */
  private decoders = new Map<StreamName, TextDecoder>();
  private outputChars = 0;

  constructor({ elements, send }: ConsoleOptions) {
    this.el = elements;
    this.send = send;
    elements.runButton.addEventListener('click', () => {
      this.run();
    });
    elements.stopButton.addEventListener('click', () => {
      if (this.current !== null && this.current.verdict === null) {
        this.send({ type: 'stop', run: this.current.run });
      }
    });
    elements.stdinForm.addEventListener('submit', (event) => {
      event.preventDefault();
      this.sendLine();
    });
    elements.stdinInput.addEventListener('keydown', (event) => {
      // Ctrl+D on an empty line closes stdin, as in a terminal.
      if (event.key === 'd' && event.ctrlKey && elements.stdinInput.value === '') {
        event.preventDefault();
        this.sendEof();
      }
    });
    elements.stdinEof.addEventListener('click', () => {
      this.sendEof();
    });
    this.render();
  }

  /** The console's text (a hook for the browser tests). */
  get text(): string {
    return this.el.output.textContent;
  }

  /** The exec channel's connection changed; until the next hello the controls are off. */
  setConnected(connected: boolean): void {
    this.connected = connected;
    if (!connected) {
      this.starting = false;
    }
    this.render();
  }

  handle(msg: ServerMsg): void {
    switch (msg.type) {
      case 'hello': {
        this.role = msg.role;
        this.starting = false;
        this.clear();
        // The latest run is the one shown; the server lists them oldest first.
        const latest = msg.runs.reduce<(typeof msg.runs)[number] | null>(
          (best, run) => (best === null || run.run > best.run ? run : best),
          null,
        );
        if (latest !== null) {
          this.current = { run: latest.run, by: latest.by, command: latest.command, verdict: null };
          for (const chunk of latest.history) {
            this.append(chunk.stream, chunk.data);
          }
          this.current.verdict = latest.verdict;
        }
        break;
      }
      case 'run_started': {
        // This page pressed Run: its user is the one most likely to type the program's input.
        const ours = this.starting;
        this.starting = false;
        this.clear();
        this.current = { run: msg.run, by: msg.by, command: msg.command, verdict: null };
        this.render();
        if (ours && this.canAct) {
          this.el.stdinInput.focus();
        }
        return;
      }
      case 'run_output':
        if (msg.run === this.current?.run) {
          this.append(msg.stream, msg.data);
        }
        break;
      case 'run_finished':
        if (msg.run === this.current?.run) {
          this.flushDecoders();
          this.current.verdict = msg.verdict;
        }
        break;
      case 'error':
        // A refused Run (say, another run started first) leaves the button usable again.
        this.starting = false;
        break;
      default:
        return;
    }
    this.render();
  }

  private get canAct(): boolean {
    return this.connected && this.role === 'editor';
  }

  private get running(): boolean {
    return this.current !== null && this.current.verdict === null;
  }

  private run(): void {
    if (!this.canAct || this.running || this.starting) {
      return;
    }
    if (this.send({ type: 'run' })) {
      this.starting = true;
      this.render();
    }
  }

  private sendLine(): void {
    if (!this.canAct || this.current === null || !this.running) {
      return;
    }
    const line = this.el.stdinInput.value;
    if (this.send({ type: 'stdin', run: this.current.run, data: utf8Bytes(`${line}\n`) })) {
      // Pipes do not echo: show the line here, marked as input (the others see only the output).
      this.appendText('stdin', `${line}\n`);
      this.el.stdinInput.value = '';
    }
  }

  private sendEof(): void {
    if (this.canAct && this.current !== null && this.running) {
      this.send({ type: 'stdin_eof', run: this.current.run });
    }
  }

  private clear(): void {
    this.current = null;
    this.decoders = new Map();
    this.outputChars = 0;
    this.el.output.replaceChildren();
  }

  private flushDecoders(): void {
    for (const [stream, decoder] of this.decoders) {
      const rest = decoder.decode();
      if (rest !== '') {
        this.appendText(stream, rest);
      }
    }
    this.decoders = new Map();
  }

  private append(stream: StreamName, data: Uint8Array): void {
    let decoder = this.decoders.get(stream);
    if (decoder === undefined) {
      decoder = new TextDecoder();
      this.decoders.set(stream, decoder);
    }
    this.appendText(stream, decoder.decode(data, { stream: true }));
  }

  private appendText(kind: StreamName | 'stdin', raw: string): void {
    const text = plainText(raw);
    if (text === '') {
      return;
    }
    const output = this.el.output;
    const atBottom = output.scrollHeight - output.scrollTop - output.clientHeight < 24;
    const last = output.lastElementChild;
    if (last instanceof HTMLSpanElement && last.dataset.stream === kind) {
      last.append(text);
    } else {
      const span = document.createElement('span');
      span.className = `out-${kind}`;
      span.dataset.stream = kind;
      span.textContent = text;
      output.append(span);
    }
    this.outputChars += text.length;
    while (this.outputChars > MAX_OUTPUT_CHARS && output.firstElementChild !== null) {
      const first = output.firstElementChild;
      this.outputChars -= first.textContent.length;
      first.remove();
    }
    if (atBottom) {
      output.scrollTop = output.scrollHeight;
    }
  }

  private render(): void {
    const el = this.el;
    const current = this.current;
    const viewer = this.role === 'viewer';
    el.runButton.disabled = !this.canAct || this.running || this.starting;
    el.runButton.title = viewer
      ? 'Viewers can watch runs but not start them'
      : this.running
        ? 'The program is already running'
        : "Run the project's program";
    el.stopButton.disabled = !this.canAct || !this.running;
    el.stopButton.hidden = !this.running;
    const stdinOpen = this.canAct && this.running;
    el.stdinInput.disabled = !stdinOpen;
    el.stdinSend.disabled = !stdinOpen;
    el.stdinEof.disabled = !stdinOpen;
    el.stdinInput.placeholder = viewer
      ? 'Viewers cannot type input'
      : stdinOpen
        ? 'Input for the program: Enter sends the line'
        : 'Input for the program (while it runs)';

    el.runInfo.replaceChildren();
    if (current !== null) {
      const command = document.createElement('code');
      command.textContent = current.command;
      el.runInfo.append(command, ` · started by ${current.by}`);
      el.runInfo.title = `${current.command}, started by ${current.by}`;
    } else {
      el.runInfo.title = '';
    }

    let state: string;
    let text: string;
    if (!this.connected && this.role === null) {
      state = 'idle';
      text = 'Waiting for the runner…';
    } else if (this.starting) {
      state = 'running';
      text = 'Starting…';
    } else if (current === null) {
      state = 'idle';
      text = viewer ? 'No run yet.' : 'No run yet. Press Run to start the program.';
    } else if (current.verdict === null) {
      state = 'running';
      text = `Running… (started by ${current.by})`;
    } else {
      state = verdictOk(current.verdict)
        ? 'ok'
        : current.verdict.kind === 'stopped'
          ? 'stopped'
          : 'failed';
      text = current.verdict.summary;
    }
    el.verdict.textContent = text;
    el.verdict.dataset.state = state;
    el.verdict.dataset.kind = current?.verdict?.kind ?? '';
  }
}
