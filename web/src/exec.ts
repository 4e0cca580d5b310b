// The exec channel client: one JSON WebSocket per page on /exec/{project} for the project's shared runs and terminals, reconnecting with backoff.
//
// The wire types are generated from exec-bridge/src/protocol.rs (the authoritative definition)
// into generated/exec-protocol.ts; bytes travel base64-encoded in `data` and `scrollback`, and
// the types below are the same messages with those fields decoded. This module knows nothing
// about the DOM: console.ts and terminal.ts render what it receives.

import type * as Wire from './generated/exec-protocol';

/** A wire type with its base64 fields (`data`, `scrollback`) decoded to bytes. */
type Decoded<T> = T extends readonly (infer Item)[]
  ? Decoded<Item>[]
  : T extends object
    ? { [K in keyof T]: K extends 'data' | 'scrollback' ? Uint8Array : Decoded<T[K]> }
    : T;

export type StreamName = Wire.StreamName;

/** `kind` is one of `exited`, `signaled`, `time_limit`, `memory_limit`, `output_limit`, `compile_error`, `stopped` or `failed`; `summary` a sentence for people. */
export type Verdict = Wire.VerdictInfo;

export type OutputChunk = Decoded<Wire.OutputChunk>;

export type RunInfo = Decoded<Wire.RunInfo>;

/** `exited` is true once the shell ended (`exit_code` may still be null, e.g. when it was killed). */
export type TermInfo = Decoded<Wire.TermInfo>;

/** What the server sends, with `data` already decoded to bytes. */
export type ServerMsg = Decoded<Wire.ServerMsg>;

/** What the page sends; `data` is encoded to base64 on the way out. */
export type ClientMsg = Decoded<Wire.ClientMsg>;

export function encodeBase64(bytes: Uint8Array): string {
  let binary = '';
  // Chunks keep String.fromCharCode's argument list short.
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

/** Decodes base64; throws on text that is not base64. */
export function decodeBase64(text: string): Uint8Array {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) {
    bytes[i] = binary.charCodeAt(i);
  }
  return bytes;
}

const utf8 = new TextEncoder();

/** A string as UTF-8 bytes, for `stdin` and `term_input`. */
export function utf8Bytes(text: string): Uint8Array {
  return utf8.encode(text);
}

/** Thrown by the readers below when a message lacks a field or has one of the wrong type. */
class BadMessage extends Error {}

type Fields = Record<string, unknown>;

