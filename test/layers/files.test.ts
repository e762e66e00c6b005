/**
 * LayerFiles: each layer blob read by both passes. Compressed layers are decompressed and checked
 * in pass 1 and, when spooled, read back from the spool in pass 2; verified uncompressed layers are
 * read by position in both passes. Whatever the path, pass 2 gives every file's exact bytes, the
 * progress counts reach each blob's size, and close() leaves no spool behind.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { isKilnError } from "../../src/errors.js";
import { dataOrder, type Inode, newInode } from "../../src/fs/tree.js";
import { LayerContent } from "../../src/layers/content.js";
import { type LayerBlob, LayerFiles } from "../../src/layers/files.js";
import { BlobStore } from "../../src/store/blobs.js";
import { isByteSource, readTar } from "../../src/tar/reader.js";

const sha256 = (b: Buffer) => createHash("sha256").update(b).digest("hex");

let dir: string;
let blobs: BlobStore;
let spoolDir: string;
/** Layers: gzip, zstd, plain (diff ID = digest), plain without a diff ID. */
const layers: LayerBlob[] = [];
/** Per layer: path in the tar → content. */
const contents: Map<string, Buffer>[] = [];

function addLayer(files: Record<string, Buffer>, compress: string[] | null, withDiffId = true): void {
  const root = join(dir, `root${layers.length}`);
  for (const [name, content] of Object.entries(files)) {
    mkdirSync(join(root, name, ".."), { recursive: true });
    writeFileSync(join(root, name), content);
  }
  const tar = execFileSync("tar", ["-c", "-f", "-", "--format=pax", "-C", root, "."], {
    maxBuffer: 64 << 20,
  });
  const blob = compress
    ? execFileSync(compress[0]!, compress.slice(1), { input: tar, maxBuffer: 64 << 20 })
    : tar;
  const digest = `sha256:${sha256(blob)}`;
  mkdirSync(blobs.dir, { recursive: true });
  writeFileSync(blobs.path(digest), blob);
  layers.push({ digest, diffId: withDiffId ? `sha256:${sha256(tar)}` : null });
  contents.push(new Map(Object.entries(files).map(([k, v]) => [`./${k}`, v])));
}

before(() => {
  dir = mkdtempSync(join(tmpdir(), "kiln-files-"));
  blobs = new BlobStore(join(dir, "store"));
  spoolDir = join(dir, "spool");
  mkdirSync(spoolDir);
  addLayer({ "a/big": randomBytes(3_000_000), "a/small": Buffer.from("small") }, ["gzip", "-c", "-n"]);
  addLayer({ "b/x": randomBytes(70_000), "b/y": Buffer.from("y") }, ["zstd", "-c", "-q"]);
  addLayer({ "c/z": randomBytes(2_500_000), "c/w": Buffer.from("w") }, null);
  addLayer({ "d/v": randomBytes(10_000) }, null, false);
});
after(() => rmSync(dir, { recursive: true, force: true }));

/** Pass 1 through `files`, then pass 2 through LayerContent; returns every file's bytes and the counts. */
async function bothPasses(files: LayerFiles) {
  const root = newInode("directory");
  const counted = [0, 0];
  const kinds: string[] = [];
  for (let i = 0; i < layers.length; i++) {
    const tar = await files.tar(i, "headers", (n) => {
      counted[0]! += n;
    });
    kinds.push(isByteSource(tar) ? "position" : "stream");
    for await (const e of readTar(tar)) {
      if (e.header.type !== "file") continue;
      root.entries!.set(
        `${i}:${e.header.path}`,
        newInode("file", { size: e.size, data: { layer: i, offset: e.offset, stored: e.stored } }),
      );
    }
  }
  const names = new Map<Inode, string>([...root.entries!].map(([k, v]) => [v, k]));
  const got = new Map<string, Buffer>();
  const content = new LayerContent(async (i) => {
    const tar = await files.tar(i, "content", (n) => {
      counted[1]! += n;
    });
    kinds.push(isByteSource(tar) ? "position" : "stream");
    return tar;
  });
  for await (const { inode, data } of content.contents(dataOrder(root))) {
    const parts: Buffer[] = [];
    for await (const c of data) parts.push(Buffer.from(c));
    got.set(names.get(inode)!, Buffer.concat(parts));
  }
  return { got, counted, kinds };
}

