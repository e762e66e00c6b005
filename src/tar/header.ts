/**
 * Tar header decoding: one 512-byte block at a time (ustar, GNU, v7), PAX extended headers and GNU
 * long names folded into the entry they describe. No I/O here: the scanner and the streaming reader
 * feed blocks and meta-entry data in and get plain headers out. Names stay bytes, as byte strings
 * (src/io/bytestring.ts); xattr values stay Buffers (often binary: `security.capability`).
 */
import { KilnError } from "../errors.js";

export const BLOCK_SIZE = 512;
/** Largest PAX header or GNU long name/link data accepted; Go's archive/tar uses 1 MiB. */
export const MAX_META_SIZE = 8 * 1024 * 1024;

export type EntryType =
  | "file"
  | "hardlink"
  | "symlink"
  | "char"
  | "block"
  | "directory"
  | "fifo"
  | "pax"
  | "pax-global"
  | "gnu-longname"
  | "gnu-longlink"
  | "other";

export type HeaderFormat = "ustar" | "gnu" | "v7";

export interface SparseRegion {
  readonly offset: number;
  readonly size: number;
}

/**
 * A sparse file's description. The data stored in the archive is only the listed regions (and, for
 * pax-1.0, the map itself first); `realSize` is the file's logical size.
 */
export interface SparseInfo {
  /** gnu-old: typeflag `S`, map in the header and extension blocks; pax-*: GNU tar's PAX variants. */
  readonly format: "gnu-old" | "pax-0.0" | "pax-0.1" | "pax-1.0";
  readonly realSize: number;
  /** The regions known from headers; empty for pax-1.0 (the map leads the data). */
  readonly map: SparseRegion[];
  /** gnu-old only: extension blocks (see parseSparseExtension) follow the header before the data. */
  readonly isExtended: boolean;
}

/** What one header block says, before any PAX / GNU long-name entry is applied. */
export interface HeaderBlock {
  readonly name: string;
  readonly mode: number;
  readonly uid: number;
  readonly gid: number;
  readonly size: number;
  readonly mtime: number;
  /** The raw type character (`"\0"` for old regular files). */
  readonly typeflag: string;
  readonly type: EntryType;
  readonly linkname: string;
  readonly uname: string;
  readonly gname: string;
  readonly devmajor: number;
  readonly devminor: number;
  readonly format: HeaderFormat;
  /** For GNU `S` entries. */
  readonly sparse: SparseInfo | undefined;
}

/** A complete entry header: the block with every extended header that preceded it applied. */
export interface TarHeader {
  /** The entry's path and link target as byte strings (src/io/bytestring.ts). */
  readonly path: string;
  readonly linkpath: string;
  readonly typeflag: string;
  readonly type: EntryType;
  readonly mode: number;
  readonly uid: number;
  readonly gid: number;
  /** The entry's size field (PAX `size` wins); see entryDataSize for the bytes that follow it. */
  readonly size: number;
  /** Seconds since the epoch (floor) and the nanoseconds after them (PAX fractions). */
  readonly mtime: number;
  readonly mtimeNsec: number;
  readonly uname: string;
  readonly gname: string;
  readonly devmajor: number;
  readonly devminor: number;
  /** `SCHILY.xattr.*` and `LIBARCHIVE.xattr.*`: name → raw value bytes. */
  readonly xattrs: Map<string, Buffer>;
  /** PAX records kiln does not interpret itself (e.g. `atime`, `GNU.sparse.*`), as byte strings. */
  readonly pax: Map<string, string>;
  readonly sparse: SparseInfo | undefined;
  readonly format: HeaderFormat;
}

/** Shared by every header without xattrs or other PAX records: headers are never modified. */
const NO_XATTRS = new Map<string, Buffer>();
const NO_PAX = new Map<string, string>();

function invalid(message: string): KilnError {
  return new KilnError("INVALID_ARCHIVE", message);
}

