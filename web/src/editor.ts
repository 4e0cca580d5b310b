// Creates the CodeMirror 6 editor bound to a file's Y.Text via y-codemirror.next (shared text, named remote cursors, shared undo).
import { closeBrackets, closeBracketsKeymap } from '@codemirror/autocomplete';
import { defaultKeymap, indentWithTab } from '@codemirror/commands';
import { javascript } from '@codemirror/lang-javascript';
import { markdown } from '@codemirror/lang-markdown';
import { python } from '@codemirror/lang-python';
import {
  bracketMatching,
  defaultHighlightStyle,
  foldGutter,
  foldKeymap,
  indentOnInput,
  syntaxHighlighting,
} from '@codemirror/language';
import { highlightSelectionMatches, searchKeymap } from '@codemirror/search';
import { Compartment, EditorState, type Extension } from '@codemirror/state';
import {
  EditorView,
  crosshairCursor,
  drawSelection,
  dropCursor,
  highlightActiveLine,
  highlightActiveLineGutter,
  highlightSpecialChars,
  keymap,
  lineNumbers,
  rectangularSelection,
} from '@codemirror/view';
import { yCollab, yUndoManagerKeymap } from 'y-codemirror.next';
import * as Y from 'yjs';
import type { Awareness } from 'y-protocols/awareness';

/** The language support for a file, chosen by its extension. */
export function languageFor(path: string): Extension {
  const name = path.slice(path.lastIndexOf('/') + 1).toLowerCase();
  const dot = name.lastIndexOf('.');
  const ext = dot > 0 ? name.slice(dot + 1) : '';
  switch (ext) {
    case 'py':
    case 'pyi':
      return python();
    case 'js':
    case 'mjs':
    case 'cjs':
      return javascript();
    case 'jsx':
      return javascript({ jsx: true });
    case 'ts':
    case 'mts':
    case 'cts':
      return javascript({ typescript: true });
    case 'tsx':
      return javascript({ typescript: true, jsx: true });
    case 'json':
      return javascript();
    case 'md':
    case 'markdown':
      return markdown();
    default:
      return [];
  }
}

const theme = EditorView.theme({
  '&': { height: '100%', fontSize: '14px' },
  '&.cm-focused': { outline: 'none' },
  '.cm-scroller': {
    fontFamily: 'ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace',
    lineHeight: '1.5',
  },
  '.cm-content': { padding: '8px 0' },
  '.cm-gutters': { backgroundColor: '#f6f7f9', borderRight: '1px solid #e3e6ea', color: '#8a919c' },
  // Remote cursor name labels: always visible (y-codemirror.next shows them only on hover).
  '.cm-ySelectionInfo': {
    opacity: '1',
    fontFamily: 'system-ui, sans-serif',
    fontSize: '11px',
    borderRadius: '3px 3px 3px 0',
    padding: '0 4px',
    top: '-1.35em',
  },
});

export interface EditorOptions {
  parent: HTMLElement;
  ytext: Y.Text;
  awareness: Awareness;
  path: string;
  readOnly: boolean;
}

export interface OpenEditor {
  view: EditorView;
  /** Switches the language support when the file's path becomes known or changes. */
  setPath(path: string): void;
  destroy(): void;
}

export function createEditor({
  parent,
  ytext,
  awareness,
  path,
  readOnly,
}: EditorOptions): OpenEditor {
  const undoManager = new Y.UndoManager(ytext);
  const language = new Compartment();
  let currentPath = path;
  const extensions: Extension[] = [
    lineNumbers(),
    highlightActiveLineGutter(),
    highlightSpecialChars(),
    foldGutter(),
    drawSelection(),
    dropCursor(),
    EditorState.allowMultipleSelections.of(true),
    indentOnInput(),
    syntaxHighlighting(defaultHighlightStyle, { fallback: true }),
    bracketMatching(),
    closeBrackets(),
    rectangularSelection(),
    crosshairCursor(),
    highlightActiveLine(),
    highlightSelectionMatches(),
    keymap.of([
      ...closeBracketsKeymap,
      ...defaultKeymap,
      ...searchKeymap,
      ...foldKeymap,
      ...yUndoManagerKeymap,
      indentWithTab,
    ]),
    language.of(languageFor(path)),
    theme,
    EditorState.readOnly.of(readOnly),
    EditorView.editable.of(!readOnly),
    yCollab(ytext, awareness, { undoManager }),
  ];
  const view = new EditorView({
    parent,
    state: EditorState.create({ doc: ytext.toJSON(), extensions }),
  });
  return {
    view,
    setPath(newPath: string) {
      if (newPath !== currentPath) {
        currentPath = newPath;
        view.dispatch({ effects: language.reconfigure(languageFor(newPath)) });
      }
    },
    destroy() {
      view.destroy();
      undoManager.destroy();
    },
  };
}
