/**
 * Sparse files end to end (issue 23, the sparse bomb): layers hold GNU sparse files of 1 TiB and
 * 8 TiB with a few KiB of data, written by GNU tar in each sparse format (old GNU, PAX 0.0, 0.1,
 * 1.0). Every output keeps the holes as holes: ext4 extents map only the blocks that hold data,
 * EROFS files are chunk-based with null chunks, both images stay small; cpio refuses a file over
 * newc's 4 GiB naming it, and materializes the holes of a smaller one. Mounted as root, each file
 * reads its data at its offsets and zeros in its holes. A pull that stages ext4 data during pass 1
 * gives the same bytes as an export.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { createReadStream, existsSync, statSync } from "node:fs";
import { mkdir, mkdtemp, open, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { readTar } from "../../src/tar/reader.js";
import { pseudoRandomBytes as bytes } from "../helpers/bytes.js";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { buildImage, pushImage } from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import { assertFails, type Sandbox, sandbox } from "./kiln.js";

const KiB = 2 ** 10;
const MiB = 2 ** 20;
const GiB = 2 ** 30;
const TiB = 2 ** 40;
const BLOCK = 4096;

/** A sparse file: its apparent size and the data written into it (the rest is holes). */
interface SparseFile {
  size: number;
  data: [offset: number, bytes: Buffer][];
}

interface LayerCase {
  /** GNU tar's options for this layer's sparse format. */
  tar: string[];
  files: Record<string, SparseFile>;
  /** An xattr set on a file (`setfattr`): EROFS puts its block map after the xattrs. */
  xattr?: { file: string; name: string; value: string };
}

const LAYERS: LayerCase[] = [
  {
    tar: ["--format=gnu"],
    files: { "gnu/bomb": { size: TiB, data: [[512 * GiB, bytes(4 * KiB, 1)]] } },
  },
  {
    tar: ["--format=posix", "--sparse-version=0.0"],
    files: { "pax00/bomb": { size: TiB, data: [[TiB - 4 * KiB, bytes(4 * KiB, 2)]] } },
  },
  {
    tar: ["--format=posix", "--sparse-version=0.1"],
    files: {
      "pax01/bomb": {
        size: TiB,
        data: [
          [0, bytes(4 * KiB, 3)],
          [TiB / 2 + 4 * KiB, bytes(100, 4)],
        ],
      },
    },
  },
  {
    // GNU tar 1.34 writes PAX sparse 1.0 with --format=posix.
    tar: ["--format=posix"],
    files: {
      "pax10/bomb": { size: TiB, data: [[7 * GiB + 3 * BLOCK, bytes(4 * KiB, 5)]] },
      huge: {
        size: 8 * TiB,
        data: [
          [5 * TiB, bytes(4 * KiB, 6)],
          [8 * TiB - 1, bytes(1, 7)],
        ],
      },
    },
  },
  {
    // Holes found by reading (512-byte granularity): regions that are not 4 KiB aligned.
    tar: ["--format=posix", "--hole-detection=raw", "--xattrs", "--xattrs-include=*"],
    xattr: { file: "multi/file", name: "user.kiln", value: "sparse-with-xattrs" },
    files: {
      "multi/file": {
        size: 40 * MiB + 5,
        data: [
          [0, bytes(5000, 8)],
          [3 * MiB + 2 * BLOCK + 600, bytes(10, 9)],
          [17 * MiB, bytes(8 * KiB, 10)],
          [40 * MiB + 5 - 7, bytes(7, 11)],
        ],
      },
    },
  },
];

const ALL: Record<string, SparseFile> = Object.assign({}, ...LAYERS.map((l) => l.files));

/** `truncate` and `dd` make the file, GNU tar the layer. */
async function layerTar(dir: string, index: number, layer: LayerCase): Promise<string> {
  const root = join(dir, `root-${index}`);
  for (const [name, f] of Object.entries(layer.files)) {
    const path = join(root, name);
    await mkdir(join(path, ".."), { recursive: true });
    await run("truncate", ["-s", String(f.size), path]);
    for (const [offset, data] of f.data) {
      const piece = join(dir, "piece");
      await writeFile(piece, data);
      await run("dd", [
        `if=${piece}`,
        `of=${path}`,
        "oflag=seek_bytes",
        `seek=${offset}`,
        "conv=notrunc",
        "status=none",
      ]);
    }
  }
  const x = layer.xattr;
  if (x) await run("setfattr", ["-n", x.name, "-v", x.value, join(root, x.file)]);
  const tar = join(dir, `layer-${index}.tar`);
  await run("tar", ["-c", "-f", tar, "--sparse", ...layer.tar, "-C", root, ...Object.keys(layer.files)]);
  return tar;
}

