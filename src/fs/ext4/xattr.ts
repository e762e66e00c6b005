/**
 * Extended attributes (Documentation/filesystems/ext4/attributes.rst): names are stored as a
 * prefix index plus the rest; entries go in the inode after i_extra_isize while they fit, the
 * others in one attribute block (shared by inodes with identical ones). POSIX ACLs are stored in
 * ext4's own compact format, not the xattr format tar carries.
 */

import { KilnError } from "../../errors.js";
import { crc32c } from "./crc32c.js";
import { BLOCK_SIZE, INODE_SIZE } from "./layout.js";
import { EXTRA_ISIZE } from "./superblock.js";

const MAGIC = 0xea020000;
const PREFIXES: [string, number][] = [
  ["user.", 1],
  ["trusted.", 4],
  ["security.", 6],
  ["system.", 7],
];
const ACL_ACCESS = "system.posix_acl_access";
const ACL_DEFAULT = "system.posix_acl_default";
/** In-inode area: after the 128 + 32 byte inode and the 4-byte magic. */
const IBODY_START = 128 + EXTRA_ISIZE;
const IBODY_SPACE = INODE_SIZE - IBODY_START - 4;
const BLOCK_HEADER = 32;
const MAX_REFCOUNT = 1024;

export interface XattrEntry {
  index: number;
  name: Buffer;
  value: Buffer;
}

const entrySize = (e: XattrEntry) => (16 + e.name.length + 3) & ~3;
const valueSize = (e: XattrEntry) => (e.value.length + 3) & ~3;

/** Converts a POSIX ACL from the xattr format (version 2, 8-byte entries) to ext4's (version 1). */
function ext4Acl(value: Buffer, where: string): Buffer {
  if (value.length < 4 || (value.length - 4) % 8 !== 0 || value.readUInt32LE(0) !== 2) {
    throw new KilnError("INVALID_ARCHIVE", `${where}: malformed POSIX ACL xattr`);
  }
  const parts: Buffer[] = [Buffer.from([1, 0, 0, 0])];
  for (let off = 4; off < value.length; off += 8) {
    const tag = value.readUInt16LE(off);
    const perm = value.readUInt16LE(off + 2);
    // ACL_USER (2) and ACL_GROUP (8) carry an id; the others are short.
    const full = tag === 2 || tag === 8;
    const e = Buffer.alloc(full ? 8 : 4);
    e.writeUInt16LE(tag, 0);
    e.writeUInt16LE(perm, 2);
    if (full) e.writeUInt32LE(value.readUInt32LE(off + 4), 4);
    parts.push(e);
  }
  return Buffer.concat(parts);
}

/** The inode's attributes as ext4 entries, in the order the kernel keeps them (index, name length, name). */
export function encodeXattrs(xattrs: ReadonlyMap<string, Buffer>, where: string): XattrEntry[] {
  const out: XattrEntry[] = [];
  for (const [full, value] of xattrs) {
    let e: XattrEntry | undefined;
    if (full === ACL_ACCESS) e = { index: 2, name: Buffer.alloc(0), value: ext4Acl(value, where) };
    else if (full === ACL_DEFAULT) e = { index: 3, name: Buffer.alloc(0), value: ext4Acl(value, where) };
    else {
      for (const [prefix, index] of PREFIXES) {
        if (full.startsWith(prefix) && full.length > prefix.length) {
          e = { index, name: Buffer.from(full.slice(prefix.length), "utf8"), value };
          break;
        }
      }
    }
    if (!e || e.name.length > 255) {
      throw new KilnError(
        "UNSUPPORTED_ARCHIVE",
        `${where}: extended attribute ${JSON.stringify(full)} cannot be stored in ext4`,
      );
    }
    out.push(e);
  }
  return out.sort(
    (a, b) => a.index - b.index || a.name.length - b.name.length || Buffer.compare(a.name, b.name),
  );
}

export interface XattrPlacement {
  inline: XattrEntry[];
  block: XattrEntry[];
}