function assertAllFiles(got: Map<string, Buffer>): void {
  for (const [i, files] of contents.entries()) {
    for (const [path, bytes] of files) {
      assert.ok(got.get(`${i}:${path}`)?.equals(bytes), `layer ${i} ${path}`);
    }
  }
}

const blobBytes = () => layers.reduce((n, l) => n + statSync(blobs.path(l.digest)).size, 0);

describe("LayerFiles", () => {
  test("spooled: compressed layers are read back from their spool; plain ones by position", async () => {
    const files = new LayerFiles(blobs, layers, (i) => `layer ${i}`, {
      spoolPrefix: join(spoolDir, "s"),
      spoolBudget: 1 << 30,
    });
    try {
      const { got, counted, kinds } = await bothPasses(files);
      assertAllFiles(got);
      // Pass 1: gzip, zstd decompressed; plain read by position. Pass 2: all by position.
      assert.deepEqual(kinds, ["stream", "stream", "position", "position", ...Array(4).fill("position")]);
      assert.deepEqual(counted, [blobBytes(), blobBytes()]);
      assert.equal(readdirSync(spoolDir).length, 2, "one spool per compressed layer");
    } finally {
      await files.close();
    }
    assert.deepEqual(readdirSync(spoolDir), [], "close() removes the spools");
  });

  for (const budget of [0, 100_000]) {
    test(`spool budget ${budget}: layers beyond it are decompressed again in pass 2`, async () => {
      const files = new LayerFiles(blobs, layers, (i) => `layer ${i}`, {
        spoolPrefix: join(spoolDir, "s"),
        spoolBudget: budget,
      });
      try {
        const { got, counted, kinds } = await bothPasses(files);
        assertAllFiles(got);
        // 100 kB holds the zstd layer's tar, not the gzip one's 3 MB.
        const second = budget === 0 ? ["stream", "stream"] : ["stream", "position"];
        assert.deepEqual(kinds.slice(4, 6), second);
        // A layer read again as a stream is counted by its compressed bytes read: the same total.
        assert.deepEqual(counted, [blobBytes(), blobBytes()]);
      } finally {
        await files.close();
      }
      assert.deepEqual(readdirSync(spoolDir), []);
    });
  }

  test("an uncompressed layer whose diff ID is not its digest is read and checked", async () => {
    const tar = readFileSync(blobs.path(layers[2]!.digest));
    const wrong: LayerBlob = {
      digest: layers[2]!.digest,
      diffId: `sha256:${sha256(Buffer.concat([tar, tar]))}`,
    };
    const files = new LayerFiles(blobs, [wrong], () => "layer 0", {
      spoolPrefix: join(spoolDir, "s"),
      spoolBudget: 1 << 30,
    });
    try {
      const input = await files.tar(0, "headers");
      assert.equal(isByteSource(input), false, "not trusted: streamed and hashed");
      await assert.rejects(
        (async () => {
          for await (const _ of readTar(input)) {
          }
        })(),
        (err: unknown) => isKilnError(err, "DIGEST_MISMATCH"),
      );
    } finally {
      await files.close();
    }
    assert.deepEqual(readdirSync(spoolDir), [], "no spool of a layer that failed its check");
  });

  test("a missing blob is NOT_FOUND naming it", async () => {
    const missing = `sha256:${"0".repeat(64)}`;
    const files = new LayerFiles(blobs, [{ digest: missing, diffId: null }], () => "layer 0");
    await assert.rejects(
      files.tar(0, "headers"),
      (err: unknown) => isKilnError(err, "NOT_FOUND") && err.message.includes(missing),
    );
    await files.close();
  });
});