const TYPES: Record<string, EntryType> = {
  "\0": "file",
  "0": "file",
  "7": "file", // contiguous file: a regular file everywhere that matters
  "1": "hardlink",
  "2": "symlink",
  "3": "char",
  "4": "block",
  "5": "directory",
  "6": "fifo",
  x: "pax",
  g: "pax-global",
  L: "gnu-longname",
  K: "gnu-longlink",
  S: "file",
};

/** Types whose size field does not count data bytes in the archive (as Go's archive/tar). */
const HEADER_ONLY = new Set<EntryType>(["hardlink", "symlink", "char", "block", "directory", "fifo"]);

export function isZeroBlock(block: Buffer): boolean {
  for (let i = 0; i < BLOCK_SIZE; i++) if (block[i] !== 0) return false;
  return true;
}

/** Bytes the entry occupies after its header, padding included. */
export function paddedSize(size: number): number {
  return Math.ceil(size / BLOCK_SIZE) * BLOCK_SIZE;
}

/**
 * Data bytes that follow the header(s) of an entry in the archive (0 for links, devices, dirs). The
 * raw type decides, as in Go's archive/tar: an old-style file that a trailing "/" makes a directory
 * still has its data skipped, so that data is never read as headers.
 */
export function entryDataSize(h: { typeflag: string; size: number }): number {
  return HEADER_ONLY.has(TYPES[h.typeflag] ?? "other") ? 0 : h.size;
}

/** Whether the entry only carries data for the next one (PAX, GNU long name/link). */
export function isMetaEntry(h: { type: EntryType }): boolean {
  return (
    h.type === "pax" || h.type === "pax-global" || h.type === "gnu-longname" || h.type === "gnu-longlink"
  );
}

/** Bytes up to the first NUL, as a byte string (names are bytes: src/io/bytestring.ts). */
function text(block: Buffer, start: number, length: number): string {
  const field = block.subarray(start, start + length);
  const nul = field.indexOf(0);
  return field.subarray(0, nul < 0 ? field.length : nul).toString("latin1");
}

/**
 * A numeric field: octal text (padded with spaces or NULs), or GNU/star base-256 when the first
 * byte has its high bit set (two's complement, sign in bit 6 of the first byte).
 */
export function parseNumeric(field: Buffer, what = "numeric field"): number {
  if (field.length > 0 && (field[0]! & 0x80) !== 0) {
    const negative = (field[0]! & 0x40) !== 0;
    let x = 0n;
    for (let i = 0; i < field.length; i++) {
      let c = negative ? field[i]! ^ 0xff : field[i]!;
      if (i === 0) c &= 0x7f;
      x = (x << 8n) | BigInt(c);
    }
    const value = negative ? -x - 1n : x;
    if (value > BigInt(Number.MAX_SAFE_INTEGER) || value < BigInt(Number.MIN_SAFE_INTEGER)) {
      throw invalid(`tar header: ${what} out of range (base-256 ${value})`);
    }
    return Number(value);
  }
  let start = 0;
  let end = field.length;
  while (start < end && (field[start] === 0x20 || field[start] === 0)) start++;
  while (end > start && (field[end - 1] === 0x20 || field[end - 1] === 0)) end--;
  if (start === end) return 0;
  let value = 0;
  for (let i = start; i < end; i++) {
    const c = field[i]!;
    if (c < 0x30 || c > 0x37) {
      throw invalid(
        `tar header: bad ${what} ${JSON.stringify(field.subarray(start, end).toString("latin1"))}`,
      );
    }
    value = value * 8 + (c - 0x30);
  }
  if (!Number.isSafeInteger(value)) throw invalid(`tar header: ${what} out of range`);
  return value;
}

function nonNegative(block: Buffer, start: number, length: number, what: string): number {
  const n = parseNumeric(block.subarray(start, start + length), what);
  if (n < 0) throw invalid(`tar header: negative ${what} ${n}`);
  return n;
}