/** Logical blocks that hold data, as sorted [first, end) runs. */
function dataBlocks(f: SparseFile): [number, number][] {
  const spans = f.data
    .map(([o, d]) => [Math.floor(o / BLOCK), Math.ceil((o + d.length) / BLOCK)] as [number, number])
    .sort((a, b) => a[0] - b[0]);
  const runs: [number, number][] = [];
  for (const s of spans) {
    const last = runs[runs.length - 1];
    if (last && s[0] <= last[1]) last[1] = Math.max(last[1], s[1]);
    else runs.push([...s]);
  }
  return runs;
}

/** Logical block runs of an ext4 file's extents, as debugfs lists them (leaves only). */
async function extentRuns(image: string, path: string): Promise<[number, number][]> {
  const out = await run("debugfs", ["-R", `ex /${path}`, image]);
  const runs: [number, number][] = [];
  for (const line of out.split("\n")) {
    // " 0/ 0   1/  2    262144 -    262144    11 -    11      1 " (a leaf: physical start - end)
    const m = /^\s*(\d+)\/\s*(\d+)\s+\d+\/\s*\d+\s+(\d+)\s+-\s+(\d+)\s+\d+\s+-\s+\d+\s+(\d+)/.exec(line);
    if (!m || m[1] !== m[2]) continue;
    const last = runs[runs.length - 1];
    const from = Number(m[3]);
    const to = Number(m[4]) + 1;
    if (last && last[1] === from) last[1] = to;
    else runs.push([from, to]);
  }
  return runs;
}

/** Offsets in holes to read back: around and between the data, and both ends when they are holes. */
function holeProbes(f: SparseFile): number[] {
  const inData = (o: number) => f.data.some(([d, b]) => o + 64 > d && o < d + b.length);
  const probes = [0, f.size - 64, f.size / 2];
  for (const [o, d] of f.data) probes.push(o - 4 * KiB, o + d.length + 100, Math.floor((o + f.size) / 2));
  return probes.map((o) => Math.max(0, Math.min(f.size - 64, Math.floor(o)))).filter((o) => !inData(o));
}

/** Checks the xattr of the layers' case on a mounted tree (with `getfattr`). */
async function checkXattr(mnt: string, only: readonly LayerCase[] = LAYERS): Promise<void> {
  for (const { xattr } of only) {
    if (!xattr) continue;
    const got = await run("getfattr", ["--only-values", "-n", xattr.name, join(mnt, xattr.file)]);
    assert.equal(got, xattr.value, `${xattr.file}: ${xattr.name}`);
  }
}

/** Reads the mounted file's data at its offsets and zeros in its holes; returns its st_blocks. */
async function checkMounted(mnt: string, name: string, f: SparseFile): Promise<number> {
  const path = join(mnt, name);
  const st = await stat(path);
  assert.equal(st.size, f.size, `${name}: size`);
  const fh = await open(path, "r");
  try {
    for (const [offset, data] of f.data) {
      const got = Buffer.alloc(data.length);
      await fh.read(got, 0, data.length, offset);
      assert.ok(got.equals(data), `${name}: the data at ${offset}`);
    }
    for (const offset of holeProbes(f)) {
      const got = Buffer.alloc(64, 1);
      const { bytesRead } = await fh.read(got, 0, 64, offset);
      assert.equal(bytesRead, 64);
      assert.ok(got.equals(Buffer.alloc(64)), `${name}: zeros at ${offset}`);
    }
  } finally {
    await fh.close();
  }
  return st.blocks;
}

async function withMount<T>(image: string, type: string, body: (dir: string) => Promise<T>): Promise<T> {
  const mnt = await makeTempDir("sparse-mnt");
  await run("mount", ["-t", type, "-o", "loop,ro", image, mnt]);
  try {
    return await body(mnt);
  } finally {
    await run("umount", [mnt]);
    await removeDir(mnt);
  }
}

