/** Hand-made tar blocks for tests: every field written explicitly, checksum computed like tar does. */

export interface BlockFields {
  name?: string;
  mode?: number;
  uid?: number | Buffer;
  gid?: number | Buffer;
  size?: number | Buffer;
  mtime?: number | Buffer;
  typeflag?: string;
  linkname?: string;
  uname?: string;
  gname?: string;
  devmajor?: number;
  devminor?: number;
  prefix?: string;
  format?: "ustar" | "gnu" | "v7";
  /** Overwrites the computed checksum field (as 8 raw bytes of text). */
  checksum?: string;
}

function octal(n: number, width: number): string {
  return `${n.toString(8).padStart(width - 1, "0")}\0`;
}

function put(block: Buffer, at: number, width: number, value: string | Buffer): void {
  const bytes = typeof value === "string" ? Buffer.from(value, "utf8") : value;
  if (bytes.length > width) throw new Error(`field at ${at} too long`);
  bytes.copy(block, at);
}

/** Base-256 (GNU) encoding of a non-negative or negative number in `width` bytes. */
export function base256(n: bigint, width: number): Buffer {
  const out = Buffer.alloc(width);
  let v = n < 0n ? (1n << BigInt(width * 8)) + n : n;
  for (let i = width - 1; i >= 0; i--) {
    out[i] = Number(v & 0xffn);
    v >>= 8n;
  }
  out[0] = n < 0n ? out[0]! | 0xc0 : out[0]! | 0x80;
  return out;
}

export function header(f: BlockFields): Buffer {
  const b = Buffer.alloc(512);
  const num = (at: number, width: number, v: number | Buffer | undefined) =>
    put(b, at, width, Buffer.isBuffer(v) ? v : octal(v ?? 0, width));
  put(b, 0, 100, f.name ?? "file");
  num(100, 8, f.mode ?? 0o644);
  num(108, 8, f.uid);
  num(116, 8, f.gid);
  num(124, 12, f.size);
  num(136, 12, f.mtime ?? 1_700_000_000);
  put(b, 156, 1, f.typeflag ?? "0");
  put(b, 157, 100, f.linkname ?? "");
  const format = f.format ?? "ustar";
  if (format === "ustar") put(b, 257, 8, "ustar\x0000");
  if (format === "gnu") put(b, 257, 8, "ustar  \0");
  if (format !== "v7") {
    put(b, 265, 32, f.uname ?? "root");
    put(b, 297, 32, f.gname ?? "root");
    num(329, 8, f.devmajor);
    num(337, 8, f.devminor);
  }
  if (f.prefix) put(b, 345, 155, f.prefix);
  b.fill(0x20, 148, 156);
  let sum = 0;
  for (const byte of b) sum += byte;
  put(b, 148, 8, f.checksum ?? `${sum.toString(8).padStart(6, "0")}\0 `);
  return b;
}

export function pad(data: Buffer): Buffer {
  const rest = data.length % 512;
  return rest === 0 ? data : Buffer.concat([data, Buffer.alloc(512 - rest)]);
}

/** One PAX record with its self-counting length prefix; the value may be any bytes. */
export function paxRecord(key: string, value: string | Buffer): Buffer {
  const body = Buffer.concat([Buffer.from(` ${key}=`), Buffer.from(value), Buffer.from("\n")]);
  let len = body.length + 1;
  while (String(len).length + body.length !== len) len = String(len).length + body.length;
  return Buffer.concat([Buffer.from(String(len)), body]);
}

/** A whole entry: header then padded data. */
export function entry(f: BlockFields, data: Buffer = Buffer.alloc(0)): Buffer {
  return Buffer.concat([header({ ...f, size: f.size ?? data.length }), pad(data)]);
}

export const END = Buffer.alloc(1024);