/** Verifies the header checksum: the unsigned sum of the block with the checksum field as spaces (signed sums, from old tars, are accepted too). */
export function checksumMatches(block: Buffer): boolean {
  const field = block.subarray(148, 156);
  let start = 0;
  let end = field.length;
  while (start < end && field[start] === 0x20) start++;
  while (end > start && (field[end - 1] === 0x20 || field[end - 1] === 0)) end--;
  if (start === end) return false;
  let stored = 0;
  for (let i = start; i < end; i++) {
    const c = field[i]!;
    if (c < 0x30 || c > 0x37) return false;
    stored = stored * 8 + (c - 0x30);
  }
  let unsigned = 0;
  let signed = 0;
  for (let i = 0; i < BLOCK_SIZE; i++) {
    const b = i >= 148 && i < 156 ? 0x20 : block[i]!;
    unsigned += b;
    signed += b > 127 ? b - 256 : b;
  }
  return stored === unsigned || stored === signed;
}

function sparseEntries(block: Buffer, start: number, count: number, into: SparseRegion[]): void {
  for (let i = 0; i < count; i++) {
    const at = start + i * 24;
    if (block[at] === 0) break;
    into.push({
      offset: nonNegative(block, at, 12, "sparse offset"),
      size: nonNegative(block, at + 12, 12, "sparse size"),
    });
  }
}

/**
 * Decodes one header block; null for an all-zero block (end of archive). A bad checksum or a bad
 * numeric field → INVALID_ARCHIVE. `where` (e.g. "offset 1024") goes into messages.
 */
export function parseHeaderBlock(block: Buffer, where = ""): HeaderBlock | null {
  if (block.length < BLOCK_SIZE) throw invalid(`tar header${where ? ` at ${where}` : ""}: short block`);
  if (isZeroBlock(block)) return null;
  if (!checksumMatches(block)) {
    throw invalid(`not a tar archive or corrupt: bad header checksum${where ? ` at ${where}` : ""}`);
  }
  try {
    return decodeBlock(block, where);
  } catch (err) {
    if (where && err instanceof KilnError && err.code === "INVALID_ARCHIVE") {
      throw invalid(`${err.message} (header at ${where})`);
    }
    throw err;
  }
}

function decodeBlock(block: Buffer, where: string): HeaderBlock {
  const magic = block.subarray(257, 263).toString("latin1");
  const version = block.subarray(263, 265).toString("latin1");
  const format: HeaderFormat =
    magic === "ustar\0" ? "ustar" : magic === "ustar " && version === " \0" ? "gnu" : "v7";
  let name = text(block, 0, 100);
  if (format === "ustar") {
    const prefix = text(block, 345, 155);
    if (prefix) name = `${prefix}/${name}`;
  }
  const typeflag = String.fromCharCode(block[156]!);
  // Never classified by the name field here: a long name's first 100 bytes may end in "/" (see finish).
  const type: EntryType = TYPES[typeflag] ?? "other";
  let sparse: SparseInfo | undefined;
  if (typeflag === "S") {
    // The old sparse map lives in GNU-only header fields; elsewhere they mean something else.
    if (format !== "gnu")
      throw invalid(`tar header${where ? ` at ${where}` : ""}: GNU sparse entry in a ${format} header`);
    const map: SparseRegion[] = [];
    sparseEntries(block, 386, 4, map);
    sparse = {
      format: "gnu-old",
      realSize: nonNegative(block, 483, 12, "sparse real size"),
      map,
      isExtended: block[482] !== 0,
    };
  }
  const hasIds = format !== "v7";
  return {
    name,
    mode: nonNegative(block, 100, 8, "mode"),
    uid: nonNegative(block, 108, 8, "uid"),
    gid: nonNegative(block, 116, 8, "gid"),
    size: nonNegative(block, 124, 12, "size"),
    mtime: parseNumeric(block.subarray(136, 148), "mtime"),
    typeflag,
    type,
    linkname: text(block, 157, 100),
    uname: hasIds ? text(block, 265, 32) : "",
    gname: hasIds ? text(block, 297, 32) : "",
    devmajor: hasIds ? nonNegative(block, 329, 8, "device major") : 0,
    devminor: hasIds ? nonNegative(block, 337, 8, "device minor") : 0,
    format,
    sparse,
  };
}

