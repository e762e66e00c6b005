/**
 * One 256-byte inode (Documentation/filesystems/ext4/inodes.rst): 128 bytes of the original
 * layout, then 32 extra bytes (nanosecond times, creation time, checksum high half), then the
 * in-inode extended attributes.
 */

import { le16, le32 } from "../le.js";
import { crc32c, crc32cU32 } from "./crc32c.js";
import { INODE_SIZE } from "./layout.js";
import { EXTRA_ISIZE } from "./superblock.js";

export const S_IFIFO = 0x1000;
export const S_IFCHR = 0x2000;
export const S_IFDIR = 0x4000;
export const S_IFBLK = 0x6000;
export const S_IFREG = 0x8000;
export const S_IFLNK = 0xa000;
export const S_IFSOCK = 0xc000;

export const FL_INDEX = 0x1000;
export const FL_EXTENTS = 0x80000;

export interface InodeFields {
  /** Type and permission bits. */
  mode: number;
  uid: number;
  gid: number;
  size: number;
  links: number;
  /** Seconds (may be negative or beyond 2038) and nanoseconds; used for atime, ctime, mtime, crtime. */
  time: number;
  timeNsec: number;
  /** 512-byte sectors: data, extent tree and xattr blocks. */
  sectors: number;
  flags: number;
  /** Extended attribute block, 0 for none. */
  xattrBlock: number;
}

/** The seed of an inode's own checksums (inode, extent blocks, directory blocks): fs seed, number, generation 0. */
export function inodeSeed(fsSeed: number, ino: number): number {
  return crc32cU32(crc32cU32(fsSeed, ino), 0);
}

/** Offset and size of i_block (extent root, fast symlink target or device numbers) in an inode. */
export const I_BLOCK = 0x28;
export const I_BLOCK_SIZE = 60;

/**
 * Writes the inode fields into `buf` (INODE_SIZE bytes; i_block and the xattr area left as they
 * are: the caller writes i_block in place, one inode of many in an inode table).
 */
export function encodeInode(buf: Buffer, f: InodeFields): void {
  le16(buf, 0x0, f.mode & 0xffff);
  le16(buf, 0x2, f.uid & 0xffff);
  le32(buf, 0x4, f.size % 2 ** 32);
  // Low 32 bits of the seconds, and the "extra" word: 2 epoch bits, then nanoseconds << 2.
  const t = ((f.time % 2 ** 32) + 2 ** 32) % 2 ** 32;
  const signedT = t >= 2 ** 31 ? t - 2 ** 32 : t;
  const epoch = ((((f.time - signedT) / 2 ** 32) % 4) + 4) % 4;
  const extra = ((f.timeNsec << 2) | epoch) >>> 0;
  // atime ctime mtime crtime, then their extra words
  le32(buf, 0x8, t);
  le32(buf, 0xc, t);
  le32(buf, 0x10, t);
  le32(buf, 0x90, t);
  le32(buf, 0x84, extra);
  le32(buf, 0x88, extra);
  le32(buf, 0x8c, extra);
  le32(buf, 0x94, extra);
  le16(buf, 0x18, f.gid & 0xffff);
  le16(buf, 0x1a, f.links);
  le32(buf, 0x1c, f.sectors % 2 ** 32);
  le16(buf, 0x74, Math.floor(f.sectors / 2 ** 32));
  le32(buf, 0x20, f.flags);
  le32(buf, 0x68, f.xattrBlock % 2 ** 32);
  le16(buf, 0x76, Math.floor(f.xattrBlock / 2 ** 32));
  le32(buf, 0x6c, Math.floor(f.size / 2 ** 32));
  le16(buf, 0x78, f.uid >>> 16);
  le16(buf, 0x7a, f.gid >>> 16);
  le16(buf, 0x80, EXTRA_ISIZE);
}

/** Sets i_checksum_lo/hi: crc32c over the whole inode with both fields as zero. */
export function sealInode(buf: Buffer, seed: number): void {
  le16(buf, 0x7c, 0);
  le16(buf, 0x82, 0);
  const c = crc32c(seed, buf, 0, INODE_SIZE);
  le16(buf, 0x7c, c & 0xffff);
  le16(buf, 0x82, c >>> 16);
}

/**
 * i_block of a device, written at `off` (zeroed): the kernel's old 16-bit encoding when it fits,
 * else the new one in word 1.
 */
export function writeDeviceBlock(buf: Buffer, off: number, major: number, minor: number): void {
  if (major < 256 && minor < 256) buf.writeUInt32LE((major << 8) | minor, off);
  else buf.writeUInt32LE(((minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12)) >>> 0, off + 4);
}
