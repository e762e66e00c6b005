/**
 * Directory blocks (Documentation/filesystems/ext4/directory.rst): linear dirent2 blocks for a
 * directory that fits in one block, an htree (dx_root, optional interior nodes, hash-ordered
 * leaves) beyond that, so lookups in big directories stay fast. Every block carries its
 * metadata_csum tail.
 */

import { KilnError } from "../../errors.js";
import { le16, le32 } from "../le.js";
import { crc32c, crc32cZeros } from "./crc32c.js";
import { dirHash } from "./dirhash.js";
import { BLOCK_SIZE } from "./layout.js";
import { HASH_HALF_MD4 } from "./superblock.js";

export const FT_REG = 1;
export const FT_DIR = 2;
export const FT_CHR = 3;
export const FT_BLK = 4;
export const FT_FIFO = 5;
export const FT_SOCK = 6;
export const FT_SYMLINK = 7;

export interface DirEntry {
  name: Buffer;
  ino: number;
  type: number;
}

const TAIL = 12;
const LEAF_SPACE = BLOCK_SIZE - TAIL;
const ROOT_LIMIT = (BLOCK_SIZE - 32) / 8 - 1; // 507: the dx_tail takes one slot
const NODE_LIMIT = (BLOCK_SIZE - 8) / 8 - 1; // 510

function recLen(nameLen: number): number {
  return (8 + nameLen + 3) & ~3;
}

function putEntry(b: Buffer, off: number, e: DirEntry, rec: number): void {
  le32(b, off, e.ino);
  le16(b, off + 4, rec);
  b[off + 6] = e.name.length;
  b[off + 7] = e.type;
  b.set(e.name, off + 8);
}

/**
 * Writes the dirent tail (a fake entry: inode 0, rec_len 12, type 0xDE) and its checksum. The
 * block is zero from `used` to the tail: that run is checksummed without being read.
 */
function sealLeaf(b: Buffer, seed: number, used: number): void {
  const t = LEAF_SPACE;
  b.writeUInt32LE(0, t);
  b.writeUInt16LE(TAIL, t + 4);
  b.writeUInt8(0, t + 6);
  b.writeUInt8(0xde, t + 7);
  b.writeUInt32LE(crc32cZeros(crc32c(seed, b, 0, used), t - used), t + 8);
}

function leafBlock(entries: readonly DirEntry[], seed: number): Buffer {
  const b = Buffer.alloc(BLOCK_SIZE);
  let off = 0;
  let used = 8;
  if (entries.length === 0) {
    b.writeUInt16LE(LEAF_SPACE, 4); // one empty entry spanning the block
  }
  entries.forEach((e, i) => {
    const rec = i === entries.length - 1 ? LEAF_SPACE - off : recLen(e.name.length);
    putEntry(b, off, e, rec);
    used = off + 8 + e.name.length;
    off += rec;
  });
  sealLeaf(b, seed, used);
  return b;
}

/** Fits in one linear block with "." and ".."? */
function fitsOneBlock(entries: readonly DirEntry[]): boolean {
  let used = 12 + 12;
  for (const e of entries) {
    used += recLen(e.name.length);
    if (used > LEAF_SPACE) return false;
  }
  return true;
}

/**
 * fitsOneBlock from the names alone: the plan asks it of every directory, and most fit, so their
 * entries need not be made twice.
 */
export function namesFitOneBlock(names: Iterable<string>): boolean {
  let used = 12 + 12;
  for (const name of names) {
    used += recLen(name.length); // a byte string: one character a byte
    if (used > LEAF_SPACE) return false;
  }
  return true;
}

export interface DirBlocks {
  blocks: Buffer[];
  indexed: boolean;
}

/**
 * The blocks of a directory. `entries` are the children in name order; `seed` is the
 * directory inode's checksum seed; `emptyBlocks` pads a linear directory (lost+found).
 */
export function buildDirectory(
  self: number,
  parent: number,
  entries: readonly DirEntry[],
  hashSeed: Uint32Array,
  seed: number,
  emptyBlocks = 0,
): DirBlocks {
  const dot: DirEntry = { name: Buffer.from("."), ino: self, type: FT_DIR };
  const dotdot: DirEntry = { name: Buffer.from(".."), ino: parent, type: FT_DIR };
  if (fitsOneBlock(entries)) {
    const blocks = [leafBlock([dot, dotdot, ...entries], seed)];
    for (let i = 0; i < emptyBlocks; i++) blocks.push(leafBlock([], seed));
    return { blocks, indexed: false };
  }
  return { blocks: buildHtree(dot, dotdot, entries, hashSeed, seed), indexed: true };
}

/**
 * What buildDirectory would make, counted without making it: the plan needs every directory's
 * size before any is written, and building them all twice would allocate a block per directory.
 */
export function directoryShape(
  entries: readonly DirEntry[],
  hashSeed: Uint32Array,
  emptyBlocks = 0,
): { blocks: number; indexed: boolean } {
  if (fitsOneBlock(entries)) return { blocks: 1 + emptyBlocks, indexed: false };
  const leaves = htreeLeaves(entries, hashSeed).filled.length;
  return { blocks: 1 + htreeNodes(leaves, entries.length) + leaves, indexed: true };
}

