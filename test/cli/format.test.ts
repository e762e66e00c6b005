import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { formatBytes, parseDuration, parseSize } from "../../src/cli/format.js";

describe("parseSize", () => {
  const cases: [string, number][] = [
    ["4096", 4096],
    ["512M", 512 * 1024 ** 2],
    ["10G", 10 * 1024 ** 3],
    ["1.5GiB", 1.5 * 1024 ** 3],
    ["2GB", 2e9],
    ["64k", 65536],
    ["1T", 1024 ** 4],
  ];
  for (const [text, bytes] of cases) it(`${text} → ${bytes}`, () => assert.equal(parseSize(text), bytes));
  for (const bad of ["", "G", "10X", "-1G", "1e3", "ten"]) {
    it(`rejects ${JSON.stringify(bad)}`, () => assert.equal(parseSize(bad), undefined));
  }
  it("formats bytes in decimal units", () => {
    assert.equal(formatBytes(999), "999 B");
    assert.equal(formatBytes(1_500_000), "1.5 MB");
  });
});

describe("parseDuration", () => {
  const cases: [string, number][] = [
    ["0", 0],
    ["90s", 90_000],
    ["30m", 30 * 60_000],
    ["1h", 3_600_000],
    ["2d", 2 * 86_400_000],
    ["1h30m", 5_400_000],
    ["1.5h", 5_400_000],
    ["500ms", 500],
    ["45", 45_000],
    [" 2H ", 7_200_000],
  ];
  for (const [text, ms] of cases) it(`${text} → ${ms} ms`, () => assert.equal(parseDuration(text), ms));
  for (const bad of ["", "h", "-1h", "1w", "1h-", "ten", "1 h", "1e3s"]) {
    it(`rejects ${JSON.stringify(bad)}`, () => assert.equal(parseDuration(bad), undefined));
  }
});
