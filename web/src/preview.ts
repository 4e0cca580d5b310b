// The terminal pane's Preview link: what a program in the project serves on a port, opened from the server's preview origin (`GET /api/config` says where), with the token the preview origin turns into its own cookie.
import type { ClientConfig } from './generated/client-config';

/**
 * The address of `project`'s preview of `port` on `previewUrl` (where `{project}` stands for the
 * project's name), with the token to log in.
 */
export function previewHref(
  previewUrl: string,
  project: string,
  port: number,
  token: string,
): string {
  const name = encodeURIComponent(project);
  const origin = previewUrl.replaceAll('{project}', name);
  return `${origin}/preview/${name}/${String(port)}/?token=${encodeURIComponent(token)}`;
}

/** Shows the Preview link once the server says where previews are; hidden when they are off. */
export async function mountPreviewLink(
  elements: { box: HTMLElement; port: HTMLInputElement; open: HTMLAnchorElement },
  project: string,
  token: string,
): Promise<void> {
  const response = await fetch('/api/config');
  if (!response.ok) {
    return;
  }
  const config = (await response.json()) as ClientConfig;
  const previewUrl = config.preview_url;
  if (previewUrl === null) {
    return;
  }
  const update = (): void => {
    const port = Number(elements.port.value);
    const valid = Number.isInteger(port) && port >= 1 && port <= 65535;
    elements.open.toggleAttribute('aria-disabled', !valid);
    if (valid) {
      elements.open.href = previewHref(previewUrl, project, port, token);
    } else {
      elements.open.removeAttribute('href');
    }
  };
  elements.port.addEventListener('input', update);
  update();
  elements.box.hidden = false;
}
