/**
 * The half-MD4 directory hash of ext4 htrees (fs/ext4/hash.c), unsigned-char variant: the
 * superblock sets EXT2_FLAGS_UNSIGNED_HASH so names hash the same on every architecture.
 * Every name of every large directory is hashed twice per image (sizing, then writing): the rounds
 * are written out and the scratch words reused, so a hash allocates nothing.
 */

const K2 = 0o13240474631;
const K3 = 0o15666365641;

/** The hash state (a, b, c, d) and one 32-byte block of input words. */
const state = new Uint32Array(4);
const words = new Uint32Array(8);

// Round functions on uint32 values; results stay int32 inside the sums, `>>> 0` where stored.
const rol = (x: number, s: number): number => (x << s) | (x >>> (32 - s));
const F = (x: number, y: number, z: number): number => z ^ (x & (y ^ z));
const G = (x: number, y: number, z: number): number => (x & y) + ((x ^ y) & z);
const H = (x: number, y: number, z: number): number => x ^ y ^ z;

function halfMd4(): void {
  const w = words;
  let a = state[0]!;
  let b = state[1]!;
  let c = state[2]!;
  let d = state[3]!;
  // Round 1: words in order, shifts 3 7 11 19.
  a = rol((a + F(b, c, d) + w[0]!) | 0, 3);
  d = rol((d + F(a, b, c) + w[1]!) | 0, 7);
  c = rol((c + F(d, a, b) + w[2]!) | 0, 11);
  b = rol((b + F(c, d, a) + w[3]!) | 0, 19);
  a = rol((a + F(b, c, d) + w[4]!) | 0, 3);
  d = rol((d + F(a, b, c) + w[5]!) | 0, 7);
  c = rol((c + F(d, a, b) + w[6]!) | 0, 11);
  b = rol((b + F(c, d, a) + w[7]!) | 0, 19);
  // Round 2: words 1 3 5 7 0 2 4 6, shifts 3 5 9 13.
  a = rol((a + G(b, c, d) + w[1]! + K2) | 0, 3);
  d = rol((d + G(a, b, c) + w[3]! + K2) | 0, 5);
  c = rol((c + G(d, a, b) + w[5]! + K2) | 0, 9);
  b = rol((b + G(c, d, a) + w[7]! + K2) | 0, 13);
  a = rol((a + G(b, c, d) + w[0]! + K2) | 0, 3);
  d = rol((d + G(a, b, c) + w[2]! + K2) | 0, 5);
  c = rol((c + G(d, a, b) + w[4]! + K2) | 0, 9);
  b = rol((b + G(c, d, a) + w[6]! + K2) | 0, 13);
  // Round 3: words 3 7 2 6 1 5 0 4, shifts 3 9 11 15.
  a = rol((a + H(b, c, d) + w[3]! + K3) | 0, 3);
  d = rol((d + H(a, b, c) + w[7]! + K3) | 0, 9);
  c = rol((c + H(d, a, b) + w[2]! + K3) | 0, 11);
  b = rol((b + H(c, d, a) + w[6]! + K3) | 0, 15);
  a = rol((a + H(b, c, d) + w[1]! + K3) | 0, 3);
  d = rol((d + H(a, b, c) + w[5]! + K3) | 0, 9);
  c = rol((c + H(d, a, b) + w[0]! + K3) | 0, 11);
  b = rol((b + H(c, d, a) + w[4]! + K3) | 0, 15);
  // The typed array wraps each sum to 32 bits.
  state[0] = state[0]! + a;
  state[1] = state[1]! + b;
  state[2] = state[2]! + c;
  state[3] = state[3]! + d;
}

/** Packs up to `num` words of the name from `start` into `words`, padded as the kernel pads. */
function str2hashbuf(msg: Uint8Array, start: number, len: number, num: number): void {
  let pad = len | (len << 8);
  pad |= pad << 16;
  let val = pad;
  const n = Math.min(len, num * 4);
  let o = 0;
  for (let i = 0; i < n; i++) {
    val = msg[start + i]! + (val << 8);
    if (i % 4 === 3) {
      words[o++] = val;
      val = pad;
      num--;
    }
  }
  if (--num >= 0) words[o++] = val;
  while (--num >= 0) words[o++] = pad;
}

/** Seed words from the superblock's s_hash_seed; all zero means the MD4 default. */
export function hashSeedWords(seed: Buffer): Uint32Array {
  const w = new Uint32Array(4);
  for (let i = 0; i < 4; i++) w[i] = seed.readUInt32LE(i * 4);
  if (w.every((x) => x === 0)) w.set([0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476]);
  return w;
}

/** [major, minor] hash of a name; the major hash has its low bit clear, as the kernel stores it. */
export function dirHash(name: Uint8Array, seed: Uint32Array): [number, number] {
  state.set(seed);
  for (let p = 0, len = name.length; len > 0; len -= 32, p += 32) {
    str2hashbuf(name, p, len, 8);
    halfMd4();
  }
  const major = (state[1]! & ~1) >>> 0;
  return [major === 0xfffffffe ? 0xfffffffc : major, state[2]!];
}
