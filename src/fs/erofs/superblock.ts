/**
 * The EROFS superblock (linux fs/erofs/erofs_fs.h, struct erofs_super_block): 128 bytes at byte
 * 1024 of block 0, little-endian. kiln writes 4 KiB blocks, no compression, no shared xattrs,
 * no extra devices, and the optional superblock checksum.
 */

export const BLOCK_BITS = 12;
export const BLOCK_SIZE = 1 << BLOCK_BITS;
export const SUPER_OFFSET = 1024;
export const SUPER_MAGIC = 0xe0f5e1e2;
/** feature_compat bit: the superblock carries a crc32c of bytes 1024..blocksize. */
export const FEATURE_COMPAT_SB_CHKSUM = 0x1;
/** feature_incompat bit: some inodes are chunk-based (Linux 5.15+). */
export const FEATURE_INCOMPAT_CHUNKED_FILE = 0x4;

export interface SuperblockFields {
  rootNid: number;
  /** Number of inodes. */
  inodes: number;
  /** Time compact inodes report (they have no mtime of their own). */
  buildTime: number;
  buildTimeNsec: number;
  /** Image size in blocks. */
  blocks: number;
  /** Block where nid 0 sits: an inode's byte offset is metaBlkaddr * BLOCK_SIZE + nid * 32. */
  metaBlkaddr: number;
  uuid: Buffer;
  /** At most 16 bytes of UTF-8. */
  volumeName: Buffer;
  /** feature_incompat bits (FEATURE_INCOMPAT_*). */
  featureIncompat?: number | undefined;
}

const CRC32C_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

/**
 * The kernel's crc32c(seed, buf, len): reflected Castagnoli CRC with no final inversion, so the
 * superblock checksum is crc32c(~0, ...) as stored, not the "standard" CRC-32C value.
 */
export function crc32cRaw(seed: number, buf: Uint8Array): number {
  let crc = seed >>> 0;
  for (let i = 0; i < buf.length; i++) crc = CRC32C_TABLE[(crc ^ buf[i]!) & 0xff]! ^ (crc >>> 8);
  return crc >>> 0;
}

/** Block 0 of the image: zeros, the superblock at 1024, its checksum filled in. */
export function encodeSuperblockBlock(f: SuperblockFields): Buffer {
  if (f.uuid.length !== 16) throw new RangeError(`EROFS UUID must be 16 bytes, got ${f.uuid.length}`);
  if (f.volumeName.length > 16) throw new RangeError("EROFS volume name is longer than 16 bytes");
  if (f.rootNid > 0xffff) throw new RangeError(`EROFS root nid ${f.rootNid} does not fit 16 bits`);
  const block = Buffer.alloc(BLOCK_SIZE);
  const sb = block.subarray(SUPER_OFFSET);
  sb.writeUInt32LE(SUPER_MAGIC, 0);
  // checksum (4) stays 0 until computed below.
  sb.writeUInt32LE(FEATURE_COMPAT_SB_CHKSUM, 8);
  sb.writeUInt8(BLOCK_BITS, 12);
  sb.writeUInt8(0, 13); // sb_extslots
  sb.writeUInt16LE(f.rootNid, 14);
  sb.writeBigUInt64LE(BigInt(f.inodes), 16);
  sb.writeBigUInt64LE(BigInt(f.buildTime), 24);
  sb.writeUInt32LE(f.buildTimeNsec, 32);
  sb.writeUInt32LE(f.blocks, 36);
  sb.writeUInt32LE(f.metaBlkaddr, 40);
  sb.writeUInt32LE(0, 44); // xattr_blkaddr: no shared xattrs
  f.uuid.copy(sb, 48);
  f.volumeName.copy(sb, 64);
  sb.writeUInt32LE(f.featureIncompat ?? 0, 80);
  // Compression fields, extra devices, dirblkbits (90): all 0.
  sb.writeUInt32LE(crc32cRaw(0xffffffff, sb), 4);
  return block;
}
