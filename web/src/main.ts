// Page entry point: reads the link's token, syncs the project tree and the open file with the server over y-websocket, mounts the run console and terminal, and drives the UI.
import './style.css';
import * as Y from 'yjs';
import { WebsocketProvider } from 'y-websocket';
import { userColor, type UserColor } from './color';
import { createEditor, type OpenEditor } from './editor';
import { mountExecPanel, type ExecPanel } from './exec-panel';
import { decodeToken, secondsLeft, type Claims } from './token';
import {
  buildTree,
  CONTENT_KEY,
  FILES_KEY,
  filesInTreeOrder,
  isFileId,
  readProjectFiles,
  type FileEntry,
} from './tree';
import { renderTree } from './tree-view';

const PROJECT_RE = /^[a-z0-9][a-z0-9_-]{0,62}$/;

type ConnState = 'connecting' | 'connected' | 'disconnected';

interface AwarenessUser {
  id: string;
  name: string;
  color: string;
  colorLight: string;
}

function byTestId(id: string): HTMLElement {
  const element = document.querySelector<HTMLElement>(`[data-testid="${id}"]`);
  if (element === null) {
    throw new Error(`page is missing [data-testid="${id}"]`);
  }
  return element;
}

const ui = {
  project: byTestId('project'),
  user: byTestId('user'),
  userName: byTestId('user-name'),
  userRole: byTestId('user-role'),
  avatar: byTestId('user-avatar'),
  presence: byTestId('presence'),
  status: byTestId('status'),
  message: byTestId('message'),
  tree: byTestId('file-tree'),
  treeEmpty: byTestId('tree-empty'),
  editor: byTestId('editor'),
  filePath: byTestId('file-path'),
  readonlyBadge: byTestId('readonly-badge'),
  placeholder: byTestId('placeholder'),
};

/** Shows a problem that stops the page from connecting at all. */
function fatal(text: string): void {
  showMessage(text);
  setStatus('disconnected');
  ui.placeholder.textContent = 'Not connected.';
}

function showMessage(text: string | null, kind: 'error' | 'info' = 'error'): void {
  ui.message.hidden = text === null;
  ui.message.textContent = text ?? '';
  ui.message.dataset.kind = kind;
}

function setStatus(state: ConnState): void {
  ui.status.textContent = state;
  ui.status.dataset.state = state;
}

/** Tracks one provider's connection and turns refusals into a message for the user. */
class ConnectionWatch {
  state: ConnState = 'connecting';
  everConnected = false;
  refusedAttempts = 0;
  terminal: string | null = null;

  constructor(
    readonly label: string,
    provider: WebsocketProvider,
    private readonly onChange: () => void,
  ) {
    provider.on('status', ({ status }) => {
      this.state = status;
      if (status === 'connected') {
        this.everConnected = true;
        this.refusedAttempts = 0;
        this.terminal = null;
      }
      this.onChange();
    });
    provider.on('connection-close', () => {
      // A close before the socket ever opened: the upgrade was refused (HTTP 401 for a bad
      // token) or the server is unreachable. The browser does not expose which.
      if (this.state !== 'connected') {
        this.refusedAttempts += 1;
      }
      this.state = 'disconnected';
      this.onChange();
    });
    provider.on('closed', ({ code, reason }) => {
      this.terminal = `The server closed the connection for good (${code}${reason ? `: ${reason}` : ''}).`;
      this.onChange();
    });
  }
}

class App {
  private readonly rootDoc = new Y.Doc();
  private readonly rootProvider: WebsocketProvider;
  private readonly rootWatch: ConnectionWatch;
  private readonly user: AwarenessUser;
  private rootSynced = false;
  /** The run console and shared terminal, over the exec channel. */
  readonly exec: ExecPanel;
  private entries: FileEntry[] = [];
  private current: {
    id: string;
    doc: Y.Doc;
    provider: WebsocketProvider;
    watch: ConnectionWatch;
    editor: OpenEditor;
  } | null = null;

