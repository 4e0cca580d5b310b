// Decodes (without verifying) the payload of the HS256 JWT the page was opened with, for display only.

export type Role = 'editor' | 'viewer';

/** The claims the collab server puts into its tokens. */
export interface Claims {
  /** User id. */
  sub: string;
  /** Display name. */
  name: string;
  project: string;
  role: Role;
  /** Expiry, unix seconds. */
  exp: number;
}

export type TokenResult = { ok: true; claims: Claims } | { ok: false; error: string };

function base64UrlDecode(segment: string): Uint8Array {
  const b64 = segment.replace(/-/g, '+').replace(/_/g, '/');
  const padded = b64 + '='.repeat((4 - (b64.length % 4)) % 4);
  const binary = atob(padded);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) {
    bytes[i] = binary.charCodeAt(i);
  }
  return bytes;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** Decodes the payload of `token`; the signature is the server's business, not the page's. */
export function decodeToken(token: string): TokenResult {
  const parts = token.split('.');
  if (parts.length !== 3 || parts[1] === undefined || parts[1] === '') {
    return { ok: false, error: 'The token in the link is not a JWT.' };
  }
  let payload: unknown;
  try {
    payload = JSON.parse(new TextDecoder().decode(base64UrlDecode(parts[1])));
  } catch {
    return { ok: false, error: 'The token in the link cannot be decoded.' };
  }
  if (!isRecord(payload)) {
    return { ok: false, error: 'The token in the link has no claims.' };
  }
  const { sub, name, project, role, exp } = payload;
  if (typeof sub !== 'string' || typeof project !== 'string' || typeof exp !== 'number') {
    return { ok: false, error: 'The token in the link lacks the sub, project or exp claim.' };
  }
  if (role !== 'editor' && role !== 'viewer') {
    return { ok: false, error: 'The token in the link has an unknown role.' };
  }
  const displayName = typeof name === 'string' && name.trim() !== '' ? name : sub;
  return { ok: true, claims: { sub, name: displayName, project, role, exp } };
}

/** Seconds until the token expires (negative once it has). */
export function secondsLeft(claims: Claims, nowMs: number = Date.now()): number {
  return claims.exp - nowMs / 1000;
}
