/**
 * Little-endian stores for the per-inode paths of the writers (inodes, extent entries, directory
 * entries): Buffer's writeUInt16LE/writeUInt32LE check their arguments on every call, which made
 * them several times slower than these plain byte stores over the ~10 fields of each of 100k inodes.
 * Callers pass values already in range (the high bits are dropped, not checked).
 */
export function le16(buf: Uint8Array, off: number, v: number): void {
  buf[off] = v;
  buf[off + 1] = v >>> 8;
}

export function le32(buf: Uint8Array, off: number, v: number): void {
  buf[off] = v;
  buf[off + 1] = v >>> 8;
  buf[off + 2] = v >>> 16;
  buf[off + 3] = v >>> 24;
}
