/**
 * Extent trees (Documentation/filesystems/ext4/ifork.rst): the root lives in i_block (up to 4
 * entries); more extents go to leaf blocks of 340 entries, and more leaves than 4 to index blocks.
 * Trees are packed full so e2fsck finds nothing to narrow or shorten.
 */

import { le16, le32 } from "../le.js";
import { crc32c } from "./crc32c.js";
import { BLOCK_SIZE } from "./layout.js";

const MAGIC = 0xf30a;
const MAX_LEN = 32768;
const IN_INODE = 4;
const PER_BLOCK = (BLOCK_SIZE - 12 - 4) / 12; // 340: header, entries, then the checksum tail

/** Logical blocks [logical, logical + length) stored at physical blocks [physical, …). */
export interface Run {
  logical: number;
  physical: number;
  length: number;
}

/** Splits runs into extents of at most 32768 blocks (the longest an initialized extent may be). */
export function toExtents(runs: readonly Run[]): Run[] {
  const out: Run[] = [];
  for (const r of runs) {
    for (let done = 0; done < r.length; done += MAX_LEN) {
      out.push({
        logical: r.logical + done,
        physical: r.physical + done,
        length: Math.min(MAX_LEN, r.length - done),
      });
    }
  }
  return out;
}

/** How many extents toExtents makes of these runs (counted, not built). */
export function extentCount(runs: readonly { length: number }[]): number {
  let n = 0;
  for (const r of runs) n += Math.ceil(r.length / MAX_LEN);
  return n;
}

/** Blocks the tree needs beyond the inode for `extents` extents. */
export function treeBlocks(extents: number): number {
  let total = 0;
  let n = extents;
  while (n > IN_INODE) {
    n = Math.ceil(n / PER_BLOCK);
    total += n;
  }
  return total;
}

function header(buf: Buffer, off: number, entries: number, max: number, depth: number): void {
  le16(buf, off, MAGIC);
  le16(buf, off + 2, entries);
  le16(buf, off + 4, max);
  le16(buf, off + 6, depth);
  le32(buf, off + 8, 0);
}

function put48(buf: Buffer, hiOff: number, loOff: number, v: number): void {
  le16(buf, hiOff, Math.floor(v / 2 ** 32));
  le32(buf, loOff, v % 2 ** 32);
}

/** A leaf entry: the extent itself. */
function writeLeaf(buf: Buffer, off: number, e: Run): void {
  le32(buf, off, e.logical);
  le16(buf, off + 4, e.length);
  put48(buf, off + 6, off + 8, e.physical);
}

interface Entry {
  logical: number;
  /** A leaf entry (extent) or an index entry (child block). */
  extent?: Run;
  child?: number;
}

function writeEntry(buf: Buffer, off: number, e: Entry): void {
  if (e.extent) {
    writeLeaf(buf, off, e.extent);
  } else {
    le32(buf, off, e.logical);
    put48(buf, off + 8, off + 4, e.child!);
    le16(buf, off + 10, 0);
  }
}

export interface ExtentTree {
  /** The 60 bytes of i_block. */
  root: Buffer;
  /** Tree blocks, to be written at `treeStart + i`. */
  blocks: Buffer[];
}

/**
 * Builds the tree for `extents` (sorted, from toExtents), with its blocks at treeStart…;
 * `inodeSeed` is the inode's checksum seed (for the tails of tree blocks). The root goes into
 * `root` (60 zeroed bytes, e.g. i_block inside an inode table) when given.
 */
export function buildTree(
  extents: readonly Run[],
  treeStart: number,
  inodeSeed: number,
  root: Buffer = Buffer.alloc(60),
): ExtentTree {
  if (extents.length <= IN_INODE) {
    // Nearly every inode: the extents fit in i_block, no tree blocks.
    header(root, 0, extents.length, IN_INODE, 0);
    for (let k = 0; k < extents.length; k++) writeLeaf(root, 12 + 12 * k, extents[k]!);
    return { root, blocks: [] };
  }
  let level: Entry[] = extents.map((e) => ({ logical: e.logical, extent: e }));
  const blocks: Buffer[] = [];
  let depth = 0;
  let next = treeStart;
  while (level.length > IN_INODE) {
    const parents: Entry[] = [];
    for (let i = 0; i < level.length; i += PER_BLOCK) {
      const chunk = level.slice(i, i + PER_BLOCK);
      const b = Buffer.alloc(BLOCK_SIZE);
      header(b, 0, chunk.length, PER_BLOCK, depth);
      for (const [k, e] of chunk.entries()) writeEntry(b, 12 + 12 * k, e);
      const tail = 12 + 12 * PER_BLOCK;
      b.writeUInt32LE(crc32c(inodeSeed, b, 0, tail), tail);
      blocks.push(b);
      parents.push({ logical: chunk[0]!.logical, child: next++ });
    }
    level = parents;
    depth++;
  }
  header(root, 0, level.length, IN_INODE, depth);
  for (const [k, e] of level.entries()) writeEntry(root, 12 + 12 * k, e);
  return { root, blocks };
}