const sha = async (file: string) => {
  const h = createHash("sha256");
  for await (const c of createReadStream(file)) h.update(c);
  return h.digest("hex");
};

/** A file as a plain stream of chunks (a ReadStream has a take() of its own). */
async function* chunks(file: string): AsyncGenerator<Buffer> {
  yield* createReadStream(file);
}

const canMount = process.getuid?.() === 0;

describe("sparse files through kiln export", () => {
  let reg: Registry;
  let work: string;
  let box: Sandbox;
  let ref: string;
  let multiRef: string;

  before(async () => {
    work = await makeTempDir("sparse");
    reg = await startRegistry();
    box = await sandbox();
    const tars: string[] = [];
    for (const [i, layer] of LAYERS.entries()) tars.push(await layerTar(work, i, layer));
    const image = await buildImage(join(work, "oci"), {
      tag: "all",
      layers: tars.map((tarFile) => ({ tarFile })),
    });
    ref = (await pushImage(image, reg, "sparse/all:1")).ref;
    const multi = await buildImage(join(work, "oci"), {
      tag: "multi",
      layers: [{ tarFile: tars[tars.length - 1]! }],
    });
    multiRef = (await pushImage(multi, reg, "sparse/multi:1")).ref;
    await box.json(["pull", ref]);
    await box.json(["pull", multiRef]);
  });
  after(async () => {
    await reg?.stop();
    await box?.cleanup();
    if (work) await removeDir(work);
  });

  it("the layers hold every sparse format, a region not aligned to 4 KiB and one at the very end", async () => {
    const formats = new Set<string>();
    let unaligned = false;
    for (const [i] of LAYERS.entries()) {
      for await (const e of readTar(chunks(join(work, `layer-${i}.tar`)))) {
        if (!e.sparse) continue;
        formats.add(e.header.sparse!.format);
        unaligned ||= e.sparse.map.some((r) => r.offset % BLOCK !== 0 || r.size % BLOCK !== 0);
        const f = ALL[e.header.path]!;
        assert.equal(e.sparse.realSize, f.size);
        assert.ok(e.stored < 64 * KiB, `${e.header.path}: ${e.stored} bytes stored`);
      }
    }
    assert.deepEqual([...formats].sort(), ["gnu-old", "pax-0.0", "pax-0.1", "pax-1.0"]);
    assert.ok(unaligned, "a region is not 4 KiB aligned");
  });

  it("ext4: extents cover only the data; e2fsck is clean; a staged pull gives the same bytes", async () => {
    const out = join(work, "all.ext4");
    await box.json(["export", ref, "--format", "ext4", "-o", out]);
    await run("e2fsck", ["-fn", out]);
    assert.ok(statSync(out).size < 64 * MiB, `image of ${statSync(out).size} bytes`);
    for (const [name, f] of Object.entries(ALL)) {
      assert.deepEqual(await extentRuns(out, name), dataBlocks(f), `${name}: extents`);
      assert.match(await run("debugfs", ["-R", `stat /${name}`, out]), new RegExp(`Size: ${f.size}\\b`));
    }
    assert.match(await run("debugfs", ["-R", "ea_list /multi/file", out]), /user\.kiln.*sparse-with-xattrs/);
    // The pull stages file data in the image file during pass 1 (data regions only).
    const fresh = await sandbox();
    try {
      const pulled = join(work, "pulled.ext4");
      await fresh.json(["pull", ref, "--format", "ext4", "-o", pulled]);
      assert.equal(await sha(pulled), await sha(out));
    } finally {
      await fresh.cleanup();
    }
  });

  it("ext4 mounted: data at its offsets, zeros in the holes, few blocks allocated", async (t) => {
    if (!canMount) return t.skip("not root: cannot loop-mount");
    await withMount(join(work, "all.ext4"), "ext4", async (mnt) => {
      for (const [name, f] of Object.entries(ALL)) {
        const blocks = await checkMounted(mnt, name, f);
        const mapped = dataBlocks(f).reduce((n, [a, b]) => n + b - a, 0);
        // Data blocks, and at most one extent tree block.
        assert.ok(blocks * 512 <= (mapped + 1) * BLOCK, `${name}: ${blocks} sectors`);
      }
      await checkXattr(mnt);
    });
  });

  it("erofs: chunk-based files with null chunks; fsck.erofs is clean; reproducible", async () => {
    const out = join(work, "all.erofs");
    await box.json(["export", ref, "--format", "erofs", "-o", out]);
    await run("fsck.erofs", [out]);
    assert.ok(statSync(out).size < 64 * MiB, `image of ${statSync(out).size} bytes`);
    assert.match(await run("dump.erofs", [`--path=/huge`, out]), /Layout: 4\b/);
    const fresh = await sandbox();
    try {
      const pulled = join(work, "pulled.erofs");
      await fresh.json(["pull", ref, "--format", "erofs", "-o", pulled]);
      assert.equal(await sha(pulled), await sha(out));
    } finally {
      await fresh.cleanup();
    }
    if (!canMount) return;
    await withMount(out, "erofs", async (mnt) => {
      for (const [name, f] of Object.entries(ALL)) await checkMounted(mnt, name, f);
      await checkXattr(mnt);
    });
  });

  it("erofs-layers: each layer's image holds its sparse files as chunks", async () => {
    const out = join(work, "layers");
    await box.json(["export", ref, "--format", "erofs-layers", "-o", out]);
    for (const [i, layer] of LAYERS.entries()) {
      const image = join(out, `layer-${String(i).padStart(3, "0")}.erofs`);
      await run("fsck.erofs", [image]);
      assert.ok(statSync(image).size < 32 * MiB, `layer ${i}: image of ${statSync(image).size} bytes`);
      if (!canMount) continue;
      await withMount(image, "erofs", async (mnt) => {
        for (const [name, f] of Object.entries(layer.files)) await checkMounted(mnt, name, f);
        await checkXattr(mnt, [layer]);
      });
    }
  });

  it("a file past ext4's 16 TiB: ext4 refuses it naming it, EROFS holds it", async (t) => {
    // Made on tmpfs (the disk's ext4 cannot hold such a file, even sparse).
    if (!existsSync("/dev/shm")) return t.skip("no tmpfs at /dev/shm");
    const shm = await mkdtemp("/dev/shm/kiln-sparse-");
    const f: SparseFile = { size: 20 * TiB, data: [[19 * TiB + 5, bytes(4 * KiB, 12)]] };
    try {
      const tar = await layerTar(shm, 0, { tar: ["--format=posix"], files: { beyond: f } });
      const image = await buildImage(join(work, "oci"), { tag: "beyond", layers: [{ tarFile: tar }] });
      const beyond = (await pushImage(image, reg, "sparse/beyond:1")).ref;
      await box.json(["pull", beyond]);
      const r = await box.kiln(["export", beyond, "--format", "ext4", "-o", join(work, "beyond.ext4")]);
      assert.match(assertFails(r, "TOO_LARGE"), /\/beyond is 21990232555520 bytes; ext4/);
      const out = join(work, "beyond.erofs");
      await box.json(["export", beyond, "--format", "erofs", "-o", out]);
      await run("fsck.erofs", [out]);
      if (canMount) await withMount(out, "erofs", (mnt) => checkMounted(mnt, "beyond", f));
    } finally {
      await removeDir(shm);
    }
  });

  it("cpio: a file over newc's 4 GiB is refused, naming it", async () => {
    const out = join(work, "all.cpio");
    const r = await box.kiln(["export", ref, "--format", "cpio", "-o", out]);
    assert.match(assertFails(r, "TOO_LARGE"), /\/gnu\/bomb is 1099511627776 bytes/);
  });

  it("cpio: a smaller sparse file comes out whole, its holes as zeros", async () => {
    const out = join(work, "multi.cpio");
    await box.json(["export", multiRef, "--format", "cpio", "-o", out]);
    const dir = join(work, "multi-out");
    await mkdir(dir);
    await run("sh", ["-c", `cd '${dir}' && cpio -idm --quiet < '${out}'`]);
    const f = ALL["multi/file"]!;
    await checkMounted(dir, "multi/file", f);
    assert.equal(await sha(join(dir, "multi/file")), await sha(join(work, "root-4", "multi/file")));
  });
});
