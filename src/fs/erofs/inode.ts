/**
 * EROFS on-disk inodes (struct erofs_inode_compact, 32 bytes; struct erofs_inode_extended, 64
 * bytes). Compact inodes have 16-bit ids and link count, a 32-bit size, and no time of their own:
 * they report the superblock's build time, so any other mtime needs an extended inode.
 */
import { type FileType, modeWord } from "../tree.js";

export const COMPACT_SIZE = 32;
export const EXTENDED_SIZE = 64;
/** Inodes sit on 32-byte slots: nid = (byte offset - meta_blkaddr * blocksize) / 32. */
export const SLOT_SIZE = 32;

/** i_format bits 1..3: where the data is. */
export const FLAT_PLAIN = 0;
/** Full blocks at raw_blkaddr, the last partial block right after the inode and its xattrs. */
export const FLAT_INLINE = 2;
/** Data in chunks whose block addresses (a block map, null for holes) follow the inode and its xattrs. */
export const CHUNK_BASED = 4;
/** Bytes of a block map entry: a chunk's first block, or NULL_ADDR for a chunk that is a hole. */
export const BLOCK_MAP_ENTRY = 4;
/** raw_blkaddr of an inode with no blocks, and the block map entry of a hole. */
export const NULL_ADDR = 0xffffffff;

/** erofs_dirent.file_type values (EROFS_FT_*). */
export const DIRENT_TYPE: Record<FileType, number> = {
  file: 1,
  directory: 2,
  char: 3,
  block: 4,
  fifo: 5,
  socket: 6,
  symlink: 7,
};

export function modeBits(type: FileType, perm: number): number {
  return modeWord(type, perm);
}

/** The kernel's new_encode_dev: what i_u holds for device inodes (12-bit major, 20-bit minor). */
export function encodeRdev(major: number, minor: number): number {
  return ((minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12)) >>> 0;
}

export interface InodeFields {
  extended: boolean;
  layout: number;
  /** i_xattr_icount: 0, or 1 + (xattr ibody bytes - 12) / 4. */
  xattrCount: number;
  mode: number;
  nlink: number;
  size: number;
  /** raw_blkaddr for regular data, the chunk format of chunk-based files, the encoded rdev for devices. */
  u: number;
  ino: number;
  uid: number;
  gid: number;
  mtime: number;
  mtimeNsec: number;
}

/** Whether a compact inode can hold these fields without losing anything. */
export function fitsCompact(
  f: Pick<InodeFields, "uid" | "gid" | "nlink" | "size" | "mtime" | "mtimeNsec">,
  buildTime: number,
  buildTimeNsec: number,
): boolean {
  return (
    f.uid <= 0xffff &&
    f.gid <= 0xffff &&
    f.nlink <= 0xffff &&
    f.size <= 0xffffffff &&
    f.mtime === buildTime &&
    f.mtimeNsec === buildTimeNsec
  );
}

/** A 64-bit little-endian integer from a safe integer, without a BigInt (one per inode adds up). */
function writeInt64(buf: Buffer, value: number, off: number): void {
  buf.writeUInt32LE(((value % 0x100000000) + 0x100000000) % 0x100000000, off);
  buf.writeInt32LE(Math.floor(value / 0x100000000), off + 4);
}

/** Writes the inode into `buf` at `off` (COMPACT_SIZE or EXTENDED_SIZE bytes, all set). */
export function encodeInode(f: InodeFields, buf: Buffer, off: number): void {
  const size = f.extended ? EXTENDED_SIZE : COMPACT_SIZE;
  buf.fill(0, off, off + size);
  buf.writeUInt16LE((f.extended ? 1 : 0) | (f.layout << 1), off);
  buf.writeUInt16LE(f.xattrCount, off + 2);
  buf.writeUInt16LE(f.mode, off + 4);
  buf.writeUInt32LE(f.u >>> 0, off + 16);
  buf.writeUInt32LE(f.ino >>> 0, off + 20);
  if (f.extended) {
    writeInt64(buf, f.size, off + 8);
    buf.writeUInt32LE(f.uid, off + 24);
    buf.writeUInt32LE(f.gid, off + 28);
    writeInt64(buf, f.mtime, off + 32);
    buf.writeUInt32LE(f.mtimeNsec, off + 40);
    buf.writeUInt32LE(f.nlink, off + 44);
  } else {
    buf.writeUInt16LE(f.nlink, off + 6);
    buf.writeUInt32LE(f.size, off + 8);
    buf.writeUInt16LE(f.uid, off + 24);
    buf.writeUInt16LE(f.gid, off + 26);
  }
}
