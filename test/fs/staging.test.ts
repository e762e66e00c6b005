/**
 * Staging (src/fs/staging.ts): file data written during pass 1 to provisional regions of the image
 * file, then moved into place by collapsing ranges. Checked on a real filesystem that collapses
 * (the temp dir's, or a loop-mounted ext4 when it cannot): what place() leaves must be exactly the
 * bytes a writer would have written at the planned blocks, zeros elsewhere, at the planned length.
 */
import assert from "node:assert/strict";
import { createReadStream, writeFileSync } from "node:fs";
import { mkdir, open, readdir, readFile, truncate } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { FILE_BLOCK } from "../../src/fs/file-blocks.js";
import { Staging } from "../../src/fs/staging.js";
import { type Inode, newInode } from "../../src/fs/tree.js";
import { readTar } from "../../src/tar/reader.js";
import { pseudoRandomBytes as bytes } from "../helpers/bytes.js";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";

const MiB = 2 ** 20;

/** A tar file as a plain stream of chunks (a ReadStream has a take() of its own). */
async function* chunks(tar: string): AsyncGenerator<Buffer> {
  yield* createReadStream(tar);
}

/** A tar of `files` (name → bytes, or a sparse file's size and regions) made by GNU tar. */
async function layerTar(
  dir: string,
  name: string,
  files: Record<string, Buffer | { size: number; at: [number, Buffer][] }>,
): Promise<string> {
  const root = join(dir, `${name}-root`);
  await mkdir(root);
  for (const [file, spec] of Object.entries(files)) {
    if (Buffer.isBuffer(spec)) writeFileSync(join(root, file), spec);
    else {
      writeFileSync(join(root, file), "");
      await truncate(join(root, file), spec.size);
      const fh = await open(join(root, file), "r+");
      for (const [pos, data] of spec.at) await fh.write(data, 0, data.length, pos);
      await fh.close();
    }
  }
  const tar = join(dir, `${name}.tar`);
  await run("tar", ["-c", "-f", tar, "--format=pax", "--sparse", "-C", root, ...Object.keys(files)]);
  return tar;
}

/** Stages every regular file of the tar as layer `index`; returns each file's data offset by name. */
async function stageLayer(staging: Staging, index: number, tar: string): Promise<Map<string, number>> {
  const stage = staging.stageLayer(index);
  const offsets = new Map<string, number>();
  for await (const e of readTar(chunks(tar))) {
    offsets.set(e.header.path, e.offset);
    if (e.header.type === "file") await stage.add(e);
  }
  await stage.finish();
  return offsets;
}

function fileAt(layer: number, offset: number, size: number): Inode {
  const inode = newInode("file", { size });
  inode.data = { layer, offset, stored: size };
  return inode;
}

/** Padded to whole blocks, as a writer lays a file out. */
function blocksOf(data: Buffer): Buffer {
  return Buffer.concat([data, Buffer.alloc((FILE_BLOCK - (data.length % FILE_BLOCK)) % FILE_BLOCK)]);
}

