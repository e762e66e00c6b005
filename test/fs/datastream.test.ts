import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { type FileHandle, mkdir, mkdtemp, open, readFile, rm, stat } from "node:fs/promises";
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

/**
 * A file handle whose writes wait until the test releases them (then go to `real`), counting the
 * writes in flight; only the calls a data stream makes are there. A release resolves once the real
 * write is done; a release with an error fails that write instead.
 */
function gatedHandle(real: FileHandle) {
  const held: ((fail?: Error) => Promise<void>)[] = [];
  const state = { inFlight: 0, most: 0 };
  const write = async (buf: Buffer, offset: number, length: number, position: number) => {
    state.inFlight++;
    state.most = Math.max(state.most, state.inFlight);
    let finished = () => {};
    const landed = new Promise<void>((resolve) => {
      finished = resolve;
    });
    try {
      await new Promise<void>((resolve, reject) => {
        held.push((fail) => {
          if (fail) reject(fail);
          else resolve();
          return landed;
        });
      });
      return await real.write(buf, offset, length, position);
    } finally {
      state.inFlight--;
      finished();
    }
  };
  const fh = { write, datasync: () => real.datasync() } as unknown as FileHandle;
  return { fh, held, state };
}

/** Lets every callback already due run (nothing here waits on anything outside the process). */
const turn = () => new Promise<void>((resolve) => setImmediate(resolve));

/** A data stream at 0 into a fresh `size`-byte file `name` through a gated handle; closed after. */
async function withGatedStream(
  name: string,
  size: number,
  body: (gated: ReturnType<typeof gatedHandle>, stream: DataStream, path: string) => Promise<void>,
): Promise<void> {
  const path = join(dir, name);
  const real = await open(path, "w");
  try {
    await real.truncate(size);
    const gated = gatedHandle(real);
    await body(gated, new DataStream(gated.fh, 0), path);
  } finally {
    await real.close();
  }
}

test("a data stream keeps three 1 MiB writes in flight while the fourth buffer fills, never more", () =>
  withGatedStream("depth.img", 8 * MiB, async (gated, stream, path) => {
    const data = randomBytes(6 * MiB + 5);
    let putDone = false;
    const putting = stream.put(data).then(() => {
      putDone = true;
    });
    await turn();
    // Three buffers went out as they filled; the fourth filled and waits for one of them.
    assert.equal(gated.held.length, 3);
    assert.equal(gated.state.inFlight, 3);
    assert.equal(putDone, false);
    await gated.held[1]!(); // not the oldest: any write done frees its buffer
    await turn();
    assert.equal(gated.held.length, 4);
    assert.equal(gated.state.inFlight, 3);
    assert.equal(putDone, false);
    for (let i = 0; !putDone; i++) {
      if (i < gated.held.length) await gated.held[i]!();
      await turn();
    }
    await putting;
    const ending = stream.end();
    for (let i = 0; gated.held.length > i || gated.state.inFlight > 0; i++) {
      if (i < gated.held.length) await gated.held[i]!();
      await turn();
    }
    await ending;
    assert.equal(gated.state.most, 3);
    assert.ok((await readFile(path)).subarray(0, data.length).equals(data), "bytes differ");
  }));

test("a data stream's failed write is thrown by end(), once every other write has landed", () =>
  withGatedStream("failing.img", 4 * MiB, async (gated, stream) => {
    await stream.put(randomBytes(3 * MiB));
    await turn();
    assert.equal(gated.held.length, 3);
    await gated.held[0]!(Object.assign(new Error("EIO: injected"), { code: "EIO" }));
    let ended: unknown;
    // Read through a call: an assertion on the variable would narrow it for good.
    const outcome = () => ended;
    const ending = stream.end().then(
      () => {
        ended = "resolved";
      },
      (err: unknown) => {
        ended = err;
      },
    );
    await turn();
    assert.equal(outcome(), undefined, "end() returned while writes were in flight");
    await gated.held[1]!();
    await gated.held[2]!();
    await ending;
    assert.equal((outcome() as NodeJS.ErrnoException).code, "EIO");
    assert.equal(gated.state.inFlight, 0);
  }));

test("a seek far ahead writes nothing between: the bytes land at their positions, the gap stays a hole", async () => {
  const path = join(dir, "far-seek.img");
  const size = 64 * 1024 * MiB;
  const head = randomBytes(5000);
  const middle = randomBytes(MiB + 3);
  const tail = randomBytes(4096);
  const fh = await open(path, "w");
  try {
    await fh.truncate(size);
    const stream = new DataStream(fh, 0);
    await stream.put(head);
    await stream.seek(7 * 1024 * MiB + 123); // unaligned, far past the buffer
    await stream.put(middle);
    await stream.seek(size - tail.length);
    await stream.put(tail);
    await assert.rejects(stream.seek(0), /seek back/);
    await stream.end();
  } finally {
    await fh.close();
  }
  const fh2 = await open(path, "r");
  try {
    const at = async (pos: number, n: number) => {
      const b = Buffer.alloc(n);
      await fh2.read(b, 0, n, pos);
      return b;
    };
    assert.ok((await at(0, head.length)).equals(head));
    assert.ok((await at(7 * 1024 * MiB + 123, middle.length)).equals(middle));
    assert.ok((await at(size - tail.length, tail.length)).equals(tail));
    assert.ok((await at(3 * 1024 * MiB, 4096)).equals(Buffer.alloc(4096)));
  } finally {
    await fh2.close();
  }
  // Only the written blocks are allocated (a few MiB, not 64 GiB).
  assert.ok((await stat(path)).blocks * 512 < 8 * MiB);
});
