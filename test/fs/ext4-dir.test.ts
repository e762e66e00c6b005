import assert from "node:assert/strict";
import { test } from "node:test";
import { buildDirectory, type DirEntry, directoryShape, FT_REG } from "../../src/fs/ext4/dir.js";
import { hashSeedWords } from "../../src/fs/ext4/dirhash.js";

const seed = hashSeedWords(Buffer.from("0123456789abcdef0123456789abcdef", "hex"));

function entries(count: number, nameLength: number): DirEntry[] {
  return Array.from({ length: count }, (_, i) => ({
    name: Buffer.from(String(i).padStart(nameLength, "n")),
    ino: 12 + i,
    type: FT_REG,
  }));
}

// The plan sizes directories with directoryShape and the writer then builds them: they must agree,
// or blocks would be written where others were placed.
for (const [what, list, empty] of [
  ["empty", entries(0, 1), 0],
  ["a few names", entries(20, 10), 0],
  ["lost+found's spare blocks", entries(0, 1), 3],
  ["just over one block", entries(160, 20), 0],
  ["a one-level htree", entries(3000, 30), 0],
  ["a two-level htree (over 507 leaves)", entries(8000, 255), 0],
] as const) {
  test(`directoryShape counts what buildDirectory makes: ${what}`, () => {
    const built = buildDirectory(2, 2, list, seed, 0, empty);
    const shape = directoryShape(list, seed, empty);
    assert.deepEqual(shape, { blocks: built.blocks.length, indexed: built.indexed });
  });
}

test("a two-level htree really has index nodes", () => {
  const shape = directoryShape(entries(8000, 255), seed);
  assert.ok(shape.indexed);
  // 255-byte names: 15 to a leaf, so over 507 leaves, which needs a second index level.
  assert.ok(shape.blocks > 1 + 533, `blocks ${shape.blocks}`);
});
