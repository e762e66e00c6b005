/**
 * The half-MD4 directory hash of ext4 htrees (fs/ext4/hash.c), unsigned-char variant: the
 * superblock sets EXT2_FLAGS_UNSIGNED_HASH so names hash the same on every architecture.
 */

const K2 = 0o13240474631;
const K3 = 0o15666365641;

function rol(x: number, s: number): number {
  return ((x << s) | (x >>> (32 - s))) >>> 0;
}

function halfMd4(buf: Uint32Array, inp: Uint32Array): void {
  let a = buf[0]!;
  let b = buf[1]!;
  let c = buf[2]!;
  let d = buf[3]!;
  const F = (x: number, y: number, z: number) => (z ^ (x & (y ^ z))) >>> 0;
  const G = (x: number, y: number, z: number) => ((x & y) + ((x ^ y) & z)) >>> 0;
  const H = (x: number, y: number, z: number) => (x ^ y ^ z) >>> 0;
  const r1 = [0, 1, 2, 3, 4, 5, 6, 7];
  const s1 = [3, 7, 11, 19];
  const r2 = [1, 3, 5, 7, 0, 2, 4, 6];
  const s2 = [3, 5, 9, 13];
  const r3 = [3, 7, 2, 6, 1, 5, 0, 4];
  const s3 = [3, 9, 11, 15];
  const rounds: [typeof F, number[], number[], number][] = [
    [F, r1, s1, 0],
    [G, r2, s2, K2],
    [H, r3, s3, K3],
  ];
  for (const [f, order, shifts, k] of rounds) {
    for (let i = 0; i < 8; i++) {
      const x = (inp[order[i]!]! + k) >>> 0;
      const s = shifts[i % 4]!;
      // The four registers rotate roles: a, d, c, b.
      switch (i % 4) {
        case 0:
          a = rol((a + f(b, c, d) + x) >>> 0, s);
          break;
        case 1:
          d = rol((d + f(a, b, c) + x) >>> 0, s);
          break;
        case 2:
          c = rol((c + f(d, a, b) + x) >>> 0, s);
          break;
        default:
          b = rol((b + f(c, d, a) + x) >>> 0, s);
      }
    }
  }
  buf[0] = (buf[0]! + a) >>> 0;
  buf[1] = (buf[1]! + b) >>> 0;
  buf[2] = (buf[2]! + c) >>> 0;
  buf[3] = (buf[3]! + d) >>> 0;
}

function str2hashbuf(msg: Buffer, start: number, len: number, out: Uint32Array, num: number): void {
  let pad = (len | (len << 8)) >>> 0;
  pad = (pad | (pad << 16)) >>> 0;
  let val = pad;
  const n = Math.min(len, num * 4);
  let o = 0;
  for (let i = 0; i < n; i++) {
    val = (msg[start + i]! + ((val << 8) >>> 0)) >>> 0;
    if (i % 4 === 3) {
      out[o++] = val;
      val = pad;
      num--;
    }
  }
  if (--num >= 0) out[o++] = val;
  while (--num >= 0) out[o++] = pad;
}

/** Seed words from the superblock's s_hash_seed; all zero means the MD4 default. */
export function hashSeedWords(seed: Buffer): Uint32Array {
  const w = new Uint32Array(4);
  for (let i = 0; i < 4; i++) w[i] = seed.readUInt32LE(i * 4);
  if (w.every((x) => x === 0)) w.set([0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476]);
  return w;
}

/** [major, minor] hash of a name; the major hash has its low bit clear, as the kernel stores it. */
export function dirHash(name: Buffer, seed: Uint32Array): [number, number] {
  const buf = new Uint32Array(seed);
  const inp = new Uint32Array(8);
  for (let p = 0, len = name.length; len > 0; len -= 32, p += 32) {
    str2hashbuf(name, p, len, inp, 8);
    halfMd4(buf, inp);
  }
  let hash = (buf[1]! & ~1) >>> 0;
  if (hash === 0xfffffffe) hash = 0xfffffffc;
  return [hash, buf[2]!];
}
