/**
 * CRC32C (Castagnoli), the checksum of ext4's metadata_csum feature. The kernel's `ext4_chksum`
 * is the raw register update: no inversion on entry or exit, the caller passes the running value
 * (the filesystem seed is `crc32c(~0, uuid)`), so this function does the same.
 */

const TABLES = (() => {
  // Slicing-by-4 tables: directory and inode-table checksums cover a few MB on big trees.
  const t = new Uint32Array(4 * 256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[i] = c >>> 0;
  }
  for (let i = 0; i < 256; i++) {
    for (let s = 1; s < 4; s++) {
      const prev = t[(s - 1) * 256 + i]!;
      t[s * 256 + i] = (t[prev & 0xff]! ^ (prev >>> 8)) >>> 0;
    }
  }
  return t;
})();

export function crc32c(seed: number, data: Uint8Array, start = 0, end = data.length): number {
  const t = TABLES;
  let c = seed >>> 0;
  let i = start;
  for (; i + 4 <= end; i += 4) {
    c ^= data[i]! | (data[i + 1]! << 8) | (data[i + 2]! << 16) | (data[i + 3]! << 24);
    c = t[768 + (c & 0xff)]! ^ t[512 + ((c >>> 8) & 0xff)]! ^ t[256 + ((c >>> 16) & 0xff)]! ^ t[c >>> 24]!;
  }
  for (; i < end; i++) c = t[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return c >>> 0;
}

/** crc32c over a little-endian 32-bit number (inode numbers, group numbers). */
export function crc32cU32(seed: number, value: number): number {
  // One slicing-by-4 step, the bytes taken from the number (no buffer: it runs per inode).
  const t = TABLES;
  const c = (seed ^ value) >>> 0;
  return (
    (t[768 + (c & 0xff)]! ^ t[512 + ((c >>> 8) & 0xff)]! ^ t[256 + ((c >>> 16) & 0xff)]! ^ t[c >>> 24]!) >>> 0
  );
}

/** The register after one zero byte: linear over GF(2), so n zero bytes are an operator's power. */
function zeroByte(c: number): number {
  return (TABLES[c & 0xff]! ^ (c >>> 8)) >>> 0;
}

/** Applies a 32×32 GF(2) matrix (its columns) to a register. */
function apply(op: Uint32Array, c: number): number {
  let r = 0;
  for (let i = 0; c !== 0; i++, c >>>= 1) if (c & 1) r ^= op[i]!;
  return r >>> 0;
}

/** ZERO_RUNS[k]: the operator for 2^k zero bytes (each the square of the one before), made as needed. */
const ZERO_RUNS: Uint32Array[] = [new Uint32Array(32).map((_, i) => zeroByte((1 << i) >>> 0))];

function zeroRun(k: number): Uint32Array {
  while (ZERO_RUNS.length <= k) {
    const prev = ZERO_RUNS[ZERO_RUNS.length - 1]!;
    ZERO_RUNS.push(new Uint32Array(32).map((_, i) => apply(prev, prev[i]!)));
  }
  return ZERO_RUNS[k]!;
}

/**
 * crc32c over `n` zero bytes, in a few hundred steps instead of n table lookups: directory blocks
 * are mostly zeros past their last entry, and their checksums ran through every byte.
 */
export function crc32cZeros(seed: number, n: number): number {
  let c = seed >>> 0;
  for (let k = 0; n > 0; k++, n = Math.floor(n / 2)) if (n % 2 === 1) c = apply(zeroRun(k), c);
  return c;
}