/** Decodes a GNU sparse extension block: 21 more regions and whether another block follows. */
export function parseSparseExtension(block: Buffer): { map: SparseRegion[]; isExtended: boolean } {
  if (block.length < BLOCK_SIZE) throw invalid("tar: short sparse extension block");
  const map: SparseRegion[] = [];
  sparseEntries(block, 0, 21, map);
  return { map, isExtended: block[504] !== 0 };
}

/** One PAX record; the value stays bytes. */
export interface PaxRecord {
  readonly key: string;
  readonly value: Buffer;
}

/**
 * Parses PAX extended header data: records `LEN KEY=VALUE\n`, LEN counting the whole record in
 * bytes. Values are sliced by length, so NUL, newline and 0xff bytes in them are kept. Order and
 * repeats are kept (GNU sparse 0.0 repeats keys). Trailing NUL padding is tolerated.
 */
export function parsePax(data: Buffer): PaxRecord[] {
  const records: PaxRecord[] = [];
  let pos = 0;
  while (pos < data.length) {
    if (data[pos] === 0) {
      for (let i = pos; i < data.length; i++)
        if (data[i] !== 0) throw invalid("PAX header: data after padding");
      break;
    }
    const space = data.indexOf(0x20, pos);
    const lengthText = space < 0 ? "" : data.subarray(pos, space).toString("latin1");
    if (!/^[0-9]{1,9}$/.test(lengthText)) throw invalid("PAX header: bad record length");
    const length = Number(lengthText);
    const end = pos + length;
    if (length <= lengthText.length + 1 || end > data.length)
      throw invalid("PAX header: record overruns header");
    if (data[end - 1] !== 0x0a) throw invalid("PAX header: record not terminated by a newline");
    const eq = data.indexOf(0x3d, space + 1);
    if (eq < 0 || eq >= end - 1 || eq === space + 1) throw invalid("PAX header: record without key=value");
    records.push({
      key: data.subarray(space + 1, eq).toString("utf8"),
      value: Buffer.from(data.subarray(eq + 1, end - 1)),
    });
    pos = end;
  }
  return records;
}

const SCHILY_XATTR = "SCHILY.xattr.";
const LIBARCHIVE_XATTR = "LIBARCHIVE.xattr.";

function paxInteger(key: string, value: string): number {
  if (!/^[0-9]{1,16}$/.test(value) || !Number.isSafeInteger(Number(value))) {
    throw invalid(`PAX header: bad ${key} "${value.slice(0, 40)}"`);
  }
  return Number(value);
}

/** PAX times: `[-]SECONDS[.FRACTION]` → floor seconds and nanoseconds after them. */
export function parsePaxTime(value: string): { sec: number; nsec: number } {
  const m = /^(-?)([0-9]{1,15})(?:\.([0-9]*))?$/.exec(value);
  if (!m) throw invalid(`PAX header: bad time "${value.slice(0, 40)}"`);
  const whole = Number(m[2]);
  const nsec = Number((m[3] ?? "").slice(0, 9).padEnd(9, "0"));
  if (m[1] !== "-") return { sec: whole, nsec };
  return nsec === 0 ? { sec: -whole, nsec: 0 } : { sec: -whole - 1, nsec: 1e9 - nsec };
}

/** libarchive writes xattr names %-encoded (RFC 3986) and values base64-encoded. */
function decodeLibarchiveName(name: string): string {
  try {
    return decodeURIComponent(name);
  } catch {
    throw invalid(`PAX header: bad LIBARCHIVE.xattr name "${name.slice(0, 60)}"`);
  }
}

/**
 * Folds meta entries into the entry that follows them. Feed each header block in order: a meta
 * entry (isMetaEntry) goes to `absorb` with its data, any other to `finish`, which returns the
 * entry's full header and forgets the local extended headers (global ones stay).
 */
