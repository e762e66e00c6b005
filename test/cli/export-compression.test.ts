/**
 * The same image with gzip, zstd and uncompressed layers goes through three different read paths
 * (decompressed and spooled; read by position): every export must come out the same. cpio carries
 * no UUID, so the three archives must be byte-identical; the ext4 disks must pass e2fsck.
 */
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { sampleImage } from "../helpers/fixtures.js";
import { pushImage } from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import { type InspectJson, type Sandbox, sandbox } from "./kiln.js";

const COMPRESSIONS = ["gzip", "zstd", "none"] as const;

describe("kiln export of gzip, zstd and uncompressed layers", () => {
  let reg: Registry;
  let box: Sandbox;
  let work: string;
  const refs = new Map<string, string>();

  before(async () => {
    const image = await sampleImage();
    reg = await startRegistry();
    box = await sandbox();
    work = await makeTempDir("export-compression");
    for (const compression of COMPRESSIONS) {
      const { ref } = await pushImage(image, reg, `sample:${compression}`, { compression });
      await box.json(["pull", ref]);
      refs.set(compression, ref);
    }
  });
  after(async () => {
    await reg?.stop();
    await box?.cleanup();
    if (work) await removeDir(work);
  });

  it("the layers really are gzip, zstd and plain tar", async () => {
    for (const compression of COMPRESSIONS) {
      const info = await box.json<InspectJson>(["inspect", refs.get(compression)!]);
      const plain = info.layers.every((l) => l.digest === l.diffId);
      assert.equal(plain, compression === "none", compression);
    }
  });

  it("cpio: byte-identical whatever the compression", async () => {
    const outs: Buffer[] = [];
    for (const compression of COMPRESSIONS) {
      const out = join(work, `${compression}.cpio`);
      await box.json(["export", refs.get(compression)!, "--format", "cpio", "-o", out]);
      outs.push(await readFile(out));
    }
    assert.ok(outs[0]!.length > 0);
    assert.ok(outs[1]!.equals(outs[0]!), "zstd = gzip");
    assert.ok(outs[2]!.equals(outs[0]!), "uncompressed = gzip");
  });

  it("ext4 and erofs of uncompressed layers pass e2fsck and fsck.erofs", async () => {
    const ext4 = join(work, "none.ext4");
    await box.json(["export", refs.get("none")!, "--format", "ext4", "-o", ext4]);
    await run("e2fsck", ["-fn", ext4]);
    const erofs = join(work, "none.erofs");
    await box.json(["export", refs.get("none")!, "--format", "erofs", "-o", erofs]);
    await run("fsck.erofs", [erofs]);
  });
});
