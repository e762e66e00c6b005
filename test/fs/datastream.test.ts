import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdir, mkdtemp, open, readFile, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { promisify } from "node:util";
import { DataStream, openDirect } from "../../src/fs/datastream.js";
import { WriteBehind } from "../../src/write-behind.js";

const run = promisify(execFile);
const MiB = 1 << 20;
let dir: string;

before(async () => {
  // On the disk, not a tmpfs: there the page cache is the file, and it would hold every page.
  await mkdir("test/.cache", { recursive: true });
  dir = await mkdtemp(join("test/.cache", "datastream-"));
});
after(() => rm(dir, { recursive: true, force: true }));

/** Pieces of every kind a writer puts: whole blocks, odd sizes, zero runs, padding by seek. */
function pieces(): { data: Buffer; padTo?: number }[] {
  return [
    { data: randomBytes(3 * MiB + 100) },
    { data: Buffer.alloc(2 * MiB) }, // zero blocks: holes
    { data: randomBytes(5000), padTo: 4096 },
    { data: randomBytes(MiB - 7) },
    { data: Buffer.alloc(12345) },
    { data: randomBytes(2 * MiB + 1) },
  ];
}

/** Writes the pieces as a stream at `start` into a file sized `size`; returns the expected bytes. */
async function writeStream(
  path: string,
  start: number,
  size: number,
  parts: { data: Buffer; padTo?: number }[],
  direct: boolean,
): Promise<Buffer> {
  const expected = Buffer.alloc(size);
  const fh = await open(path, "w");
  const dh = direct ? await openDirect(path) : undefined;
  if (direct) assert.ok(dh, "O_DIRECT open refused on the test directory's filesystem");
  try {
    await fh.truncate(size);
    const stream = new DataStream(fh, start, dh);
    for (const { data, padTo } of parts) {
      data.copy(expected, stream.position);
      // Handed over in uneven slices, as a tar source does.
      for (let i = 0; i < data.length; i += 300_001)
        await stream.put(data, i, Math.min(i + 300_001, data.length));
      if (padTo) await stream.seek(Math.ceil(stream.position / padTo) * padTo);
    }
    await stream.end();
  } finally {
    await dh?.close();
    await fh.close();
  }
  return expected;
}

const total = (parts: { data: Buffer }[]) => parts.reduce((n, p) => n + p.data.length + 4096, 0);

test("a data stream through O_DIRECT writes the same bytes, zero blocks as holes, none through the page cache", async () => {
  const parts = pieces();
  const size = 4096 + total(parts);
  const path = join(dir, "direct.img");
  const expected = await writeStream(path, 4096, size, parts, true);
  assert.ok((await readFile(path)).equals(expected), "bytes differ");
  // 2 MiB of zeros (and the zero piece) were never written: the file has fewer blocks than bytes.
  const { blocks } = await stat(path);
  assert.ok(blocks * 512 <= size - 2 * MiB, `${blocks * 512} bytes allocated of ${size}`);
  // Read back above, so evict what that read brought in, then write again and look: direct writes
  // leave the page cache empty but for the odd tail, which goes through it.
  await rm(path);
  await writeStream(path, 4096, size, parts, true);
  const { stdout } = await run("fincore", ["--bytes", "--noheadings", "--raw", "-o", "RES", path]);
  assert.ok(Number(stdout.trim()) <= 64 * 1024, `${stdout.trim()} bytes of the image in the page cache`);
});

test("a data stream that starts off a block boundary writes through the page cache, same bytes", async () => {
  const parts = pieces();
  const size = 4096 + total(parts);
  const path = join(dir, "unaligned.img");
  const expected = await writeStream(path, 1000, size, parts, true);
  assert.ok((await readFile(path)).equals(expected));
  const buffered = join(dir, "buffered.img");
  await writeStream(buffered, 1000, size, parts, false);
  assert.ok((await readFile(buffered)).equals(expected));
});

test("write-behind starts one write-back per `every` bytes, never two at once, and reports a failure", async () => {
  const started: (() => void)[] = [];
  const behind = new WriteBehind(
    () =>
      new Promise<void>((resolve) => {
        started.push(resolve);
      }),
    100,
  );
  behind.wrote(99);
  assert.equal(started.length, 0);
  behind.wrote(1);
  assert.equal(started.length, 1);
  behind.wrote(500); // one is under way: none more
  assert.equal(started.length, 1);
  started[0]!();
  await behind.settle();
  behind.wrote(100);
  assert.equal(started.length, 2);
  started[1]!();
  await behind.settle();

  const failing = new WriteBehind(() => Promise.reject(Object.assign(new Error("EIO"), { code: "EIO" })), 10);
  failing.wrote(10);
  await assert.rejects(failing.settle(), /EIO/);
  assert.equal((failing.error as NodeJS.ErrnoException).code, "EIO");
});
