import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { test } from "node:test";
import { promisify } from "node:util";
import { crc32c, crc32cZeros } from "../../src/fs/ext4/crc32c.js";
import { buildDirectory, type DirEntry, directoryShape, FT_REG } from "../../src/fs/ext4/dir.js";
import { dirHash, hashSeedWords } from "../../src/fs/ext4/dirhash.js";

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

// e2fsprogs' own hash (debugfs dx_hash; algorithm 4 is half_md4_unsigned, what kiln's superblocks
// declare): names across the 32-byte block boundaries, bytes above 0x7f, the default and a set seed.
test("dirHash matches debugfs dx_hash (half_md4, unsigned)", async () => {
  const names = ["a", "hello", "x".repeat(31), "y".repeat(32), "z".repeat(33), "q".repeat(64)];
  names.push("w".repeat(255), "caf\u00e9", "\u65e5\u672c\u8a9e.txt", "Ab9_-.+~@%^=,", "n".repeat(100));
  for (const [uuid, seedHex] of [
    [undefined, "00".repeat(16)],
    ["01234567-89ab-cdef-0123-456789abcdef", "0123456789abcdef0123456789abcdef"],
  ] as const) {
    const seedWords = hashSeedWords(Buffer.from(seedHex, "hex"));
    for (const name of names) {
      const cmd = `dx_hash -h 4 ${uuid ? `-s ${uuid} ` : ""}${name}`;
      // debugfs needs a device argument even for dx_hash; /dev/null only earns a warning.
      const { stdout } = await promisify(execFile)("debugfs", ["-R", cmd, "/dev/null"]);
      const m = /is 0x([0-9a-f]+) \(minor 0x([0-9a-f]+)\)/.exec(stdout);
      assert.ok(m, `debugfs printed no hash for ${name}: ${stdout}`);
      const [major, minor] = dirHash(Buffer.from(name, "utf8"), seedWords);
      assert.deepEqual(
        [major.toString(16), minor.toString(16)],
        [m[1], m[2]],
        `${name} with seed ${seedHex}`,
      );
    }
  }
});

test("crc32cZeros is crc32c over that many zero bytes (directory blocks skip their empty part)", () => {
  for (const n of [0, 1, 2, 3, 8, 100, 4084, 4095, 4096, 4097, 20000])
    for (const start of [0, 1, 0xffffffff, 0x80000000, 0x1234abcd])
      assert.equal(crc32cZeros(start, n), crc32c(start, Buffer.alloc(n)), `${n} zeros from ${start}`);
});

test("leaf block checksums cover the whole block, the empty part included", () => {
  for (const list of [entries(0, 1), entries(3, 5), entries(150, 20)]) {
    const { blocks } = buildDirectory(2, 2, list, seed, 0x5eed);
    let leaves = 0;
    for (const b of blocks) {
      if (b.readUInt8(4084 + 7) !== 0xde) continue; // the htree root or a node, not a leaf
      assert.equal(b.readUInt32LE(4084 + 8), crc32c(0x5eed, b, 0, 4084));
      leaves++;
    }
    assert.ok(leaves > 0);
  }
});
