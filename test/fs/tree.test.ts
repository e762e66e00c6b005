import assert from "node:assert/strict";
import { test } from "node:test";
import { compareNames, newInode, sortedNames } from "../../src/fs/tree.js";
import { fromText } from "../../src/io/bytestring.js";

// Names that straddle the one place UTF-16 order and UTF-8 byte order disagree: a surrogate pair
// (a code point above U+FFFF) against U+E000–U+FFFF, beside ASCII, Latin-1 and prefixes. Tree names
// are byte strings: fromText gives each text's UTF-8 bytes, and bytes that are not UTF-8 join them.
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
].map(fromText);
PIECES.push("\xff", "\x80", "\xc3");

function byteOrder(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, "latin1"), Buffer.from(b, "latin1"));
}

test("compareNames orders names as their bytes do", () => {
  const names: string[] = [];
  for (const x of PIECES) for (const y of PIECES) names.push(x + y);
  for (const a of names) {
    for (const b of names) {
      assert.equal(
        Math.sign(compareNames(a, b)),
        Math.sign(byteOrder(a, b)),
        `${JSON.stringify(a)} vs ${JSON.stringify(b)}`,
      );
    }
  }
});

test("sortedNames lists a directory in byte order", () => {
  const dir = newInode("directory");
  const names = ["z", "\uffee", "😀", "a", "ab", "é", "\ue000x", "Z"].map(fromText);
  for (const n of names) dir.entries!.set(n, newInode("file"));
  assert.deepEqual(sortedNames(dir), [...names].sort(byteOrder));
  assert.deepEqual(sortedNames(newInode("file")), []);
});
