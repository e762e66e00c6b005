import assert from "node:assert/strict";
import { test } from "node:test";
import { fromBytes, fromText, quoteBytes, showBytes, toBytes, toText } from "../../src/io/bytestring.js";

test("byte strings carry every byte and sort as bytes", () => {
  const all = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
  assert.deepEqual(toBytes(fromBytes(all)), all);
  const names = [Buffer.from([0xff]), Buffer.from([0xc3, 0xa9]), Buffer.from("z"), Buffer.from([0x80])];
  assert.deepEqual(names.map(fromBytes).sort().map(toBytes), [...names].sort(Buffer.compare));
  assert.equal(fromText("é"), "\xc3\xa9");
  assert.equal(toText(fromText("名前 🙂")), "名前 🙂");
  assert.equal(toText("\xff"), undefined);
});

test("messages show UTF-8 names as text, other bytes and control characters as \\xNN", () => {
  assert.equal(showBytes(fromText("café/名前")), "café/名前");
  assert.equal(showBytes("bad-\xff\xfe"), "bad-\\xff\\xfe");
  assert.equal(showBytes("a\nb\x1b[31m"), "a\\x0ab\\x1b[31m");
  assert.equal(quoteBytes('say "hi"\xff'), '"say \\"hi\\"\\xff"');
});