  constructor(
    private readonly project: string,
    private readonly token: string,
    private readonly claims: Claims,
  ) {
    const color: UserColor = userColor(claims.sub);
    this.user = { id: claims.sub, name: claims.name, ...color };
    this.exec = mountExecPanel(project, token, claims);
    this.rootProvider = this.connect(project, this.rootDoc);
    this.rootWatch = new ConnectionWatch('project', this.rootProvider, () => {
      this.refreshStatus();
    });
    this.rootProvider.on('sync', (synced) => {
      if (synced) {
        this.rootSynced = true;
        this.refreshTree();
        this.refreshStatus();
      }
    });
    this.rootDoc.getMap(FILES_KEY).observeDeep(() => {
      this.refreshTree();
    });
    this.rootProvider.awareness.on('change', () => {
      this.renderPresence();
    });
    window.addEventListener('hashchange', () => {
      const wanted = App.hashFileId();
      if (wanted !== null && wanted !== this.current?.id) {
        this.open(wanted);
      }
    });
    const wanted = App.hashFileId();
    if (wanted !== null) {
      this.open(wanted);
    }
    this.refreshTree();
    this.refreshStatus();
    // Say so as soon as the token runs out (timers cannot wait longer than 2^31-1 ms).
    const msLeft = secondsLeft(claims) * 1000;
    if (msLeft < 2 ** 31 - 1) {
      window.setTimeout(
        () => {
          this.refreshStatus();
        },
        Math.max(0, msLeft) + 50,
      );
    }
  }

  /** The open file's id and editor text (a hook for the browser tests). */
  get openFile(): { id: string; text: string } | null {
    if (this.current === null) {
      return null;
    }
    return { id: this.current.id, text: this.current.editor.view.state.doc.toString() };
  }

  private static hashFileId(): string | null {
    const id = new URLSearchParams(location.hash.slice(1)).get('file');
    return id !== null && isFileId(id) ? id : null;
  }

