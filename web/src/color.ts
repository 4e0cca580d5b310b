// Derives a stable cursor colour for a user from their user id, so every tab shows a user in the same colour.

/** Cursor colours in the form y-codemirror.next expects: `#rrggbb` and a translucent `#rrggbbaa`. */
export interface UserColor {
  color: string;
  colorLight: string;
}

function hash(text: string): number {
  // FNV-1a, 32 bit: cheap and well spread for short ids.
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

function hslToHex(hue: number, saturation: number, lightness: number): string {
  const s = saturation / 100;
  const l = lightness / 100;
  const a = s * Math.min(l, 1 - l);
  const channel = (n: number): string => {
    const k = (n + hue / 30) % 12;
    const value = l - a * Math.max(-1, Math.min(k - 3, 9 - k, 1));
    return Math.round(value * 255)
      .toString(16)
      .padStart(2, '0');
  };
  return `#${channel(0)}${channel(8)}${channel(4)}`;
}

export function userColor(userId: string): UserColor {
  const hue = hash(userId) % 360;
  const color = hslToHex(hue, 70, 42);
  return { color, colorLight: `${color}33` };
}
