/**
 * HeaderPrefetch, fed by hand as a download would feed it: the entries it reads equal readTar's on
 * the same tar, its spool holds the decompressed tar of a compressed layer (an uncompressed one is
 * not spooled), and a layer that does not read (cut off,
 * wrong diff ID, not a tar) rejects take() with the error pass 1 would give, leaves no spool file,
 * and never holds the download.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, beforeEach, describe, test } from "node:test";
import { gzipSync } from "node:zlib";
import { isKilnError } from "../../src/errors.js";
import type { Inode } from "../../src/fs/tree.js";
import { type LayerEntry, TreeBuilder } from "../../src/layers/merge.js";
import { HeaderPrefetch } from "../../src/layers/prefetch.js";
import type { BlobTap } from "../../src/source/ingest.js";
import { readTar } from "../../src/tar/reader.js";

const sha = (b: Buffer) => `sha256:${createHash("sha256").update(b).digest("hex")}`;

let dir: string;
let spoolDir: string;
/** A layer's uncompressed tar (GNU tar, pax): a big file, a small one, an empty one, directories. */
let tar: Buffer;

before(() => {
  dir = mkdtempSync(join(tmpdir(), "kiln-prefetch-"));
  const root = join(dir, "root");
  mkdirSync(join(root, "a", "b"), { recursive: true });
  writeFileSync(join(root, "a", "big"), randomBytes(3_000_000));
  writeFileSync(join(root, "a", "b", "small"), "small\n");
  writeFileSync(join(root, "a", "empty"), "");
  tar = execFileSync("tar", ["-c", "-f", "-", "--format=pax", "--sort=name", "-C", root, "."], {
    maxBuffer: 64 << 20,
  });
});
after(() => rmSync(dir, { recursive: true, force: true }));
beforeEach(() => {
  spoolDir = mkdtempSync(join(dir, "spool-"));
});

const spoolFiles = () => readdirSync(spoolDir);

/** What pass 1 reads of `tar` itself. */
async function expectedEntries(t: Buffer): Promise<LayerEntry[]> {
  const out: LayerEntry[] = [];
  for await (const e of readTar(
    (async function* () {
      yield t;
    })(),
  )) {
    out.push({ header: e.header, offset: e.offset, stored: e.stored, sparse: e.sparse });
  }
  return out;
}

/** Writes `blob` to the tap in chunks of `chunk` bytes, as a download would; ends it unless told not to. */
async function feed(tap: BlobTap, blob: Buffer, opts: { chunk?: number; upTo?: number } = {}): Promise<void> {
  const chunk = opts.chunk ?? 65_536;
  const end = opts.upTo ?? blob.length;
  for (let at = 0; at < end; at += chunk) await tap.write(blob.subarray(at, Math.min(end, at + chunk)));
  if (opts.upTo === undefined) tap.end();
}

function prefetch(budget = 1 << 30): HeaderPrefetch {
  return new HeaderPrefetch({ spoolPrefix: join(spoolDir, "prefetch"), spoolBudget: budget });
}

const layer = (blob: Buffer, diffId: string | null = sha(tar)) => ({
  digest: sha(blob),
  diffId,
  index: 0,
  count: 1,
});

