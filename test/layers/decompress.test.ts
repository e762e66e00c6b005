import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { createReadStream, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { gunzip } from "node:zlib";
import { isKilnError } from "../../src/errors.js";
import { OUTPUT_CHUNK, openLayerStream, sniffCompression } from "../../src/layers/decompress.js";
import { readTar } from "../../src/tar/reader.js";

let dir: string;
let tar: Buffer;
let diffId: string;
const blobs = new Map<string, Buffer>();
const WRONG = `sha256:${"0".repeat(64)}`;

const digest = (b: Buffer) => `sha256:${createHash("sha256").update(b).digest("hex")}`;

async function* chunks(buf: Buffer, size = 3001): AsyncGenerator<Buffer> {
  // A 1-byte first chunk: the magic must be recognized across chunks.
  if (buf.length > 0) yield buf.subarray(0, 1);
  for (let i = 1; i < buf.length; i += size) yield buf.subarray(i, i + size);
}

async function collect(it: AsyncIterable<Buffer>): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of it) parts.push(c);
  return Buffer.concat(parts);
}

async function rejects(p: Promise<unknown>, code: string, pattern: RegExp): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(isKilnError(err), `not a KilnError: ${err}`);
    assert.equal(err.code, code, err.message);
    assert.match(err.message, pattern);
    return true;
  });
}

before(() => {
  dir = mkdtempSync(join(tmpdir(), "kiln-decompress-"));
  const root = join(dir, "root");
  mkdirSync(join(root, "etc"), { recursive: true });
  writeFileSync(join(root, "etc/a"), "hello");
  writeFileSync(join(root, "random"), randomBytes(2 * 1024 * 1024));
  writeFileSync(join(root, "text"), "abc".repeat(300_000));
  tar = execFileSync("tar", ["-c", "-f", "-", "--format=pax", "-C", root, "."], { maxBuffer: 64 << 20 });
  diffId = digest(tar);
  blobs.set("none", tar);
  blobs.set("gzip", execFileSync("gzip", ["-c", "-n"], { input: tar, maxBuffer: 64 << 20 }));
  blobs.set("zstd", execFileSync("zstd", ["-c", "-q"], { input: tar, maxBuffer: 64 << 20 }));
  // Two gzip members back to back (pigz and some registries write these).
  const half = 700_000;
  blobs.set(
    "gzip-multi",
    Buffer.concat([
      execFileSync("gzip", ["-c", "-n"], { input: tar.subarray(0, half) }),
      execFileSync("gzip", ["-c", "-n"], { input: tar.subarray(half), maxBuffer: 64 << 20 }),
    ]),
  );
  // Two zstd frames back to back.
  blobs.set(
    "zstd-multi",
    Buffer.concat([
      execFileSync("zstd", ["-c", "-q"], { input: tar.subarray(0, 12345) }),
      execFileSync("zstd", ["-c", "-q"], { input: tar.subarray(12345), maxBuffer: 64 << 20 }),
    ]),
  );
  // A frame, a skippable frame (magic 0x184D2A5?, little-endian length, payload), a frame.
  const skippable = Buffer.alloc(8 + 100, 0x77);
  skippable.writeUInt32LE(0x184d2a53, 0);
  skippable.writeUInt32LE(100, 4);
  blobs.set(
    "zstd-skippable",
    Buffer.concat([
      execFileSync("zstd", ["-c", "-q"], { input: tar.subarray(0, 54321) }),
      skippable,
      execFileSync("zstd", ["-c", "-q"], { input: tar.subarray(54321), maxBuffer: 64 << 20 }),
    ]),
  );
  for (const [name, blob] of blobs) writeFileSync(join(dir, name), blob);
});

after(() => rmSync(dir, { recursive: true, force: true }));

