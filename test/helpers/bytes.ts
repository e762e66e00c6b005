/** Pseudo-random bytes (xorshift32 seeded by `salt`), the same on every run. */
export function pseudoRandomBytes(n: number, salt: number): Buffer {
  const out = Buffer.alloc(n);
  let x = (salt * 2654435761) >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}