describe("HeaderPrefetch", () => {
  const compressions: [string, (b: Buffer) => Buffer][] = [
    ["gzip", (b) => gzipSync(b)],
    ["zstd", (b) => execFileSync("zstd", ["-c", "-q", "-3"], { input: b, maxBuffer: 64 << 20 })],
    ["none", (b) => b],
  ];
  for (const [name, compress] of compressions) {
    test(`${name}: the entries equal readTar's, and the spool is the decompressed tar`, async () => {
      const blob = compress(tar);
      const p = prefetch();
      const tap = p.tap(layer(blob))!;
      assert.ok(tap);
      await feed(tap, blob, { chunk: 1000 + 7 });
      const got = await p.take(sha(blob))!;
      assert.deepEqual(got.entries, await expectedEntries(tar));
      if (name === "none") {
        // An uncompressed layer is read from its blob by position: nothing to spool.
        assert.equal(got.spool, undefined);
        assert.deepEqual(spoolFiles(), []);
        await p.close();
        return;
      }
      assert.ok(got.spool?.complete);
      assert.equal(got.spool.size, tar.length);
      assert.ok(readFileSync(join(spoolDir, "prefetch-0")).equals(tar));
      // Taken over: the prefetch forgets it, and close() leaves the spool to its new owner.
      assert.equal(p.take(sha(blob)), undefined);
      await p.close();
      assert.deepEqual(spoolFiles(), ["prefetch-0"]);
      await got.spool.discard();
      assert.deepEqual(spoolFiles(), []);
    });
  }

  test("a layer is tapped once; an untapped one has nothing to take", async () => {
    const blob = gzipSync(tar);
    const p = prefetch();
    const tap = p.tap(layer(blob))!;
    assert.equal(p.tap(layer(blob)), undefined, "the same digest again");
    assert.equal(p.take(sha(Buffer.from("other"))), undefined);
    await feed(tap, blob);
    await p.close();
    assert.deepEqual(spoolFiles(), [], "close() removes a spool nobody took");
  });

  test("over the budget: the entries all the same, no spool, no file left", async () => {
    for (const budget of [0, tar.length - 1]) {
      const blob = gzipSync(tar);
      const p = prefetch(budget);
      const tap = p.tap(layer(blob))!;
      await feed(tap, blob);
      const got = await p.take(sha(blob))!;
      assert.deepEqual(got.entries, await expectedEntries(tar));
      assert.equal(got.spool, undefined, `budget ${budget}`);
      assert.deepEqual(spoolFiles(), []);
      await p.close();
    }
  });

  test("a download cut mid-way: take() rejects with its error, no spool left", async () => {
    const blob = gzipSync(tar);
    const p = prefetch();
    const tap = p.tap(layer(blob))!;
    await feed(tap, blob, { upTo: Math.floor(blob.length / 2) });
    const cut = new Error("the download stopped");
    tap.abort(cut);
    await assert.rejects(p.take(sha(blob))!, (err) => err === cut);
    assert.deepEqual(spoolFiles(), []);
    await p.close();
  });

  test("a wrong diff ID: DIGEST_MISMATCH naming the layer, no spool left", async () => {
    const blob = gzipSync(tar);
    const p = prefetch();
    const tap = p.tap({ ...layer(blob, sha(Buffer.from("another tar"))), index: 1, count: 3 })!;
    await feed(tap, blob);
    await assert.rejects(
      p.take(sha(blob))!,
      (err) => isKilnError(err, "DIGEST_MISMATCH") && err.message.includes(`layer 2/3 (${sha(blob)})`),
    );
    assert.deepEqual(spoolFiles(), []);
    await p.close();
  });

  test("not a tar: INVALID_ARCHIVE, and the rest of the download is never held", async () => {
    // 20 MiB of noise after a broken header: more than the tap queues before a writer waits.
    const notTar = Buffer.concat([Buffer.alloc(512, 0x41), randomBytes(20 << 20)]);
    const blob = gzipSync(notTar, { level: 1 });
    const p = prefetch();
    const tap = p.tap(layer(blob, sha(notTar)))!;
    await feed(tap, blob); // resolves: a failed reader drops what the download still writes
    await assert.rejects(p.take(sha(blob))!, (err) => isKilnError(err, "INVALID_ARCHIVE"));
    assert.deepEqual(spoolFiles(), []);
    await p.close();
  });
});

/** An uncompressed tar of `files` (path → content; a path ending in "/" is a directory). */
function tarOf(files: Record<string, string>): Buffer {
  const root = mkdtempSync(join(dir, "layer-"));
  for (const [path, content] of Object.entries(files)) {
    if (path.endsWith("/")) mkdirSync(join(root, path), { recursive: true });
    else {
      mkdirSync(join(root, path, ".."), { recursive: true });
      writeFileSync(join(root, path), content);
    }
  }
  return execFileSync("tar", ["-c", "-f", "-", "--format=pax", "--sort=name", "--mtime=@0", "-C", root, "."]);
}