export class HeaderAssembler {
  private global: PaxRecord[] = [];
  private local: PaxRecord[] | undefined;
  private longName: string | undefined;
  private longLink: string | undefined;

  /** Whether meta entries were absorbed that no entry has used yet (an archive must not end here). */
  get pending(): boolean {
    return this.local !== undefined || this.longName !== undefined || this.longLink !== undefined;
  }

  /** Checks a meta entry's size before its data is read: absurd sizes never get buffered. */
  static checkMetaSize(h: HeaderBlock, where = ""): void {
    if (h.size > MAX_META_SIZE) {
      throw invalid(
        `tar: ${h.type} entry${where ? ` at ${where}` : ""} is ${h.size} bytes (limit ${MAX_META_SIZE})`,
      );
    }
  }

  absorb(h: HeaderBlock, data: Buffer): void {
    HeaderAssembler.checkMetaSize(h);
    if (data.length !== h.size)
      throw invalid(`tar: ${h.type} entry data is ${data.length} bytes, header says ${h.size}`);
    switch (h.type) {
      case "pax":
        this.local = [...(this.local ?? []), ...parsePax(data)];
        return;
      case "pax-global":
        this.global = [...this.global, ...parsePax(data)];
        return;
      case "gnu-longname":
        this.longName = cString(data);
        return;
      case "gnu-longlink":
        this.longLink = cString(data);
        return;
      default:
        throw new KilnError("INTERNAL", `HeaderAssembler.absorb given a ${h.type} entry`);
    }
  }

  finish(h: HeaderBlock): TarHeader {
    if (isMetaEntry(h)) throw new KilnError("INTERNAL", `HeaderAssembler.finish given a ${h.type} entry`);
    const local = this.local ?? [];
    // Later records win; an empty local value restores the header's own field (POSIX), except for
    // xattrs, where GNU tar writes empty values for xattrs that exist and are empty.
    const records = new Map<string, string>();
    const xattrs = new Map<string, Buffer>();
    const schily = new Map<string, Buffer>();
    const sparseOffsets: number[] = [];
    const sparseSizes: number[] = [];
    for (const [i, r] of [...this.global, ...local].entries()) {
      const isLocal = i >= this.global.length;
      if (r.key.startsWith(SCHILY_XATTR)) {
        const name = r.key.slice(SCHILY_XATTR.length);
        if (r.value.length > 0 || isLocal) schily.set(name, r.value);
        else schily.delete(name);
      } else if (r.key.startsWith(LIBARCHIVE_XATTR)) {
        const name = decodeLibarchiveName(r.key.slice(LIBARCHIVE_XATTR.length));
        const encoded = r.value.toString("latin1");
        if (!/^[A-Za-z0-9+/]*={0,2}$/.test(encoded)) throw invalid(`PAX header: xattr ${name} is not base64`);
        if (r.value.length > 0 || isLocal) xattrs.set(name, Buffer.from(encoded, "base64"));
        else xattrs.delete(name);
      } else if (r.key === "GNU.sparse.offset") {
        sparseOffsets.push(paxInteger(r.key, r.value.toString("utf8")));
      } else if (r.key === "GNU.sparse.numbytes") {
        sparseSizes.push(paxInteger(r.key, r.value.toString("utf8")));
      } else {
        // Bytes, not text: a path needs no valid UTF-8 (GNU tar writes what the filesystem holds).
        const value = r.value.toString("latin1");
        if (value === "") records.delete(r.key);
        else records.set(r.key, value);
      }
    }
    for (const [name, value] of schily) xattrs.set(name, value);

    let path = h.name;
    let linkpath = h.linkname;
    let { size, uid, gid, uname, gname } = h;
    let mtime = h.mtime;
    let mtimeNsec = 0;
    const pax = new Map<string, string>();
    for (const [key, value] of records) {
      switch (key) {
        case "path":
          path = value;
          break;
        case "linkpath":
          linkpath = value;
          break;
        case "size":
          size = paxInteger(key, value);
          break;
        case "uid":
          uid = paxInteger(key, value);
          break;
        case "gid":
          gid = paxInteger(key, value);
          break;
        case "uname":
          uname = value;
          break;
        case "gname":
          gname = value;
          break;
        case "mtime": {
          const t = parsePaxTime(value);
          mtime = t.sec;
          mtimeNsec = t.nsec;
          break;
        }
        default:
          pax.set(key, value);
      }
    }
    // As Go's archive/tar: a GNU long name or link beats both the block and PAX.
    if (this.longName !== undefined) path = this.longName;
    if (this.longLink !== undefined) linkpath = this.longLink;
    const sparse = h.sparse ?? paxSparse(pax, sparseOffsets, sparseSizes);
    if (sparse !== undefined && sparse.format !== "gnu-old") {
      const realName = pax.get("GNU.sparse.name");
      if (realName) path = realName;
    }
    this.local = undefined;
    this.longName = undefined;
    this.longLink = undefined;
    // v7 marks a directory by a trailing slash on a type "\0" entry; only the final path can say
    // so, and only for that type (Go's archive/tar and Python's tarfile agree; a "0" stays a file).
    const type = h.typeflag === "\0" && path.endsWith("/") ? "directory" : h.type;
    return {
      path,
      linkpath,
      typeflag: h.typeflag,
      type,
      mode: h.mode,
      uid,
      gid,
      size,
      mtime,
      mtimeNsec,
      uname,
      gname,
      devmajor: h.devmajor,
      devminor: h.devminor,
      // Most entries have neither: one shared empty map each instead of two per entry (big images
      // hold every header until the merge).
      xattrs: xattrs.size > 0 ? xattrs : NO_XATTRS,
      pax: pax.size > 0 ? pax : NO_PAX,
      sparse,
      format: h.format,
    };
  }
}

