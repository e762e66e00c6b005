/**
 * One 256-byte inode (Documentation/filesystems/ext4/inodes.rst): 128 bytes of the original
 * layout, then 32 extra bytes (nanosecond times, creation time, checksum high half), then the
 * in-inode extended attributes.
 */

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
  buf.writeUInt16LE(f.mode & 0xffff, 0x0);
  buf.writeUInt16LE(f.uid & 0xffff, 0x2);
  buf.writeUInt32LE(f.size % 2 ** 32, 0x4);
  // Low 32 bits of the seconds, and the "extra" word: 2 epoch bits, then nanoseconds << 2.
  const t = ((f.time % 2 ** 32) + 2 ** 32) % 2 ** 32;
  const signedT = t >= 2 ** 31 ? t - 2 ** 32 : t;
  const epoch = ((((f.time - signedT) / 2 ** 32) % 4) + 4) % 4;
  const extra = ((f.timeNsec << 2) | epoch) >>> 0;
  // atime ctime mtime crtime, then their extra words
  buf.writeUInt32LE(t, 0x8);
  buf.writeUInt32LE(t, 0xc);
  buf.writeUInt32LE(t, 0x10);
  buf.writeUInt32LE(t, 0x90);
  buf.writeUInt32LE(extra, 0x84);
  buf.writeUInt32LE(extra, 0x88);
  buf.writeUInt32LE(extra, 0x8c);
  buf.writeUInt32LE(extra, 0x94);
  buf.writeUInt16LE(f.gid & 0xffff, 0x18);
  buf.writeUInt16LE(f.links, 0x1a);
  buf.writeUInt32LE(f.sectors % 2 ** 32, 0x1c);
  buf.writeUInt16LE(Math.floor(f.sectors / 2 ** 32), 0x74);
  buf.writeUInt32LE(f.flags, 0x20);
  buf.writeUInt32LE(f.xattrBlock % 2 ** 32, 0x68);
  buf.writeUInt16LE(Math.floor(f.xattrBlock / 2 ** 32), 0x76);
  buf.writeUInt32LE(Math.floor(f.size / 2 ** 32), 0x6c);
  buf.writeUInt16LE(f.uid >>> 16, 0x78);
  buf.writeUInt16LE(f.gid >>> 16, 0x7a);
  buf.writeUInt16LE(EXTRA_ISIZE, 0x80);
}

/** Sets i_checksum_lo/hi: crc32c over the whole inode with both fields as zero. */
export function sealInode(buf: Buffer, seed: number): void {
  buf.writeUInt16LE(0, 0x7c);
  buf.writeUInt16LE(0, 0x82);
  const c = crc32c(seed, buf, 0, INODE_SIZE);
  buf.writeUInt16LE(c & 0xffff, 0x7c);
  buf.writeUInt16LE(c >>> 16, 0x82);
}

/**
 * i_block of a device, written at `off` (zeroed): the kernel's old 16-bit encoding when it fits,
 * else the new one in word 1.
 */
export function writeDeviceBlock(buf: Buffer, off: number, major: number, minor: number): void {
  if (major < 256 && minor < 256) buf.writeUInt32LE((major << 8) | minor, off);
  else buf.writeUInt32LE(((minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12)) >>> 0, off + 4);
}