describe("staging file data in the image file", () => {
  let work: string;
  let dir: string;
  let mounted: string | undefined;

  before(async () => {
    work = await makeTempDir("staging");
    dir = join(work, "here");
    await mkdir(dir);
    const probe = await Staging.create(join(dir, "probe"), 1);
    if (probe) {
      await probe.discard();
      return;
    }
    // The temp dir's filesystem does not collapse ranges (tmpfs): a small ext4 that does.
    assert.equal(process.getuid?.(), 0, "no filesystem here collapses ranges, and only root can mount one");
    const disk = join(work, "disk.ext4");
    await run("truncate", ["-s", "256M", disk]);
    await run("mkfs.ext4", ["-q", disk]);
    await run("mount", ["-o", "loop", disk, dir]);
    mounted = dir;
  });
  after(async () => {
    if (mounted) await run("umount", [mounted]);
    if (work) await removeDir(work);
  });

  it("moves each live file to its planned block: the bytes of an image written in place", async () => {
    const a = bytes(5000, 1);
    const gone = bytes(9000, 2);
    const zeros = Buffer.alloc(8192);
    const sparseHead = bytes(4096, 3);
    const sparseTail = bytes(100, 4);
    const d = bytes(20000, 5);
    const replaced = bytes(3000, 6);
    const t0 = await layerTar(work, "l0", {
      a,
      gone,
      zeros,
      sparse: {
        size: 8 * MiB,
        at: [
          [MiB, sparseHead],
          [5 * MiB, sparseTail],
        ],
      },
    });
    const t1 = await layerTar(work, "l1", { d, replaced });
    const t2 = await layerTar(work, "l2", { late: bytes(7000, 7) });
    const path = join(dir, "image");
    const staging = (await Staging.create(path, 3))!;
    assert.ok(staging);
    const o0 = await stageLayer(staging, 0, t0);
    const o1 = await stageLayer(staging, 1, t1);
    // Layer 2 is given up after its first file: the writer must write it.
    const stage2 = staging.stageLayer(2);
    let lateOffset = -1;
    for await (const e of readTar(chunks(t2))) {
      if (e.header.type !== "file") continue;
      lateOffset = e.offset;
      await stage2.add(e);
    }
    await stage2.abandon();

    // The plan: metadata in blocks 0-2, then a, zeros, sparse (layer 0; `gone` was removed by a
    // later layer), d (layer 1; `replaced` too), then layer 2's file.
    const sparse = fileAt(0, o0.get("sparse")!, 8 * MiB);
    (sparse.data as { sparse: unknown }).sparse = [
      { offset: MiB, size: 4096 },
      { offset: 5 * MiB, size: 100 },
    ];
    const late = fileAt(2, lateOffset, 7000);
    const files = [
      fileAt(0, o0.get("a")!, a.length),
      fileAt(0, o0.get("zeros")!, zeros.length),
      sparse,
      fileAt(1, o1.get("d")!, d.length),
      late,
    ];
    const blocks = [2, 2, 2, 5, 2];
    const starts = [3, 5, 7, 9, 14];
    const where = (f: Inode) => {
      const i = files.indexOf(f);
      return { start: starts[i]!, blocks: blocks[i]! };
    };
    const size = 20 * FILE_BLOCK;
    const unstaged = await staging.place(files, where, size);
    assert.deepEqual([...unstaged], [2]);

    const expected = Buffer.alloc(size);
    blocksOf(a).copy(expected, 3 * FILE_BLOCK);
    blocksOf(Buffer.concat([sparseHead, blocksOf(sparseTail)])).copy(expected, 7 * FILE_BLOCK);
    blocksOf(d).copy(expected, 9 * FILE_BLOCK);
    const got = await readFile(path);
    assert.equal(got.length, size);
    assert.ok(got.equals(expected), "the staged bytes where the plan put them, zeros elsewhere");
    // Zero blocks stayed holes, and nothing was copied: only the live blocks are allocated.
    const allocated = Number((await run("stat", ["-c", "%b", path])).trim()) * 512;
    assert.ok(allocated <= (2 + 2 + 5) * FILE_BLOCK, `${allocated} bytes allocated`);
    await staging.discard();
    assert.deepEqual(await readdir(dir), ["image"].concat(mounted ? ["lost+found"] : []).sort());
  });

  it("a file laid out otherwise than the plan says, or missing, leaves its layer to the writer", async () => {
    const t0 = await layerTar(work, "m0", { x: bytes(5000, 8), y: bytes(100, 9) });
    const path = join(dir, "image2");
    const staging = (await Staging.create(path, 1))!;
    const o0 = await stageLayer(staging, 0, t0);
    const x = fileAt(0, o0.get("x")!, 5000);
    const nowhere = fileAt(0, o0.get("y")! + 512, 100);
    const unstaged = await staging.place(
      [x, nowhere],
      (f) => ({ start: f === x ? 1 : 3, blocks: 2 }),
      8 * FILE_BLOCK,
    );
    assert.deepEqual([...unstaged], [0]);
    const got = await readFile(path);
    assert.ok(
      got.equals(Buffer.alloc(8 * FILE_BLOCK)),
      "nothing of the layer is left for the writer to write over",
    );
    await staging.discard();
  });

  it("where the filesystem cannot collapse ranges: no staging, nothing left behind", async (t) => {
    if (process.getuid?.() !== 0) return t.skip("not root: cannot mount a tmpfs");
    const tmpfs = join(work, "tmpfs");
    await mkdir(tmpfs);
    await run("mount", ["-t", "tmpfs", "-o", "size=16m", "tmpfs", tmpfs]);
    try {
      assert.equal(await Staging.create(join(tmpfs, "image"), 2), undefined);
      assert.deepEqual(await readdir(tmpfs), []);
    } finally {
      await run("umount", [tmpfs]);
    }
  });
});