/** GNU long name/link data: a NUL-terminated byte string (the NUL counted in the size). */
function cString(data: Buffer): string {
  const nul = data.indexOf(0);
  return data.subarray(0, nul < 0 ? data.length : nul).toString("latin1");
}

/** Recognizes GNU tar's PAX sparse formats (0.0, 0.1, 1.0) from the records of an entry. */
function paxSparse(pax: Map<string, string>, offsets: number[], sizes: number[]): SparseInfo | undefined {
  const major = pax.get("GNU.sparse.major");
  const minor = pax.get("GNU.sparse.minor");
  const realSizeText = pax.get("GNU.sparse.realsize") ?? pax.get("GNU.sparse.size");
  if (major === "1" && minor === "0") {
    return {
      format: "pax-1.0",
      realSize: paxInteger("GNU.sparse.realsize", realSizeText ?? ""),
      map: [],
      isExtended: false,
    };
  }
  const mapText = pax.get("GNU.sparse.map");
  if (mapText !== undefined) {
    const numbers = mapText === "" ? [] : mapText.split(",").map((n) => paxInteger("GNU.sparse.map", n));
    if (numbers.length % 2 !== 0) throw invalid("PAX header: GNU.sparse.map has an odd count of numbers");
    const map: SparseRegion[] = [];
    for (let i = 0; i < numbers.length; i += 2) map.push({ offset: numbers[i]!, size: numbers[i + 1]! });
    return {
      format: "pax-0.1",
      realSize: paxInteger("GNU.sparse.size", realSizeText ?? ""),
      map,
      isExtended: false,
    };
  }
  if (offsets.length > 0 || sizes.length > 0) {
    if (offsets.length !== sizes.length)
      throw invalid("PAX header: GNU.sparse.offset/numbytes do not pair up");
    return {
      format: "pax-0.0",
      realSize: paxInteger("GNU.sparse.size", realSizeText ?? ""),
      map: offsets.map((offset, i) => ({ offset, size: sizes[i]! })),
      isExtended: false,
    };
  }
  return undefined;
}
