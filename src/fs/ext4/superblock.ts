/**
 * The superblock (Documentation/filesystems/ext4/super.rst): 1024 bytes at byte 1024 of block 0.
 * There are no backups (sparse_super2 with no backup groups), which keeps the data area one run.
 */

import { crc32c } from "./crc32c.js";
import { BLOCK_SIZE, BLOCKS_PER_GROUP, DESC_SIZE, type Geometry, INODE_SIZE } from "./layout.js";

export const FIRST_INODE = 11;
export const EXTRA_ISIZE = 32;

// Feature bits (super.rst).
const COMPAT_HAS_JOURNAL = 0x4;
const COMPAT_EXT_ATTR = 0x8;
const COMPAT_DIR_INDEX = 0x20;
const COMPAT_SPARSE_SUPER2 = 0x200;
const INCOMPAT_FILETYPE = 0x2;
const INCOMPAT_EXTENTS = 0x40;
const INCOMPAT_64BIT = 0x80;
const INCOMPAT_FLEX_BG = 0x200;
const RO_COMPAT_SPARSE_SUPER = 0x1;
const RO_COMPAT_LARGE_FILE = 0x2;
const RO_COMPAT_HUGE_FILE = 0x8;
const RO_COMPAT_DIR_NLINK = 0x20;
const RO_COMPAT_EXTRA_ISIZE = 0x40;
const RO_COMPAT_METADATA_CSUM = 0x400;

/** s_flags: directory hashes treat name bytes as unsigned (the same on every architecture). */
const FLAGS_UNSIGNED_HASH = 0x2;
export const HASH_HALF_MD4 = 1;

export interface SuperblockFields {
  geometry: Geometry;
  freeBlocks: number;
  freeInodes: number;
  uuid: Buffer;
  hashSeed: Buffer;
  label: string;
  time: number;
  /** The journal inode's i_block and size, backed up in s_jnl_blocks; no journal if absent. */
  journal?: { inum: number; iblock: Buffer; size: number } | undefined;
}

/** s_jnl_backup_type: s_jnl_blocks holds i_block[], then i_size_high and i_size. */
const JNL_BACKUP_BLOCKS = 1;

function put64(buf: Buffer, lo: number, hi: number, value: number): void {
  buf.writeUInt32LE(value % 2 ** 32, lo);
  buf.writeUInt32LE(Math.floor(value / 2 ** 32), hi);
}

export function encodeSuperblock(f: SuperblockFields): Buffer {
  const g = f.geometry;
  const b = Buffer.alloc(1024);
  b.writeUInt32LE(g.inodes, 0x0);
  put64(b, 0x4, 0x150, g.blocks);
  put64(b, 0x8, 0x154, 0); // no blocks reserved for root: images, not shared system disks
  put64(b, 0xc, 0x158, f.freeBlocks);
  b.writeUInt32LE(f.freeInodes, 0x10);
  b.writeUInt32LE(0, 0x14); // s_first_data_block: 0 with 4 KiB blocks
  b.writeUInt32LE(Math.log2(BLOCK_SIZE) - 10, 0x18);
  b.writeUInt32LE(Math.log2(BLOCK_SIZE) - 10, 0x1c);
  b.writeUInt32LE(BLOCKS_PER_GROUP, 0x20);
  b.writeUInt32LE(BLOCKS_PER_GROUP, 0x24);
  b.writeUInt32LE(g.inodesPerGroup, 0x28);
  b.writeUInt32LE(0, 0x2c); // s_mtime: never mounted
  b.writeUInt32LE(f.time >>> 0, 0x30); // s_wtime
  b.writeUInt16LE(0, 0x34);
  b.writeUInt16LE(0xffff, 0x36); // s_max_mnt_count -1: no periodic fsck
  b.writeUInt16LE(0xef53, 0x38);
  b.writeUInt16LE(1, 0x3a); // clean
  b.writeUInt16LE(1, 0x3c); // errors: continue
  b.writeUInt32LE(f.time >>> 0, 0x40); // s_lastcheck
  b.writeUInt32LE(0, 0x48); // Linux
  b.writeUInt32LE(1, 0x4c); // dynamic revision
  b.writeUInt32LE(FIRST_INODE, 0x54);
  b.writeUInt16LE(INODE_SIZE, 0x58);
  const compat = COMPAT_EXT_ATTR | COMPAT_DIR_INDEX | COMPAT_SPARSE_SUPER2;
  b.writeUInt32LE(f.journal ? compat | COMPAT_HAS_JOURNAL : compat, 0x5c);
  b.writeUInt32LE(INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG, 0x60);
  b.writeUInt32LE(
    RO_COMPAT_SPARSE_SUPER |
      RO_COMPAT_LARGE_FILE |
      RO_COMPAT_HUGE_FILE |
      RO_COMPAT_DIR_NLINK |
      RO_COMPAT_EXTRA_ISIZE |
      RO_COMPAT_METADATA_CSUM,
    0x64,
  );
  f.uuid.copy(b, 0x68, 0, 16);
  Buffer.from(f.label, "utf8").copy(b, 0x78, 0, 16);
  f.hashSeed.copy(b, 0xec, 0, 16);
  if (f.journal) {
    b.writeUInt32LE(f.journal.inum, 0xe0); // s_journal_inum (s_journal_uuid, s_journal_dev: 0)
    b.writeUInt8(JNL_BACKUP_BLOCKS, 0xfd);
    f.journal.iblock.copy(b, 0x10c, 0, 60);
    b.writeUInt32LE(Math.floor(f.journal.size / 2 ** 32), 0x10c + 60);
    b.writeUInt32LE(f.journal.size % 2 ** 32, 0x10c + 64);
  }
  b.writeUInt8(HASH_HALF_MD4, 0xfc);
  b.writeUInt16LE(DESC_SIZE, 0xfe);
  b.writeUInt32LE(0x000c, 0x100); // default mount options: user_xattr, acl (as mkfs)
  b.writeUInt32LE(f.time >>> 0, 0x108); // s_mkfs_time
  b.writeUInt16LE(EXTRA_ISIZE, 0x15c); // s_min_extra_isize
  b.writeUInt16LE(EXTRA_ISIZE, 0x15e); // s_want_extra_isize
  b.writeUInt32LE(FLAGS_UNSIGNED_HASH, 0x160);
  b.writeUInt8(4, 0x174); // s_log_groups_per_flex, as mkfs (placement is free with flex_bg anyway)
  b.writeUInt8(1, 0x175); // s_checksum_type: crc32c
  // s_backup_bgs (0x24c) stay 0: sparse_super2 with no backup superblocks.
  b.writeUInt32LE(crc32c(0xffffffff, b, 0, 0x3fc), 0x3fc);
  return b;
}

/** The seed of every metadata checksum: crc32c(~0, uuid). */
export function checksumSeed(uuid: Buffer): number {
  return crc32c(0xffffffff, uuid, 0, 16);
}
