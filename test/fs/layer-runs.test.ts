import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { writeErofs } from "../../src/fs/erofs/writer.js";
import { writeExt4 } from "../../src/fs/ext4/writer.js";
import { layerRuns, writeRuns } from "../../src/fs/layer-runs.js";
import { type ContentSource, dataOrder, type Inode, newInode } from "../../src/fs/tree.js";
import { pseudoRandomBytes } from "../helpers/bytes.js";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";

/** A promise with its resolver, to hold a run at a point of the test's choosing. */
function gate(): { promise: Promise<void>; open: () => void } {
  let open!: () => void;
  const promise = new Promise<void>((resolve) => {
    open = resolve;
  });
  return { promise, open };
}

const fileIn = (layer: number, offset: number) =>
  newInode("file", { size: 1, data: { layer, offset, stored: 1 } });

describe("layerRuns", () => {
  it("cuts files in dataOrder where the layer changes", () => {
    const files = [fileIn(0, 0), fileIn(0, 512), fileIn(1, 0), fileIn(3, 0), fileIn(3, 1024)];
    assert.deepEqual(layerRuns(files), [files.slice(0, 2), files.slice(2, 3), files.slice(3)]);
    assert.deepEqual(layerRuns([]), []);
  });
});

describe("writeRuns", () => {
  it("runs `limit` at once, in order, and starts the next as one ends", async () => {
    const runs = [0, 1, 2, 3].map((l) => [fileIn(l, 0)]);
    const gates = runs.map(() => gate());
    const started: number[] = [];
    let active = 0;
    let most = 0;
    const done = writeRuns(
      runs,
      async (files) => {
        const layer = files[0]!.data!.layer;
        started.push(layer);
        most = Math.max(most, ++active);
        await gates[layer]!.promise;
        active--;
      },
      2,
    );
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(started, [0, 1]);
    gates[1]!.open();
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(started, [0, 1, 2]);
    for (const g of gates) g.open();
    await done;
    assert.deepEqual(started, [0, 1, 2, 3]);
    assert.equal(most, 2);
  });

  it("after a failure, stops the others, starts nothing new, and throws the lowest run's error", async () => {
    const runs = [0, 1, 2, 3, 4].map((l) => [fileIn(l, 0)]);
    const gates = runs.map(() => gate());
    const started: number[] = [];
    const sawStop: number[] = [];
    const done = writeRuns(
      runs,
      async (files, stopped) => {
        const layer = files[0]!.data!.layer;
        started.push(layer);
        await gates[layer]!.promise;
        if (layer === 1 || layer === 2) throw new Error(`layer ${layer} is corrupt`);
        if (stopped()) sawStop.push(layer);
      },
      3,
    );
    await new Promise((r) => setImmediate(r));
    gates[2]!.open(); // fails first
    await new Promise((r) => setImmediate(r));
    gates[1]!.open(); // fails later, but is lower
    gates[0]!.open();
    await assert.rejects(done, /layer 1 is corrupt/);
    assert.deepEqual(started, [0, 1, 2]);
    assert.deepEqual(sawStop, [0]);
  });
});

/** Pseudo-random bytes with an all-zero stretch in the middle (left a hole), the same on every run. */
function bytes(n: number, salt: number): Buffer {
  const out = pseudoRandomBytes(n, salt);
  if (n > 3 << 20) out.fill(0, 1 << 20, 3 << 20);
  return out;
}

/**
 * Files of three layers; the bottom layer's bytes come only once layer 1 has ended, so the runs end
 * out of order (writers run at least two at once).
 */
class OutOfOrderContent implements ContentSource {
  readonly bytes = new Map<Inode, Buffer>();
  readonly #layer1 = gate();
  readonly ended: number[] = [];

  async *contents(files: readonly Inode[]): AsyncIterable<{ inode: Inode; data: AsyncIterable<Buffer> }> {
    const layer = files[0]!.data!.layer;
    if (layer === 0) await this.#layer1.promise;
    for (const inode of files) {
      const b = this.bytes.get(inode)!;
      yield {
        inode,
        data: (async function* () {
          for (let i = 0; i < b.length; i += 100_000) yield b.subarray(i, i + 100_000);
        })(),
      };
    }
    this.ended.push(layer);
    if (layer === 1) this.#layer1.open();
  }
}

function threeLayers(): { root: Inode; content: OutOfOrderContent } {
  const content = new OutOfOrderContent();
  const root = newInode("directory", { mtime: 1_700_000_000 });
  const sizes = [0, 1, 4095, 4096, 4097, 300_000, 5 << 20];
  for (let layer = 0; layer < 3; layer++) {
    const dir = newInode("directory", { mtime: 1_700_000_000 });
    root.entries!.set(`l${layer}`, dir);
    let offset = 512;
    sizes.forEach((size, i) => {
      const f = newInode("file", {
        mtime: 1_700_000_000,
        size,
        data: size > 0 ? { layer, offset, stored: size } : undefined,
      });
      offset += 512 + Math.ceil(size / 512) * 512;
      dir.entries!.set(`f${i}`, f);
      content.bytes.set(f, bytes(size, layer * 100 + i));
    });
  }
  return { root, content };
}

// The timeout only turns a deadlock (runs written one at a time) into a failure.
describe("writers with layers written at once", { timeout: 300_000 }, () => {
  let dir: string;
  before(async () => {
    dir = await makeTempDir("kiln-layer-runs-");
  });
  after(async () => {
    await removeDir(dir);
  });

  it("ext4: every file's bytes where they belong, whichever layer ends first", async () => {
    const { root, content } = threeLayers();
    assert.equal(layerRuns(dataOrder(root)).length, 3);
    const image = join(dir, "three.ext4");
    await writeExt4(root, content, image, { uuid: Buffer.alloc(16, 1), hashSeed: Buffer.alloc(16, 2) });
    assert.ok(content.ended.indexOf(1) < content.ended.indexOf(0), `layers ended in order ${content.ended}`);
    await run("e2fsck", ["-fn", image]);
    for (let layer = 0; layer < 3; layer++) {
      for (const [name, inode] of root.entries!.get(`l${layer}`)!.entries!) {
        const out = join(dir, `x-${layer}-${name}`);
        await run("debugfs", ["-R", `dump /l${layer}/${name} ${out}`, image]);
        assert.ok((await readFile(out)).equals(content.bytes.get(inode)!), `/l${layer}/${name}`);
      }
    }
  });

  it("EROFS: every file's bytes where they belong, whichever layer ends first", async () => {
    const { root, content } = threeLayers();
    const image = join(dir, "three.erofs");
    await writeErofs(root, content, image, { uuid: Buffer.alloc(16, 3) });
    assert.ok(content.ended.indexOf(1) < content.ended.indexOf(0), `layers ended in order ${content.ended}`);
    const out = join(dir, "erofs-out");
    await run("fsck.erofs", [`--extract=${out}`, image]);
    for (let layer = 0; layer < 3; layer++) {
      for (const [name, inode] of root.entries!.get(`l${layer}`)!.entries!) {
        const got = await readFile(join(out, `l${layer}`, name));
        assert.ok(got.equals(content.bytes.get(inode)!), `/l${layer}/${name}`);
      }
    }
  });
});
