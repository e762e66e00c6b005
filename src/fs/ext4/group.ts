/**
 * Block group descriptors and bitmaps (Documentation/filesystems/ext4/group_descr.rst).
 * Allocation is always one prefix: blocks [0, usedBlocks) and inodes [1, usedInodes] are in use,
 * so each group's bitmaps and counts follow from those two numbers.
 */

import { crc32c, crc32cU32 } from "./crc32c.js";
import { BLOCK_SIZE, BLOCKS_PER_GROUP, DESC_SIZE, type Geometry } from "./layout.js";

const BG_INODE_ZEROED = 0x4;

export interface GroupTables {
  descriptors: Buffer;
  /** One block per group, in group order. */
  blockBitmaps: Buffer;
  inodeBitmaps: Buffer;
}

/** Sets bits [from, to) of a bitmap. */
function setBits(bitmap: Buffer, from: number, to: number): void {
  let i = from;
  for (; i < to && i % 8 !== 0; i++) bitmap[i >> 3]! |= 1 << (i & 7);
  for (; i + 8 <= to; i += 8) bitmap[i >> 3] = 0xff;
  for (; i < to; i++) bitmap[i >> 3]! |= 1 << (i & 7);
}

/**
 * @param dirsPerGroup directories whose inode falls in each group.
 */
export function buildGroups(
  g: Geometry,
  usedBlocks: number,
  usedInodes: number,
  dirsPerGroup: number[],
  seed: number,
): GroupTables {
  const descriptors = Buffer.alloc(g.gdtBlocks * BLOCK_SIZE);
  const blockBitmaps = Buffer.alloc(g.groups * BLOCK_SIZE);
  const inodeBitmaps = Buffer.alloc(g.groups * BLOCK_SIZE);
  const ipg = g.inodesPerGroup;
  for (let n = 0; n < g.groups; n++) {
    const first = n * BLOCKS_PER_GROUP;
    const size = Math.min(BLOCKS_PER_GROUP, g.blocks - first);
    const used = Math.max(0, Math.min(size, usedBlocks - first));
    const bb = blockBitmaps.subarray(n * BLOCK_SIZE, (n + 1) * BLOCK_SIZE);
    setBits(bb, 0, used);
    setBits(bb, size, BLOCK_SIZE * 8); // blocks past the end of the filesystem count as used
    const inUse = Math.max(0, Math.min(ipg, usedInodes - n * ipg));
    const ib = inodeBitmaps.subarray(n * BLOCK_SIZE, (n + 1) * BLOCK_SIZE);
    setBits(ib, 0, inUse);
    setBits(ib, ipg, BLOCK_SIZE * 8);

    const d = descriptors.subarray(n * DESC_SIZE, (n + 1) * DESC_SIZE);
    const put = (lo: number, hi: number, v: number) => {
      d.writeUInt32LE(v % 2 ** 32, lo);
      d.writeUInt32LE(Math.floor(v / 2 ** 32), hi);
    };
    const put16 = (lo: number, hi: number, v: number) => {
      d.writeUInt16LE(v & 0xffff, lo);
      d.writeUInt16LE(v >>> 16, hi);
    };
    put(0x0, 0x20, g.blockBitmapStart + n);
    put(0x4, 0x24, g.inodeBitmapStart + n);
    put(0x8, 0x28, g.inodeTableStart + n * g.inodeTableBlocks);
    put16(0xc, 0x2c, size - used);
    put16(0xe, 0x2e, ipg - inUse);
    put16(0x10, 0x30, dirsPerGroup[n] ?? 0);
    d.writeUInt16LE(BG_INODE_ZEROED, 0x12); // the table is zero where unused (holes of the file)
    const bcs = crc32c(seed, bb, 0, BLOCKS_PER_GROUP / 8);
    const ics = crc32c(seed, ib, 0, ipg / 8);
    put16(0x18, 0x38, bcs);
    put16(0x1a, 0x3a, ics);
    put16(0x1c, 0x32, ipg - inUse);
    let c = crc32cU32(seed, n);
    c = crc32c(c, d, 0, 0x1e);
    c = crc32c(c, Buffer.alloc(2));
    c = crc32c(c, d, 0x20, DESC_SIZE);
    d.writeUInt16LE(c & 0xffff, 0x1e);
  }
  return { descriptors, blockBitmaps, inodeBitmaps };
}
