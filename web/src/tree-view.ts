// Renders the project file tree (from tree.ts) as nested lists with stable data-testid hooks.
import type { DirNode, TreeNode } from './tree';

export interface TreeViewOptions {
  selectedId: string | null;
  onOpen(fileId: string): void;
}

function renderNode(node: TreeNode, depth: number, options: TreeViewOptions): HTMLLIElement {
  const li = document.createElement('li');
  li.className = `tree-node ${node.kind}`;
  const row = document.createElement(node.kind === 'file' ? 'button' : 'div');
  row.className = 'tree-row';
  row.style.paddingLeft = `${8 + depth * 14}px`;
  const icon = document.createElement('span');
  icon.className = `icon icon-${node.kind}`;
  icon.setAttribute('aria-hidden', 'true');
  const label = document.createElement('span');
  label.className = 'name';
  label.textContent = node.name;
  row.append(icon, label);
  li.append(row);
  if (node.kind === 'file') {
    const { entry } = node;
    row.setAttribute('type', 'button');
    row.dataset.testid = 'file-item';
    row.dataset.path = node.path;
    row.dataset.fileId = entry.id;
    row.title = entry.clashed ? `${entry.path} (clashes with another file)` : node.path;
    if (entry.clashed) {
      row.classList.add('clashed');
    }
    if (entry.id === options.selectedId) {
      row.classList.add('selected');
      row.setAttribute('aria-current', 'true');
    }
    row.addEventListener('click', () => {
      options.onOpen(entry.id);
    });
  } else {
    row.dataset.testid = 'dir-item';
    row.dataset.path = node.path;
    const list = document.createElement('ul');
    for (const child of node.children) {
      list.append(renderNode(child, depth + 1, options));
    }
    li.append(list);
  }
  return li;
}

/** Replaces the content of `container` (the `file-tree` list) with the tree. */
export function renderTree(container: HTMLElement, root: DirNode, options: TreeViewOptions): void {
  const items = root.children.map((child) => renderNode(child, 0, options));
  container.replaceChildren(...items);
}
