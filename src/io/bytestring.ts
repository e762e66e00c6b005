/**
 * Byte strings: JS strings whose code units are bytes (0–255, "latin1"). Names on Linux are bytes,
 * not text, so names and link targets from tar archives travel as byte strings from the tar reader
 * to the writers: they compare and sort as their bytes, two distinct names never collapse into one,
 * and a writer gets the exact bytes back with `toBytes`. V8 keeps such strings one byte per
 * character. Only messages decode them (`quoteBytes`); text from JSON or the command line becomes a
 * byte string with `fromText`.
 */

/** The byte string of `bytes`. */
export function fromBytes(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("latin1");
}

/** The bytes a byte string stands for. */
export function toBytes(s: string): Buffer {
  return Buffer.from(s, "latin1");
}

/** Text (a UTF-16 JS string) as the byte string of its UTF-8 encoding. */
export function fromText(text: string): string {
  return Buffer.from(text, "utf8").toString("latin1");
}

/** The text a byte string holds when its bytes are UTF-8; undefined when they are not. */
export function toText(s: string): string | undefined {
  if (/^[\x00-\x7f]*$/.test(s)) return s;
  try {
    return STRICT_UTF8.decode(toBytes(s));
  } catch {
    return undefined;
  }
}

const STRICT_UTF8 = new TextDecoder("utf-8", { fatal: true });

/**
 * A byte string as a message shows it, safe to print: UTF-8 names read as themselves; control
 * characters, and each byte above 0x7f of a name that is not UTF-8, show as `\xNN`.
 */
export function showBytes(s: string): string {
  const text = toText(s) ?? s.replace(/[\x80-\xff]/g, hexByte);
  return text.replace(/[\x00-\x1f\x7f]/g, hexByte);
}

function hexByte(c: string): string {
  return `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`;
}

/** showBytes in double quotes, for a name inside a sentence. */
export function quoteBytes(s: string): string {
  return `"${showBytes(s).replace(/"/g, '\\"')}"`;
}