  private connect(docName: string, doc: Y.Doc): WebsocketProvider {
    const wsUrl = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/sync`;
    const provider = new WebsocketProvider(wsUrl, docName, doc, {
      params: { token: this.token },
      // Every edit goes through the server, which enforces roles; tabs never sync directly.
      disableBc: true,
    });
    provider.awareness.setLocalStateField('user', this.user);
    return provider;
  }

  private refreshStatus(): void {
    const watches = [this.rootWatch, ...(this.current ? [this.current.watch] : [])];
    const states = watches.map((w) => w.state);
    const refused = watches.find((w) => w.refusedAttempts > 0 && !w.everConnected);
    // A refused connection stays "disconnected" while y-websocket keeps retrying in the background.
    const state: ConnState =
      refused === undefined && states.every((s) => s === 'connected')
        ? 'connected'
        : refused !== undefined || states.includes('disconnected')
          ? 'disconnected'
          : 'connecting';
    setStatus(state);
    ui.placeholder.textContent = this.rootSynced
      ? 'Select a file on the left.'
      : state === 'disconnected'
        ? 'Not connected.'
        : 'Loading…';
    const terminal = watches.find((w) => w.terminal !== null)?.terminal ?? null;
    if (secondsLeft(this.claims) <= 0) {
      showMessage(
        state === 'connected'
          ? 'Your access token has expired: the server may stop accepting your edits. Ask for a new link.'
          : 'Your access token has expired. Ask for a new link to this project.',
      );
    } else if (terminal !== null) {
      showMessage(terminal);
    } else if (refused !== undefined) {
      showMessage(
        `The server refused the connection to the ${refused.label} (or cannot be reached). ` +
          `The link's token may be invalid, expired, or not valid for project "${this.project}".`,
      );
    } else if (state === 'disconnected') {
      showMessage('Connection lost. Reconnecting…', 'info');
    } else {
      showMessage(null);
    }
  }

  private refreshTree(): void {
    this.entries = readProjectFiles(this.rootDoc);
    const root = buildTree(this.entries);
    const files = filesInTreeOrder(root);
    renderTree(ui.tree, root, {
      selectedId: this.current?.id ?? null,
      onOpen: (id) => {
        this.open(id);
      },
    });
    ui.treeEmpty.hidden = !this.rootSynced || root.children.length > 0;
    const current =
      this.current === null ? undefined : files.find((f) => f.id === this.current?.id);
    if (current !== undefined && this.current !== null) {
      ui.filePath.textContent = current.displayPath;
      this.current.editor.setPath(current.path);
    }
    if (!this.rootSynced) {
      return;
    }
    if (this.current !== null && current === undefined) {
      // The open file was deleted (or never existed): fall back to the first file.
      this.close();
    }
    if (this.current === null && files[0] !== undefined) {
      this.open(files[0].id);
    }
  }

  private open(fileId: string): void {
    if (this.current?.id === fileId) {
      return;
    }
    this.close();
    const doc = new Y.Doc();
    const provider = this.connect(`${this.project}/${fileId}`, doc);
    const watch = new ConnectionWatch('file', provider, () => {
      this.refreshStatus();
    });
    ui.editor.replaceChildren();
    const entry = this.entries.find((e) => e.id === fileId);
    const readOnly = this.claims.role !== 'editor';
    const editor = createEditor({
      parent: ui.editor,
      ytext: doc.getText(CONTENT_KEY),
      awareness: provider.awareness,
      path: entry?.path ?? '',
      readOnly,
    });
    this.current = { id: fileId, doc, provider, watch, editor };
    this.rootProvider.awareness.setLocalStateField('file', fileId);
    ui.placeholder.hidden = true;
    ui.editor.hidden = false;
    ui.filePath.textContent = entry?.displayPath ?? '';
    ui.readonlyBadge.hidden = !readOnly;
    history.replaceState(null, '', `#file=${fileId}`);
    this.refreshTree();
    this.refreshStatus();
  }

  private close(): void {
    if (this.current === null) {
      return;
    }
    const { editor, provider, doc } = this.current;
    this.current = null;
    editor.destroy();
    provider.destroy();
    doc.destroy();
    ui.editor.replaceChildren();
    ui.editor.hidden = true;
    ui.placeholder.hidden = false;
    ui.filePath.textContent = '';
    ui.readonlyBadge.hidden = true;
    this.rootProvider.awareness.setLocalStateField('file', null);
  }

  private renderPresence(): void {
    const chips: HTMLLIElement[] = [];
    const self = this.rootDoc.clientID;
    this.rootProvider.awareness.getStates().forEach((state, clientId) => {
      const user = state.user as Partial<AwarenessUser> | undefined;
      if (clientId === self || typeof user?.name !== 'string') {
        return;
      }
      const chip = document.createElement('li');
      chip.className = 'presence-chip';
      chip.dataset.testid = 'presence-user';
      chip.textContent = user.name;
      chip.style.setProperty('--user-color', user.color ?? '#888');
      const fileId: unknown = state.file;
      const entry = this.entries.find((e) => e.id === fileId);
      chip.title = entry ? `${user.name} — ${entry.displayPath}` : user.name;
      chips.push(chip);
    });
    ui.presence.replaceChildren(...chips);
  }
}

function start(): void {
  const params = new URLSearchParams(location.search);
  const token = params.get('token');
  if (token === null || token === '') {
    fatal(
      'This link has no access token. Open the project with a link of the form ?project=NAME&token=TOKEN.',
    );
    return;
  }
  const decoded = decodeToken(token);
  if (!decoded.ok) {
    fatal(decoded.error);
    return;
  }
  const { claims } = decoded;
  const project = params.get('project') ?? claims.project;
  ui.project.textContent = project;
  document.title = `${project} — collab`;
  ui.userName.textContent = claims.name;
  ui.userRole.textContent = claims.role === 'viewer' ? 'viewer · read-only' : 'editor';
  ui.userRole.dataset.role = claims.role;
  ui.avatar.textContent = claims.name.trim().charAt(0).toUpperCase() || '?';
  ui.avatar.style.backgroundColor = userColor(claims.sub).color;
  ui.user.hidden = false;
  if (!PROJECT_RE.test(project)) {
    fatal(`"${project}" is not a valid project name.`);
    return;
  }
  if (claims.project !== project) {
    fatal(
      `This link's token is for project "${claims.project}", not "${project}". Ask for a link to "${project}".`,
    );
    return;
  }
  if (secondsLeft(claims) <= 0) {
    fatal('Your access token has expired. Ask for a new link to this project.');
    return;
  }
  setStatus('connecting');
  const app = new App(project, token, claims);
  (window as unknown as { collabApp: App }).collabApp = app;
}

start();
