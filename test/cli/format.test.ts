import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { formatBytes, parseDuration, parseSize } from "../../src/cli/format.js";
import { formatSize } from "../../src/sizes.js";

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
  it("formats bytes in binary units, as sizes are read", () => {
    assert.equal(formatBytes(999), "999 B");
    assert.equal(formatBytes(1023), "1023 B");
    assert.equal(formatBytes(1024), "1 KiB");
    assert.equal(formatBytes(1_500_000), "1.4 MiB");
    assert.equal(formatBytes(parseSize("300M")!), "300 MiB");
    assert.equal(formatBytes(parseSize("10G")!), "10 GiB");
    assert.equal(formatBytes(parseSize("1.5GiB")!), "1.5 GiB");
    assert.equal(formatBytes(parseSize("2T")!), "2 TiB");
    assert.equal(formatBytes(parseSize("4096T")!), "4096 TiB");
  });
  it("rounds a minimum up, so the figure printed is enough", () => {
    assert.equal(formatSize(135266304, "up"), "129 MiB");
    assert.equal(formatSize(135266304 + 1, "up"), "130 MiB");
    assert.equal(formatSize(3 * 2 ** 20 + 1, "up"), "3.1 MiB");
    assert.equal(formatSize(3 * 2 ** 20 + 1), "3 MiB");
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
