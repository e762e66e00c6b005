/**
 * FileByteSource: a tar file read by position gives the tar reader exactly what the same bytes
 * give it as a stream (entries, offsets, data, sparse maps, errors), whatever the window size, and
 * skipping reads nothing it does not need.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import {
  closeSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { open } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { isKilnError } from "../../src/errors.js";
import { FileByteSource } from "../../src/tar/file-source.js";
import { type ByteSource, materialize, readTar } from "../../src/tar/reader.js";
import { END, entry } from "./fixtures.js";

interface Seen {
  path: string;
  offset: number;
  stored: number;
  size: number;
  sparse: string;
  sha256: string;
}

async function readAll(input: AsyncIterable<Buffer> | ByteSource, skipData = false): Promise<Seen[]> {
  const out: Seen[] = [];
  for await (const e of readTar(input)) {
    const h = createHash("sha256");
    if (!skipData) for await (const c of materialize(e)) h.update(c);
    out.push({
      path: e.header.path,
      offset: e.offset,
      stored: e.stored,
      size: e.size,
      sparse: JSON.stringify(e.sparse ?? null),
      sha256: skipData ? "" : h.digest("hex"),
    });
  }
  return out;
}

async function* chunks(buf: Buffer, size = 4099): AsyncGenerator<Buffer> {
  for (let i = 0; i < buf.length; i += size) yield buf.subarray(i, i + size);
}

/** Runs `fn` over a FileByteSource on `file`; counts the bytes it moved over. */
async function withSource<T>(
  file: string,
  opts: { window?: number; readAhead?: boolean; reuse?: boolean },
  fn: (src: FileByteSource) => Promise<T>,
): Promise<{ result: T; advanced: number }> {
  const fh = await open(file, "r");
  try {
    let advanced = 0;
    const src = new FileByteSource(fh, (await fh.stat()).size, {
      ...opts,
      onAdvance: (n) => {
        advanced += n;
      },
    });
    return { result: await fn(src), advanced };
  } finally {
    await fh.close();
  }
}