/** The tree TreeBuilder makes of these layers, each read whole and added in order. */
async function mergedWhole(tars: Buffer[]): Promise<Inode> {
  const b = new TreeBuilder({ fixedTime: 0 });
  for (let i = 0; i < tars.length; i++) await b.addLayer(i, await expectedEntries(tars[i]!));
  return b.finish();
}

describe("HeaderPrefetch merging layers as they are read", () => {
  // Whiteouts make the order matter: layer 1 deletes a/x of layer 0.
  const tars = () => [
    tarOf({ "a/x": "x", "a/y": "y" }),
    tarOf({ "a/.wh.x": "", b: "b".repeat(100_000) }),
    tarOf({ "a/z": "z" }),
  ];
  const merging = () =>
    new HeaderPrefetch({
      spoolPrefix: join(spoolDir, "prefetch"),
      spoolBudget: 1 << 30,
      builder: new TreeBuilder({ fixedTime: 0 }),
    });
  const at = (blob: Buffer, index: number, count: number) => ({
    digest: sha(blob),
    diffId: sha(blob),
    index,
    count,
  });

  test("bottom first, a layer read early waits its turn; one that ends before its turn is left to the export", async () => {
    const [l0, l1, l2] = tars() as [Buffer, Buffer, Buffer];
    const p = merging();
    const t0 = p.tap(at(l0, 0, 3))!;
    const t1 = p.tap(at(l1, 1, 3))!;
    const t2 = p.tap(at(l2, 2, 3))!;
    // Layer 1 starts before layer 0 ends (what it has read waits), layer 2 ends before layer 1 does.
    // Each take() below resolves once that layer is read (and merged, when its turn came).
    await feed(t1, l1, { chunk: 512, upTo: 1024 });
    await feed(t2, l2);
    const r2 = await p.take(sha(l2))!;
    await feed(t0, l0);
    const r0 = await p.take(sha(l0))!;
    for (let at = 1024; at < l1.length; at += 4096)
      await t1.write(l1.subarray(at, Math.min(l1.length, at + 4096)));
    t1.end();
    const r1 = await p.take(sha(l1))!;
    assert.equal(r0.merged, 0);
    assert.equal(r1.merged, 1);
    assert.deepEqual(r0.entries, []);
    assert.deepEqual(r1.entries, []);
    assert.equal(r2.merged, undefined, "layer 2 ended before layer 1 did");
    assert.deepEqual(r2.entries, await expectedEntries(l2));
    await p.builder!.addLayer(2, r2.entries);
    assert.deepEqual(p.builder!.finish(), await mergedWhole([l0, l1, l2]));
    await p.close();
  });

  test("above a layer that is not tapped (already in the store), nothing is merged", async () => {
    const [l0, l1] = tars() as [Buffer, Buffer];
    const p = merging();
    const t1 = p.tap(at(l1, 1, 2))!;
    await feed(t1, l1);
    const r1 = await p.take(sha(l1))!;
    assert.equal(r1.merged, undefined);
    assert.deepEqual(r1.entries, await expectedEntries(l1));
    await p.builder!.addLayer(0, await expectedEntries(l0));
    await p.builder!.addLayer(1, r1.entries);
    assert.deepEqual(p.builder!.finish(), await mergedWhole([l0, l1]));
    await p.close();
  });

  test("an entry the merge refuses fails its own layer, and the layers above wait for the export", async () => {
    const bad = tarOf({ ".wh.x/y": "below a whiteout name" });
    const [l0, , l2] = tars() as [Buffer, Buffer, Buffer];
    const p = merging();
    const t2 = p.tap(at(l2, 2, 3))!;
    const t1 = p.tap(at(bad, 1, 3))!;
    const t0 = p.tap(at(l0, 0, 3))!;
    await feed(t0, l0);
    assert.equal((await p.take(sha(l0))!).merged, 0);
    await feed(t1, bad);
    await feed(t2, l2);
    await assert.rejects(
      p.take(sha(bad))!,
      (err) => isKilnError(err, "INVALID_ARCHIVE") && /whiteout/.test(err.message),
    );
    const r2 = await p.take(sha(l2))!;
    assert.equal(r2.merged, undefined);
    assert.deepEqual(r2.entries, await expectedEntries(l2));
    await p.close();
  });
});