function isRecord(value: unknown): value is Fields {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function record(value: unknown, what: string): Fields {
  if (!isRecord(value)) {
    throw new BadMessage(`${what} is not an object`);
  }
  return value;
}

function num(fields: Fields, key: string): number {
  const value = fields[key];
  if (typeof value !== 'number' || !Number.isFinite(value)) {
    throw new BadMessage(`${key} is not a number`);
  }
  return value;
}

function optNum(fields: Fields, key: string): number | null {
  return fields[key] === null || fields[key] === undefined ? null : num(fields, key);
}

function str(fields: Fields, key: string): string {
  const value = fields[key];
  if (typeof value !== 'string') {
    throw new BadMessage(`${key} is not a string`);
  }
  return value;
}

function bytes(fields: Fields, key: string): Uint8Array {
  try {
    return decodeBase64(str(fields, key));
  } catch {
    throw new BadMessage(`${key} is not base64`);
  }
}

function list(fields: Fields, key: string): unknown[] {
  const value = fields[key];
  if (!Array.isArray(value)) {
    throw new BadMessage(`${key} is not an array`);
  }
  return value;
}

function stream(fields: Fields): StreamName {
  const value = fields.stream;
  if (value !== 'stdout' && value !== 'stderr') {
    throw new BadMessage('stream is neither stdout nor stderr');
  }
  return value;
}

function verdict(value: unknown): Verdict {
  const fields = record(value, 'verdict');
  return {
    kind: str(fields, 'kind'),
    code: optNum(fields, 'code'),
    signal: optNum(fields, 'signal'),
    summary: str(fields, 'summary'),
  };
}

function runInfo(value: unknown): RunInfo {
  const fields = record(value, 'run');
  return {
    run: num(fields, 'run'),
    by: str(fields, 'by'),
    command: str(fields, 'command'),
    history: list(fields, 'history').map((chunk) => {
      const c = record(chunk, 'history chunk');
      return { stream: stream(c), data: bytes(c, 'data') };
    }),
    verdict:
      fields.verdict === null || fields.verdict === undefined ? null : verdict(fields.verdict),
  };
}

function termInfo(value: unknown): TermInfo {
  const fields = record(value, 'term');
  const exitCode = optNum(fields, 'exit_code');
  return {
    term: num(fields, 'term'),
    by: str(fields, 'by'),
    cols: num(fields, 'cols'),
    rows: num(fields, 'rows'),
    scrollback: bytes(fields, 'scrollback'),
    exit_code: exitCode,
    // A terminal closed by a peer has ended without an exit code.
    exited: fields.exited === true || exitCode !== null,
  };
}

/** Reads one text frame from the server; null (and a console warning) for anything unexpected. */
export function parseServerMsg(text: string): ServerMsg | null {
  try {
    const fields = record(JSON.parse(text), 'message');
    const type = str(fields, 'type');
    switch (type) {
      case 'hello': {
        const role = fields.role === 'editor' ? 'editor' : 'viewer';
        return {
          type,
          role,
          runs: list(fields, 'runs').map(runInfo),
          terms: list(fields, 'terms').map(termInfo),
        };
      }
      case 'run_started':
        return {
          type,
          run: num(fields, 'run'),
          by: str(fields, 'by'),
          command: str(fields, 'command'),
        };
      case 'run_output':
        return {
          type,
          run: num(fields, 'run'),
          stream: stream(fields),
          data: bytes(fields, 'data'),
        };
      case 'run_finished':
        return { type, run: num(fields, 'run'), verdict: verdict(fields.verdict) };
      case 'term_opened':
        return {
          type,
          term: num(fields, 'term'),
          by: str(fields, 'by'),
          cols: num(fields, 'cols'),
          rows: num(fields, 'rows'),
        };
      case 'term_output':
        return { type, term: num(fields, 'term'), data: bytes(fields, 'data') };
      case 'term_resized':
        return {
          type,
          term: num(fields, 'term'),
          cols: num(fields, 'cols'),
          rows: num(fields, 'rows'),
        };
      case 'term_exited':
        return { type, term: num(fields, 'term'), exit_code: optNum(fields, 'exit_code') };
      case 'error':
        return { type, message: str(fields, 'message') };
      default:
        throw new BadMessage(`unknown type ${JSON.stringify(type)}`);
    }
  } catch (error) {
    console.warn('exec channel: ignoring a message the page does not understand:', error);
    return null;
  }
}

/** The JSON text frame for a client message. */
export function encodeClientMsg(msg: ClientMsg): string {
  switch (msg.type) {
    case 'stdin':
    case 'term_input':
      return JSON.stringify({ ...msg, data: encodeBase64(msg.data) });
    default:
      return JSON.stringify(msg);
  }
}

export type ExecState = 'connecting' | 'connected' | 'disconnected';

export interface ExecChannelOptions {
  /** `ws(s)://host/exec/{project}?token=...` */
  url: string;
  onMessage: (msg: ServerMsg) => void;
  /**
   * Called on every state change; `connected` comes with the server's hello. `failures` counts
   * the attempts in a row that ended without a hello.
   */
  onState: (state: ExecState, failures: number) => void;
  /** First reconnect delay; doubles per failed attempt up to `maxBackoffMs`. */
  minBackoffMs?: number;
  maxBackoffMs?: number;
}

/**
 * One exec socket that reconnects with exponential backoff (with jitter) whenever it drops. The
 * backoff resets only once a hello arrived, so a server that accepts and at once closes is not
 * hammered. Every hello replays the project's runs and terminals, so views rebuild from it.
 */
export class ExecChannel {
  private socket: WebSocket | null = null;
  private attempts = 0;
  private timer: number | null = null;
  private destroyed = false;
  private currentState: ExecState = 'connecting';
  private readonly minBackoffMs: number;
  private readonly maxBackoffMs: number;

  constructor(private readonly options: ExecChannelOptions) {
    this.minBackoffMs = options.minBackoffMs ?? 250;
    this.maxBackoffMs = options.maxBackoffMs ?? 15_000;
    this.open();
  }

  get state(): ExecState {
    return this.currentState;
  }

  /** Sends `msg` if the channel is connected; false when it is not (nothing is queued). */
  send(msg: ClientMsg): boolean {
    if (this.currentState !== 'connected' || this.socket?.readyState !== WebSocket.OPEN) {
      return false;
    }
    this.socket.send(encodeClientMsg(msg));
    return true;
  }

  destroy(): void {
    this.destroyed = true;
    if (this.timer !== null) {
      window.clearTimeout(this.timer);
      this.timer = null;
    }
    this.socket?.close(1000);
    this.socket = null;
  }

  private setState(state: ExecState): void {
    if (state !== this.currentState || state === 'disconnected') {
      this.currentState = state;
      this.options.onState(state, this.attempts);
    }
  }

  private open(): void {
    this.timer = null;
    let socket: WebSocket;
    try {
      socket = new WebSocket(this.options.url);
    } catch (error) {
      console.warn('exec channel: cannot open a socket:', error);
      this.retry();
      return;
    }
    this.socket = socket;
    socket.addEventListener('message', (event: MessageEvent<unknown>) => {
      if (socket !== this.socket || typeof event.data !== 'string') {
        return;
      }
      const msg = parseServerMsg(event.data);
      if (msg === null) {
        return;
      }
      if (msg.type === 'hello') {
        this.attempts = 0;
        this.setState('connected');
      }
      this.options.onMessage(msg);
    });
    socket.addEventListener('close', () => {
      if (socket !== this.socket) {
        return;
      }
      this.socket = null;
      this.retry();
    });
  }

  private retry(): void {
    if (this.destroyed) {
      return;
    }
    this.attempts += 1;
    this.setState('disconnected');
    const base = Math.min(this.maxBackoffMs, this.minBackoffMs * 2 ** (this.attempts - 1));
    const delay = base / 2 + Math.random() * (base / 2);
    this.timer = window.setTimeout(() => {
      this.open();
    }, delay);
  }
}
