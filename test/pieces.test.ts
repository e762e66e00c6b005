import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { describe, test } from "node:test";
import { pieces } from "../src/pieces.js";

async function* from(chunks: Uint8Array[], onReturn?: () => void): AsyncGenerator<Uint8Array> {
  try {
    for (const c of chunks) yield c;
  } finally {
    onReturn?.();
  }
}

async function collect(it: AsyncIterable<Buffer>): Promise<Buffer[]> {
  const out: Buffer[] = [];
  for await (const c of it) out.push(c);
  return out;
}

describe("pieces", () => {
  test("small chunks are joined into pieces of at least the minimum, the bytes unchanged", async () => {
    const data = randomBytes(10_000);
    const chunks = Array.from({ length: 100 }, (_, i) => data.subarray(i * 100, i * 100 + 100));
    const out = await collect(pieces(from(chunks), 1024));
    assert.ok(Buffer.concat(out).equals(data));
    // Pieces of 11 chunks (the chunk that reaches the minimum closes one), then what is left.
    assert.deepEqual(
      out.map((b) => b.length),
      [...Array(9).fill(1100), 100],
    );
  });

  test("a chunk as large as the minimum passes through as it is", async () => {
    const big = randomBytes(4096);
    const out = await collect(pieces(from([big, randomBytes(10), randomBytes(10)]), 4096));
    assert.equal(out[0], big, "not copied");
    assert.deepEqual(
      out.map((b) => b.length),
      [4096, 20],
    );
  });

  test("Uint8Arrays come out as Buffers over the same bytes; an empty source gives nothing", async () => {
    const u = new Uint8Array([1, 2, 3, 4]);
    const [b] = await collect(pieces(from([u]), 4));
    assert.ok(Buffer.isBuffer(b));
    assert.equal(b!.buffer, u.buffer);
    assert.deepEqual(await collect(pieces(from([]), 4)), []);
  });

  test("stopping early releases the source", async () => {
    let released = false;
    for await (const _ of pieces(
      from([randomBytes(8), randomBytes(8), randomBytes(8)], () => {
        released = true;
      }),
      8,
    )) {
      break;
    }
    assert.ok(released);
  });
});