describe("openLayerStream", () => {
  test("magic bytes choose the decompressor", () => {
    assert.equal(sniffCompression(blobs.get("gzip")!), "gzip");
    assert.equal(sniffCompression(blobs.get("zstd")!), "zstd");
    assert.equal(sniffCompression(tar), "none");
    assert.equal(sniffCompression(Buffer.alloc(0)), "none");
  });

  for (const kind of ["none", "gzip", "zstd", "gzip-multi", "zstd-multi", "zstd-skippable"]) {
    test(`${kind}: the uncompressed bytes come out and match the diff ID`, async () => {
      const fromIterable = await collect(openLayerStream(chunks(blobs.get(kind)!), { diffId }));
      assert.ok(fromIterable.equals(tar));
      const fromFile = await collect(
        openLayerStream(createReadStream(join(dir, kind), { highWaterMark: 16384 }), {
          diffId,
          label: "layer 0",
        }),
      );
      assert.ok(fromFile.equals(tar));
      // Without a diff ID nothing is checked.
      assert.ok((await collect(openLayerStream(chunks(blobs.get(kind)!)))).equals(tar));
    });

    test(`${kind}: input arriving in small pieces comes out in large chunks`, async () => {
      // Network reads are a few KiB each; a chunk out per chunk in would cost a thread-pool trip,
      // a write and a hash update each further on. 3001-byte pieces: hundreds of them.
      const pieces = Math.ceil(blobs.get(kind)!.length / 3001);
      let count = 0;
      for await (const _ of openLayerStream(chunks(blobs.get(kind)!), { diffId })) count++;
      assert.ok(count <= 16, `${count} chunks out of ${pieces} pieces in`);
    });

    test(`${kind}: a wrong diff ID is DIGEST_MISMATCH, thrown after the last byte`, async () => {
      let got = 0;
      await rejects(
        (async () => {
          for await (const c of openLayerStream(chunks(blobs.get(kind)!), {
            diffId: WRONG,
            label: "layer 2",
          })) {
            got += c.length;
          }
        })(),
        "DIGEST_MISMATCH",
        new RegExp(`^layer 2: uncompressed content ${diffId} does not match the config's diff ID ${WRONG}$`),
      );
      assert.equal(got, tar.length);
    });
  }

  test("the tar reader surfaces the mismatch: it reads past the end marker", async () => {
    const names: string[] = [];
    await rejects(
      (async () => {
        for await (const e of readTar(
          openLayerStream(chunks(blobs.get("zstd")!), { diffId: WRONG, label: "layer 1" }),
        ))
          names.push(e.header.path);
      })(),
      "DIGEST_MISMATCH",
      /^layer 1: /,
    );
    assert.ok(names.includes("./random"));
  });

  test("corrupt or truncated compressed data is INVALID_ARCHIVE naming the layer", async () => {
    for (const kind of ["gzip", "zstd"]) {
      const blob = blobs.get(kind)!;
      const corrupt = Buffer.from(blob);
      for (let i = 100; i < 400; i++) corrupt[i] = corrupt[i]! ^ 0x5a;
      await rejects(
        collect(openLayerStream(chunks(corrupt), { label: "layer 4" })),
        "INVALID_ARCHIVE",
        /^layer 4: corrupt or truncated/,
      );
      const truncated = blob.subarray(0, Math.floor(blob.length / 2));
      await rejects(
        collect(openLayerStream(chunks(truncated), { label: "layer 5" })),
        "INVALID_ARCHIVE",
        /^layer 5: corrupt or truncated/,
      );
      await rejects(
        collect(openLayerStream(chunks(blob.subarray(0, 6)), { label: "layer 6" })),
        "INVALID_ARCHIVE",
        /^layer 6: /,
      );
    }
  });

  test("errors of the input pass through; a bad diff ID is INVALID_ARGUMENT", async () => {
    const failing = async function* () {
      yield blobs.get("gzip")!.subarray(0, 5000);
      throw new Error("disk on fire");
    };
    await assert.rejects(collect(openLayerStream(failing())), /^Error: disk on fire$/);
    const failingPlain = async function* () {
      yield tar.subarray(0, 5000);
      throw new Error("disk on fire");
    };
    await assert.rejects(collect(openLayerStream(failingPlain())), /^Error: disk on fire$/);
    await rejects(
      collect(openLayerStream(chunks(tar), { diffId: "md5:abc" })),
      "INVALID_ARGUMENT",
      /diff ID/,
    );
  });

  test("stopping early releases the input", async () => {
    for (const kind of ["none", "gzip", "zstd"]) {
      const stream = createReadStream(join(dir, kind), { highWaterMark: 4096 });
      for await (const _ of openLayerStream(stream)) break;
      await new Promise((resolve) => setImmediate(resolve));
      assert.ok(stream.destroyed, `${kind}: input destroyed`);
    }
  });
});