function sealDx(b: Buffer, countOffset: number, limit: number, seed: number): void {
  const count = b.readUInt16LE(countOffset + 2);
  const tail = countOffset + limit * 8;
  b.writeUInt32LE(0, tail);
  let c = crc32c(seed, b, 0, countOffset + count * 8);
  c = crc32c(c, b, tail, tail + 4);
  c = crc32c(c, Buffer.alloc(4));
  b.writeUInt32LE(c, tail + 4);
}

/** Writes a dx_countlimit + dx_entry array at `off`: the first entry's hash is implicit. */
function putDxEntries(b: Buffer, off: number, limit: number, items: readonly [number, number][]): void {
  b.writeUInt16LE(limit, off);
  b.writeUInt16LE(items.length, off + 2);
  b.writeUInt32LE(items[0]![1], off + 4);
  for (let i = 1; i < items.length; i++) {
    b.writeUInt32LE(items[i]![0], off + i * 8);
    b.writeUInt32LE(items[i]![1], off + i * 8 + 4);
  }
}

/** An htree's leaves (entries in hash order, packed) and the hash each leaf starts at. */
function htreeLeaves(
  entries: readonly DirEntry[],
  hashSeed: Uint32Array,
): { filled: DirEntry[][]; starts: number[] } {
  const hashed = entries.map((e) => ({ e, h: dirHash(e.name, hashSeed) }));
  hashed.sort((a, b) => a.h[0] - b.h[0] || a.h[1] - b.h[1] || Buffer.compare(a.e.name, b.e.name));
  // Entries with the same major hash stay in one leaf, so no continuation bits are needed.
  const sameHash: DirEntry[][] = [];
  for (let k = 0; k < hashed.length; k++) {
    if (k === 0 || hashed[k]!.h[0] !== hashed[k - 1]!.h[0]) sameHash.push([]);
    sameHash[sameHash.length - 1]!.push(hashed[k]!.e);
  }
  const filled: DirEntry[][] = [];
  const starts: number[] = [];
  let cur: DirEntry[] = [];
  let used = 0;
  let i = 0;
  for (const group of sameHash) {
    const need = group.reduce((s, e) => s + recLen(e.name.length), 0);
    if (need > LEAF_SPACE) {
      throw new KilnError("UNSUPPORTED_ARCHIVE", "too many directory names share one ext4 hash value");
    }
    if (cur.length > 0 && used + need > LEAF_SPACE) {
      filled.push(cur);
      cur = [];
      used = 0;
    }
    if (cur.length === 0) starts.push(hashed[i]!.h[0]);
    cur.push(...group);
    used += need;
    i += group.length;
  }
  filled.push(cur);
  return { filled, starts };
}

/** Index blocks below the root for `nLeaves` leaves (0: the root indexes them all). */
function htreeNodes(nLeaves: number, entries: number): number {
  const nNodes = nLeaves > ROOT_LIMIT ? Math.ceil(nLeaves / NODE_LIMIT) : 0;
  if (nNodes > ROOT_LIMIT) {
    throw new KilnError("TOO_LARGE", `directory with ${entries} entries is too large for an ext4 htree`);
  }
  return nNodes;
}

function buildHtree(
  dot: DirEntry,
  dotdot: DirEntry,
  entries: readonly DirEntry[],
  hashSeed: Uint32Array,
  seed: number,
): Buffer[] {
  const { filled, starts } = htreeLeaves(entries, hashSeed);
  const nLeaves = filled.length;
  const nNodes = htreeNodes(nLeaves, entries.length);
  const twoLevels = nNodes > 0;
  const firstLeaf = 1 + nNodes;
  const root = Buffer.alloc(BLOCK_SIZE);
  putEntry(root, 0, dot, 12);
  putEntry(root, 12, dotdot, BLOCK_SIZE - 12);
  root.writeUInt32LE(0, 24);
  root.writeUInt8(HASH_HALF_MD4, 28);
  root.writeUInt8(8, 29);
  root.writeUInt8(twoLevels ? 1 : 0, 30);
  const blocks: Buffer[] = [root];
  if (!twoLevels) {
    putDxEntries(
      root,
      32,
      ROOT_LIMIT,
      starts.map((h, k) => [h, firstLeaf + k]),
    );
  } else {
    const rootItems: [number, number][] = [];
    for (let n = 0; n < nNodes; n++) {
      const node = Buffer.alloc(BLOCK_SIZE);
      node.writeUInt16LE(BLOCK_SIZE, 4); // a fake empty dirent covering the block
      const from = n * NODE_LIMIT;
      const items: [number, number][] = [];
      for (let k = from; k < Math.min(nLeaves, from + NODE_LIMIT); k++)
        items.push([starts[k]!, firstLeaf + k]);
      putDxEntries(node, 8, NODE_LIMIT, items);
      sealDx(node, 8, NODE_LIMIT, seed);
      blocks.push(node);
      rootItems.push([starts[from]!, 1 + n]);
    }
    putDxEntries(root, 32, ROOT_LIMIT, rootItems);
  }
  sealDx(root, 32, ROOT_LIMIT, seed);
  for (const leaf of filled) blocks.push(leafBlock(leaf, seed));
  return blocks;
}
