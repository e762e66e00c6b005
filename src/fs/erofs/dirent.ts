/**
 * Directory data: a sequence of blocks, each an array of 12-byte erofs_dirent {nid u64, nameoff
 * u16, file_type u8, reserved u8} followed by the names (no terminator; the last name of a block
 * ends at the block's end, the directory's size, or the first NUL). Names, "." and ".." included,
 * are sorted by bytes across all blocks: the kernel binary-searches them on lookup.
 */
import { BLOCK_SIZE } from "./superblock.js";

export const DIRENT_SIZE = 12;

export interface DirEntry {
  /** A byte string (src/io/bytestring.ts), encoded when the block is: a Buffer per name held for the whole write adds up. */
  name: string;
  /** The name's length in bytes. */
  bytes: number;
  type: number;
  nid: number;
}

export interface DirPlan {
  /** Index of the first entry of each block. */
  starts: number[];
  /** Directory size: full blocks plus the bytes used in the last one. */
  size: number;
  /** Bytes used in the last block. */
  lastUsed: number;
}

/** Splits sorted entries into blocks, as many per block as fit. */
export function planDirBlocks(entries: readonly { bytes: number }[]): DirPlan {
  const starts: number[] = [0];
  let used = 0;
  for (let i = 0; i < entries.length; i++) {
    const need = DIRENT_SIZE + entries[i]!.bytes;
    if (used + need > BLOCK_SIZE) {
      starts.push(i);
      used = 0;
    }
    used += need;
  }
  return { starts, size: (starts.length - 1) * BLOCK_SIZE + used, lastUsed: used };
}

/** Encodes entries [from, to) as one directory block at buf[off..]; returns the bytes used. */
export function encodeDirBlock(
  entries: readonly DirEntry[],
  from: number,
  to: number,
  buf: Buffer,
  off: number,
): number {
  let nameoff = (to - from) * DIRENT_SIZE;
  for (let i = from; i < to; i++) {
    const e = entries[i]!;
    const d = off + (i - from) * DIRENT_SIZE;
    // Two 32-bit halves: a BigInt per entry is an allocation per name of the image.
    buf.writeUInt32LE(e.nid % 0x100000000, d);
    buf.writeUInt32LE(Math.floor(e.nid / 0x100000000), d + 4);
    buf.writeUInt16LE(nameoff, d + 8);
    buf.writeUInt8(e.type, d + 10);
    buf.writeUInt8(0, d + 11);
    buf.write(e.name, off + nameoff, e.bytes, "latin1");
    nameoff += e.bytes;
  }
  return nameoff;
}