describe("FileByteSource", () => {
  let dir: string;
  let gnuTar: string;

  before(() => {
    dir = mkdtempSync(join(tmpdir(), "kiln-file-source-"));
    const root = join(dir, "root");
    mkdirSync(join(root, "sub", "x".repeat(120)), { recursive: true });
    // Sizes around the windows used below, so entries start and end on and across their edges.
    for (const [name, size] of [
      ["empty", 0],
      ["one", 1],
      ["block", 512],
      ["odd", 1023],
      ["win", 4096],
      ["win1", 4097],
      ["big", 3 * 1024 * 1024 + 17],
    ] as const) {
      writeFileSync(join(root, name), randomBytes(size));
    }
    writeFileSync(join(root, "sub", "x".repeat(120), "long-name"), randomBytes(70_000));
    // A sparse file: GNU tar stores only its data regions (PAX 1.0 map in the data).
    const sparse = join(root, "sparse");
    writeFileSync(sparse, "");
    truncateSync(sparse, 8 << 20);
    const fd = openSync(sparse, "r+");
    writeSync(fd, randomBytes(5000), 0, 5000, 1 << 20);
    writeSync(fd, randomBytes(100), 0, 100, (8 << 20) - 100);
    closeSync(fd);
    gnuTar = join(dir, "a.tar");
    execFileSync("tar", ["-c", "-f", gnuTar, "--format=pax", "--sparse", "-C", root, "."]);
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  for (const window of [512, 1000, 4096, 64 * 1024, 1 << 20]) {
    test(`reads a GNU tar as the stream reader does (window ${window})`, async () => {
      const expected = await readAll(chunks(readFileSync(gnuTar)));
      assert.ok(
        expected.some((e) => e.sparse !== "null"),
        "the archive has a sparse entry",
      );
      for (const readAhead of [true, false]) {
        const { result } = await withSource(gnuTar, { window, readAhead }, (src) => readAll(src));
        assert.deepEqual(result, expected, `readAhead ${readAhead}`);
      }
    });
  }

  test("a header scan moves over the whole file but reads only around the headers", async () => {
    const size = readFileSync(gnuTar).length;
    const expected = await readAll(chunks(readFileSync(gnuTar)), true);
    const { result, advanced } = await withSource(gnuTar, { window: 4096, readAhead: false }, (src) =>
      readAll(src, true),
    );
    assert.deepEqual(result, expected);
    assert.equal(advanced, size, "every byte is accounted for, read or skipped");
  });

  test("take() chunks may be kept: a later window does not overwrite them", async () => {
    const bytes = readFileSync(gnuTar);
    const kept: Buffer[] = [];
    await withSource(gnuTar, { window: 4096 }, async (src) => {
      for (let left = bytes.length; left > 0; ) {
        const n = Math.min(left, 10_000);
        for await (const c of src.take(n, "data")) kept.push(c);
        left -= n;
      }
    });
    assert.ok(Buffer.concat(kept).equals(bytes));
  });

  test("reuse: a consumer that copies each chunk gets every byte, across skips past the read-ahead", async () => {
    const bytes = readFileSync(gnuTar);
    // Deterministic steps: takes and skips, short and longer than the 4096-byte window.
    const steps: [op: "take" | "skip", n: number][] = [];
    for (let i = 0, pos = 0; pos < bytes.length; i++) {
      const n = Math.min(bytes.length - pos, [100, 5000, 4096, 9000, 1, 20_000, 4095][i % 7]!);
      steps.push([i % 3 === 2 ? "skip" : "take", n]);
      pos += n;
    }
    const copied: Buffer[] = [];
    const wanted: Buffer[] = [];
    await withSource(gnuTar, { window: 4096, reuse: true }, async (src) => {
      let pos = 0;
      for (const [op, n] of steps) {
        if (op === "skip") await src.skip(n, "gap");
        else {
          for await (const c of src.take(n, "data")) copied.push(Buffer.from(c));
          wanted.push(bytes.subarray(pos, pos + n));
        }
        pos += n;
      }
    });
    assert.ok(Buffer.concat(copied).equals(Buffer.concat(wanted)));
  });

  test("reuse: windows are read into three buffers in turn, not one new buffer each", async () => {
    const memory = async (reuse: boolean) => {
      const seen = new Set<ArrayBufferLike>();
      await withSource(gnuTar, { window: 4096, reuse }, async (src) => {
        for await (const c of src.take(readFileSync(gnuTar).length, "all")) seen.add(c.buffer);
      });
      return seen.size;
    };
    assert.equal(await memory(true), 3);
    assert.ok((await memory(false)) > 100);
  });

  test("an archive without end blocks ends after its last entry", async () => {
    const file = join(dir, "noeof.tar");
    const data = randomBytes(700);
    writeFileSync(file, Buffer.concat([entry({ name: "a" }, data), entry({ name: "b" }, Buffer.from("xy"))]));
    const { result } = await withSource(file, { window: 512 }, (src) => readAll(src));
    assert.deepEqual(
      result.map((e) => [e.path, e.size]),
      [
        ["a", 700],
        ["b", 2],
      ],
    );
  });

  test("a file cut inside an entry's data is INVALID_ARCHIVE, as for a stream", async () => {
    const full = Buffer.concat([entry({ name: "a" }, randomBytes(5000)), END]);
    const file = join(dir, "cut.tar");
    writeFileSync(file, full.subarray(0, 512 + 3000));
    for (const skipData of [false, true]) {
      await assert.rejects(
        withSource(file, { window: 1024 }, (src) => readAll(src, skipData)),
        (err: unknown) => isKilnError(err, "INVALID_ARCHIVE") && /cut short/.test(err.message),
      );
    }
  });
});