/** Fills the inode first (in order, while entries fit), the rest go to the block. */
export function placeXattrs(entries: readonly XattrEntry[], where: string): XattrPlacement {
  const inline: XattrEntry[] = [];
  const block: XattrEntry[] = [];
  let ibody = 0;
  let blk = 0;
  for (const e of entries) {
    const need = entrySize(e) + valueSize(e);
    if (ibody + need + 4 <= IBODY_SPACE) {
      inline.push(e);
      ibody += need;
    } else {
      block.push(e);
      blk += need;
    }
  }
  if (BLOCK_HEADER + blk + 4 > BLOCK_SIZE) {
    throw new KilnError(
      "UNSUPPORTED_ARCHIVE",
      `${where}: extended attributes exceed one ext4 block (${blk} bytes)`,
    );
  }
  return { inline, block };
}

/** Identity of a block's content, for sharing identical attribute blocks. */
export function blockKey(entries: readonly XattrEntry[]): string {
  return entries.map((e) => `${e.index}:${e.name.toString("hex")}=${e.value.toString("hex")}`).join(",");
}

export { MAX_REFCOUNT as MAX_XATTR_REFCOUNT };

/**
 * Writes entries and values into `area` (entries from `entriesAt`, values from the end down,
 * offsets relative to `base`); returns the entry hashes.
 */
function writeEntries(
  area: Buffer,
  entriesAt: number,
  base: number,
  entries: readonly XattrEntry[],
  hash: boolean,
): number[] {
  let off = entriesAt;
  let valEnd = area.length;
  const hashes: number[] = [];
  for (const e of entries) {
    let valueOffs = 0;
    if (e.value.length > 0) {
      valEnd -= valueSize(e);
      e.value.copy(area, valEnd);
      valueOffs = valEnd - base;
    }
    area.writeUInt8(e.name.length, off);
    area.writeUInt8(e.index, off + 1);
    area.writeUInt16LE(valueOffs, off + 2);
    area.writeUInt32LE(0, off + 4);
    area.writeUInt32LE(e.value.length, off + 8);
    const h = hash ? entryHash(e) : 0;
    area.writeUInt32LE(h, off + 12);
    hashes.push(h);
    e.name.copy(area, off + 16);
    off += entrySize(e);
  }
  return hashes;
}

/** ext4_xattr_hash_entry: name bytes (unsigned) then the value's 32-bit words. */
function entryHash(e: XattrEntry): number {
  let h = 0;
  for (const c of e.name) h = ((h << 5) ^ (h >>> 27) ^ c) >>> 0;
  const padded = Buffer.alloc(valueSize(e));
  e.value.copy(padded);
  for (let i = 0; i < padded.length; i += 4) h = ((h << 16) ^ (h >>> 16) ^ padded.readUInt32LE(i)) >>> 0;
  return h;
}

/** Writes the in-inode attributes into a 256-byte inode buffer. */
export function writeInlineXattrs(inode: Buffer, entries: readonly XattrEntry[]): void {
  if (entries.length === 0) return;
  inode.writeUInt32LE(MAGIC, IBODY_START);
  // Value offsets count from the first entry, right after the magic.
  const area = inode.subarray(IBODY_START + 4, INODE_SIZE);
  writeEntries(area, 0, 0, entries, false);
}

/** An attribute block with `refcount` users, sealed for block number `blockNr`. */
export function buildXattrBlock(
  entries: readonly XattrEntry[],
  refcount: number,
  blockNr: number,
  fsSeed: number,
): Buffer {
  const b = Buffer.alloc(BLOCK_SIZE);
  b.writeUInt32LE(MAGIC, 0);
  b.writeUInt32LE(refcount, 4);
  b.writeUInt32LE(1, 8); // h_blocks
  const hashes = writeEntries(b, BLOCK_HEADER, 0, entries, true);
  let h = 0;
  for (const eh of hashes) {
    if (eh === 0) {
      h = 0; // as ext4_xattr_rehash: one unhashed entry leaves the block unhashed
      break;
    }
    h = ((h << 16) ^ (h >>> 16) ^ eh) >>> 0;
  }
  b.writeUInt32LE(h, 12);
  const nr = Buffer.alloc(8);
  nr.writeUInt32LE(blockNr % 2 ** 32, 0);
  nr.writeUInt32LE(Math.floor(blockNr / 2 ** 32), 4);
  let c = crc32c(fsSeed, nr);
  c = crc32c(c, b); // h_checksum (offset 16) is still zero here
  b.writeUInt32LE(c, 16);
  return b;
}
