import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import {
  closeSync,
  createReadStream,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { isKilnError } from "../../src/errors.js";
import { logicalContent } from "../../src/fs/sparse.js";
import { dataOrder, type Inode, newInode } from "../../src/fs/tree.js";
import { LayerContent } from "../../src/layers/content.js";
import { openLayerStream } from "../../src/layers/decompress.js";
import { readTar } from "../../src/tar/reader.js";

const sha256 = (b: Buffer) => createHash("sha256").update(b).digest("hex");

interface Layer {
  blob: string;
  diffId: string;
  root: string;
}

let dir: string;
const layers: Layer[] = [];

/** Builds layer `i` from a directory: GNU tar (pax or gnu, sparse aware), then compressed. */
function makeLayer(
  i: number,
  files: Record<string, Buffer | number>,
  tarArgs: string[],
  compress: string[] | null,
): void {
  const root = join(dir, `root${i}`);
  for (const [name, content] of Object.entries(files)) {
    mkdirSync(join(root, name, ".."), { recursive: true });
    if (typeof content === "number") {
      // Sparse: a few data regions in a file of `content` bytes.
      writeFileSync(join(root, name), "");
      truncateSync(join(root, name), content);
      const fd = openSync(join(root, name), "r+");
      for (let at = 4096; at + 3000 < content; at += Math.floor(content / 5))
        writeSync(fd, randomBytes(3000), 0, 3000, at);
      closeSync(fd);
    } else {
      writeFileSync(join(root, name), content);
    }
  }
  const tar = execFileSync("tar", ["-c", "-f", "-", "-C", root, ...tarArgs, "."], { maxBuffer: 64 << 20 });
  const blob = join(dir, `layer${i}`);
  writeFileSync(
    blob,
    compress ? execFileSync(compress[0]!, compress.slice(1), { input: tar, maxBuffer: 64 << 20 }) : tar,
  );
  layers[i] = { blob, diffId: `sha256:${sha256(tar)}`, root };
}

const open =
  (diffIds: string[], opened: number[] = []) =>
  async (i: number) => {
    opened.push(i);
    return openLayerStream(createReadStream(layers[i]!.blob), { diffId: diffIds[i], label: `layer ${i}` });
  };

/** Pass 1 by hand: one flat tree of every regular file of every layer, remembering its source file. */
async function buildTree(): Promise<{ root: Inode; sources: Map<Inode, string> }> {
  const root = newInode("directory");
  const sources = new Map<Inode, string>();
  for (const [i, layer] of layers.entries()) {
    for await (const e of readTar(openLayerStream(createReadStream(layer.blob), { diffId: layer.diffId }))) {
      if (e.header.type !== "file") continue;
      const inode = newInode("file", {
        size: e.size,
        data:
          e.size === 0 ? undefined : { layer: i, offset: e.offset, stored: e.stored, sparse: e.sparse?.map },
      });
      root.entries!.set(`${i}:${e.header.path}`, inode);
      sources.set(inode, join(layer.root, e.header.path));
    }
  }
  return { root, sources };
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
  dir = mkdtempSync(join(tmpdir(), "kiln-content-"));
  makeLayer(
    0,
    {
      "a/small": Buffer.from("small"),
      "a/big": randomBytes(1_500_000),
      "b/empty": Buffer.alloc(0),
      holes: 8 << 20,
    },
    ["--format=pax", "-S", "--sparse-version=1.0"],
    ["gzip", "-c", "-n"],
  );
  makeLayer(
    1,
    { "c/x": randomBytes(70_000), "c/y": Buffer.from("y"), sparse: 3 << 20 },
    ["--format=gnu", "-S"],
    ["zstd", "-c", "-q"],
  );
  makeLayer(2, { z: randomBytes(600) }, ["--format=pax"], null);
});

after(() => rmSync(dir, { recursive: true, force: true }));

describe("LayerContent", () => {
  test("every file's stored bytes (a sparse file's regions only), each layer read once", async () => {
    const { root, sources } = await buildTree();
    const files = dataOrder(root);
    assert.ok(
      files.some((f) => f.data?.sparse),
      "sparse files are in the tree",
    );
    const opened: number[] = [];
    const content = new LayerContent(
      open(
        layers.map((l) => l.diffId),
        opened,
      ),
    );
    let count = 0;
    for await (const { inode, data } of content.contents(files)) {
      const parts: Buffer[] = [];
      const delivered: Buffer[] = [];
      const tee = async function* () {
        for await (const c of data) {
          delivered.push(Buffer.from(c));
          yield c;
        }
      };
      for await (const c of logicalContent(inode, tee(), () => sources.get(inode)!))
        parts.push(Buffer.from(c));
      const bytes = Buffer.concat(parts);
      assert.equal(bytes.length, inode.size);
      // Holes never arrive: a sparse file delivers its stored bytes only.
      assert.equal(Buffer.concat(delivered).length, inode.data?.stored);
      assert.equal(sha256(bytes), sha256(readFileSync(sources.get(inode)!)), sources.get(inode));
      count++;
    }
    assert.equal(count, files.length);
    assert.deepEqual(opened, [0, 1, 2]);
  });

  test("files whose data is not read are skipped; files without data are empty", async () => {
    const { root, sources } = await buildTree();
    const files = dataOrder(root);
    const withEmpty = [newInode("file"), ...files];
    let i = 0;
    for await (const { inode, data } of new LayerContent(open(layers.map((l) => l.diffId))).contents(
      withEmpty,
    )) {
      if (i++ % 2 === 0) continue; // leave every other file unread
      const parts: Buffer[] = [];
      for await (const c of logicalContent(inode, data, () => "")) parts.push(Buffer.from(c));
      assert.equal(sha256(Buffer.concat(parts)), sha256(readFileSync(sources.get(inode)!)));
    }
    assert.equal(i, withEmpty.length);
  });

  test("a wrong diff ID fails the pass with DIGEST_MISMATCH naming the layer", async () => {
    const { root } = await buildTree();
    const diffIds = layers.map((l) => l.diffId);
    diffIds[1] = `sha256:${"1".repeat(64)}`;
    await rejects(
      (async () => {
        for await (const { data } of new LayerContent(open(diffIds)).contents(dataOrder(root)))
          for await (const _ of data);
      })(),
      "DIGEST_MISMATCH",
      /^layer 1: /,
    );
  });

  test("files out of dataOrder are INTERNAL; data past the stream's end is INVALID_ARCHIVE", async () => {
    const { root } = await buildTree();
    const files = dataOrder(root);
    const content = new LayerContent(open(layers.map((l) => l.diffId)));
    await rejects(
      (async () => {
        for await (const _ of content.contents([...files].reverse()));
      })(),
      "INTERNAL",
      /not in dataOrder/,
    );
    const beyond = newInode("file", { size: 10, data: { layer: 2, offset: 10 << 20, stored: 10 } });
    await rejects(
      (async () => {
        for await (const _ of content.contents([beyond]));
      })(),
      "INVALID_ARCHIVE",
      /^layer 2: stream ends before/,
    );
  });
});