describe("a decompression bomb", () => {
  const BOMB = 256 << 20;
  // A few MiB (a chunk being filled, gzip's read-ahead, a chunk in flight); holding the bomb is 256.
  const BOUND = 8 << 20;
  setFlagsFromString("--expose-gc");
  const gc = runInNewContext("gc") as () => void;
  /**
   * Bytes in live buffers: garbage collected first, so only what something still holds counts. V8
   * frees buffer memory on a thread of its own after a collection: collect until the count holds.
   */
  const liveBuffers = async () => {
    let last = -1;
    for (let i = 0; i < 20; i++) {
      gc();
      await new Promise((resolve) => setImmediate(resolve));
      const now = process.memoryUsage().arrayBuffers;
      if (now === last) return now;
      last = now;
    }
    return last;
  };
  const bombs = new Map<string, Buffer>();
  const gunzipAsync = promisify(gunzip);
  let tinyGzip: Buffer;

  before(() => {
    const zeros = (cmd: string, size: number) =>
      execFileSync("sh", ["-c", `head -c ${size} /dev/zero | ${cmd}`], { maxBuffer: 64 << 20 });
    bombs.set("zstd", zeros("zstd -q -c -19", BOMB));
    // gzip tops out near 1000:1 and is slow on a whole bomb: the same member 8 times over.
    bombs.set("gzip", Buffer.concat(Array(8).fill(zeros("gzip -c -n", BOMB / 8))));
    tinyGzip = execFileSync("gzip", ["-c", "-n"], { input: "x" });
  });

  for (const kind of ["zstd", "gzip"]) {
    test(`${kind}: nothing more is decompressed than the consumer takes, in chunks of at most 1 MiB`, async () => {
      const bomb = bombs.get(kind)!;
      assert.ok(bomb.length < 2 << 20, `${kind} bomb of ${bomb.length} bytes`);
      assert.equal(sniffCompression(bomb), kind);
      const before = await liveBuffers();
      const it = openLayerStream(chunks(bomb, 64 << 10), { label: "layer 1" })[Symbol.asyncIterator]();
      for (let i = 0; i < 4; i++) {
        const r = await it.next();
        assert.ok(!r.done);
        assert.ok(r.value.length <= OUTPUT_CHUNK, `chunk of ${r.value.length} bytes`);
      }
      // The consumer stops pulling. gzip inflates on the thread pool: 64 thread-pool round trips of
      // our own give it as many chances to inflate one more chunk, were it not waiting for us.
      for (let i = 0; i < 64; i++) await gunzipAsync(tinyGzip);
      const held = (await liveBuffers()) - before;
      await it.return(undefined);
      assert.ok(held < BOUND, `${held} bytes held after 4 chunks were taken`);

      // Read to the end, the whole bomb comes out, in full chunks.
      let total = 0;
      let largest = 0;
      for await (const c of openLayerStream(chunks(bomb, 64 << 10))) {
        total += c.length;
        largest = Math.max(largest, c.length);
      }
      assert.equal(total, BOMB);
      assert.equal(largest, OUTPUT_CHUNK);
    });
  }
});
