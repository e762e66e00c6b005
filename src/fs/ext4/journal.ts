/**
 * The jbd2 journal (Documentation/filesystems/ext4/journal.rst), made as mke2fs makes it: inode 8,
 * one contiguous run of zeroed blocks whose first block is the journal superblock (big-endian),
 * clean (s_start 0: nothing to replay). The kernel turns on the features it uses at mount.
 */

import { KilnError } from "../../errors.js";
import { formatSize } from "../../sizes.js";
import { crc32c } from "./crc32c.js";
import { toExtents, treeBlocks } from "./extents.js";
import { BLOCK_SIZE } from "./layout.js";

export const JOURNAL_INO = 8;
/** jbd2's smallest journal (JBD2_MIN_JOURNAL_BLOCKS). */
export const MIN_JOURNAL_BLOCKS = 1024;
/** mke2fs's largest journal ("between 1024 and 10240000 filesystem blocks"). */
const MAX_JOURNAL_BLOCKS = 10_240_000;

const MAGIC = 0xc03b3998;
const SUPERBLOCK_V2 = 4;
const INCOMPAT_64BIT = 0x2;
const INCOMPAT_CSUM_V3 = 0x10;
const CSUM_CRC32C = 4;

/** mke2fs's default (ext2fs_default_journal_size) for a filesystem of `fsBlocks` blocks. */
export function defaultJournalBlocks(fsBlocks: number): number {
  if (fsBlocks < 32768) return 1024;
  if (fsBlocks < 256 * 1024) return 4096;
  if (fsBlocks < 512 * 1024) return 8192;
  if (fsBlocks < 4096 * 1024) return 16384;
  if (fsBlocks < 8192 * 1024) return 32768;
  if (fsBlocks < 16384 * 1024) return 65536;
  if (fsBlocks < 32768 * 1024) return 131072;
  return 262144;
}

/** Journal blocks for an explicit size in bytes (rounded up to whole blocks), checked. */
export function journalBlocksForSize(bytes: number): number {
  const blocks = Math.ceil(bytes / BLOCK_SIZE);
  if (!Number.isSafeInteger(bytes) || blocks < MIN_JOURNAL_BLOCKS || blocks > MAX_JOURNAL_BLOCKS) {
    throw new KilnError(
      "INVALID_ARGUMENT",
      `ext4 journal size ${formatSize(bytes)} is out of range: ${formatSize(MIN_JOURNAL_BLOCKS * BLOCK_SIZE)} to ${formatSize(MAX_JOURNAL_BLOCKS * BLOCK_SIZE)}`,
    );
  }
  return blocks;
}

/** Extent tree blocks a contiguous journal of `blocks` blocks needs beyond its inode. */
export function journalTreeBlocks(blocks: number): number {
  return treeBlocks(toExtents([{ logical: 0, physical: 0, length: blocks }]).length);
}

/** The journal superblock: the first block of the journal, everything else in it zero. */
export function encodeJournalSuperblock(blocks: number, uuid: Buffer): Buffer {
  const b = Buffer.alloc(BLOCK_SIZE);
  b.writeUInt32BE(MAGIC, 0x0);
  b.writeUInt32BE(SUPERBLOCK_V2, 0x4);
  b.writeUInt32BE(BLOCK_SIZE, 0xc); // s_blocksize
  b.writeUInt32BE(blocks, 0x10); // s_maxlen
  b.writeUInt32BE(1, 0x14); // s_first: the log starts right after this block
  b.writeUInt32BE(1, 0x18); // s_sequence
  // s_start (0x1c) 0: clean, nothing to replay.
  b.writeUInt32BE(INCOMPAT_64BIT | INCOMPAT_CSUM_V3, 0x28); // the fs is 64bit and metadata_csum
  uuid.copy(b, 0x30, 0, 16);
  b.writeUInt32BE(1, 0x40); // s_nr_users: this filesystem
  b.writeUInt8(CSUM_CRC32C, 0x50);
  // s_checksum: crc32c(~0) over the 1024-byte superblock with the field zero.
  b.writeUInt32BE(crc32c(0xffffffff, b, 0, 1024), 0xfc);
  return b;
}
