import assert from "node:assert/strict";
import { test } from "node:test";
import { compareNames, newInode, sortedNames } from "../../src/fs/tree.js";

// Names that straddle the one place UTF-16 order and UTF-8 byte order disagree: a surrogate pair
// (a code point above U+FFFF) against U+E000–U+FFFF, beside ASCII, Latin-1 and prefixes.
const PIECES = [
  "",
  "a",
  "b",
  "A",
  "~",
  "é",
  "ÿ",
  "Ā",
  "中",
  "\ud7ff",
  "\ue000",
  "\uf8ff",
  "\uffee",
  "\uffff",
  "😀",
  "𐀀",
  "\u{10ffff}",
  ".",
  "-",
];

function utf8Order(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, "utf8"), Buffer.from(b, "utf8"));
}

test("compareNames orders names as their UTF-8 bytes do", () => {
  const names: string[] = [];
  for (const x of PIECES) for (const y of PIECES) names.push(x + y);
  for (const a of names) {
    for (const b of names) {
      assert.equal(
        Math.sign(compareNames(a, b)),
        Math.sign(utf8Order(a, b)),
        `${JSON.stringify(a)} vs ${JSON.stringify(b)}`,
      );
    }
  }
});

test("sortedNames lists a directory in UTF-8 byte order", () => {
  const dir = newInode("directory");
  const names = ["z", "\uffee", "😀", "a", "ab", "é", "\ue000x", "Z"];
  for (const n of names) dir.entries!.set(n, newInode("file"));
  assert.deepEqual(sortedNames(dir), [...names].sort(utf8Order));
  assert.deepEqual(sortedNames(newInode("file")), []);
});
