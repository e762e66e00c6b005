import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { blockMap, chunkPosition, planChunks } from "../../src/fs/erofs/chunks.js";

const KiB = 2 ** 10;
const MiB = 2 ** 20;
const TiB = 2 ** 40;

describe("EROFS chunk plans for sparse files", () => {
  it("a 1 TiB file with 4 KiB of data: 2 MiB chunks, one stored, a 2 MiB block map", () => {
    const plan = planChunks(TiB, [{ offset: TiB / 2 + 5, size: 4 * KiB }]);
    assert.equal(plan.bits, 9);
    assert.equal(plan.count, TiB / (2 * MiB));
    // 4 KiB from an odd offset touches one 2 MiB chunk.
    assert.deepEqual(plan.stored, [TiB / 2 / (2 * MiB)]);
    assert.equal(plan.blocks, 512);
  });

  it("a small file keeps 4 KiB chunks; the file's last chunk is stored only to its last block", () => {
    const plan = planChunks(MiB + 100, [
      { offset: 0, size: 10 },
      { offset: MiB + 90, size: 10 },
    ]);
    assert.equal(plan.bits, 0);
    assert.equal(plan.count, 257);
    assert.deepEqual(plan.stored, [0, 256]);
    assert.equal(plan.blocks, 2);
    plan.start = 100;
    assert.equal(chunkPosition(plan, 1, MiB + 90), 101 * 4096 + 90);
  });

  it("regions spanning chunks store each chunk once; the map holds null entries for the rest", () => {
    const plan = planChunks(64 * MiB, [
      { offset: 2 * MiB - 1, size: 2 },
      { offset: 2 * MiB + 1, size: 1 },
      { offset: 40 * MiB, size: 0 },
    ]);
    plan.start = 7;
    const pieces: Buffer[] = [];
    for (const piece of blockMap(plan)) pieces.push(Buffer.from(piece)); // views: copied at once
    const map = Buffer.concat(pieces);
    assert.equal(map.length, plan.count * 4);
    const entries = Array.from({ length: plan.count }, (_, i) => map.readUInt32LE(i * 4));
    const mapped = entries.flatMap((e, i) => (e === 0xffffffff ? [] : [[i, e]]));
    const chunkBlocks = 2 ** plan.bits;
    assert.deepEqual(
      mapped,
      plan.stored.map((c, rank) => [c, 7 + rank * chunkBlocks]),
    );
    assert.equal(plan.stored.length, 2, "the chunks on both sides of 2 MiB");
  });
});
