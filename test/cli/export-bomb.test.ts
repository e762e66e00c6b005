/**
 * A zstd bomb layer (512 MiB of zeros in a few KB: a valid tar, all padding after the end blocks,
 * read to the end for the diff-ID check) exported in every format: the peak RSS of `kiln export`
 * stays near that of the same image without it, instead of growing by the bomb's size.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { pathToFileURL } from "node:url";
import { makeTempDir, removeDir } from "../helpers/exec.js";
import { buildImage, editConfig, editManifest, type Layout, MEDIA, writeBlob } from "../helpers/images.js";
import { type Sandbox, sandbox } from "./kiln.js";

const BOMB = 512 << 20;
/**
 * What the bomb may add to the peak: a quarter of its size. Decoded chunks are garbage as soon as
 * they are hashed, but V8 collects them in its own time: tens of MiB, whatever the bomb's size.
 */
const SLACK = 128 << 20;

describe("kiln export of a zstd bomb layer", () => {
  let work: string;
  let box: Sandbox;
  let preload: string;

  /** Peak RSS in bytes of `kiln export REF --format FORMAT`, read by the process itself at exit. */
  async function exportPeak(ref: string, format: string): Promise<number> {
    const out = join(work, `${ref.replace(/\W/g, "_")}.${format}`);
    const report = `${out}.maxrss`;
    const r = await box.kiln(["export", ref, "--format", format, "-o", out], {
      env: { NODE_OPTIONS: `--import=${pathToFileURL(preload).href}`, KILN_TEST_MAXRSS: report },
    });
    assert.equal(r.code, 0, `export ${ref} --format ${format} failed: ${r.stderr}`);
    return Number(await readFile(report, "utf8")) * 1024;
  }

  before(async () => {
    work = await makeTempDir("export-bomb");
    box = await sandbox();
    preload = join(work, "maxrss.mjs");
    // resourceUsage().maxRSS is the peak of the whole process, in KiB.
    await writeFile(
      preload,
      `import { writeFileSync } from "node:fs";
process.on("exit", () => writeFileSync(process.env.KILN_TEST_MAXRSS, String(process.resourceUsage().maxRSS)));
`,
    );
    const base = [
      { path: "etc/", type: "dir" as const },
      { path: "etc/hostname", content: "bomb\n" },
    ];
    const control = await buildImage(join(work, "control"), { layers: [base] });
    const bomb: Layout = await buildImage(join(work, "bomb"), { layers: [base] });
    const blob = execFileSync("sh", ["-c", `head -c ${BOMB} /dev/zero | zstd -q -c -19`]);
    assert.ok(blob.length < 64 << 10, `bomb of ${blob.length} bytes`);
    const zeros = Buffer.alloc(1 << 20);
    const hash = createHash("sha256");
    for (let i = 0; i < BOMB / zeros.length; i++) hash.update(zeros);
    const diffId = `sha256:${hash.digest("hex")}`;
    const layer = await writeBlob(bomb.dir, MEDIA.OCI_LAYER_ZSTD, blob);
    await editConfig(bomb, (c) => {
      (c.rootfs as { diff_ids: string[] }).diff_ids.push(diffId);
    });
    await editManifest(bomb, (m) => {
      (m.layers as unknown[]).push(layer);
    });
    for (const [layout, tag] of [
      [control, "bomb/control:1"],
      [bomb, "bomb/zstd:1"],
    ] as const) {
      const r = await box.kiln(["import", layout.dir, "--tag", tag]);
      assert.equal(r.code, 0, r.stderr);
    }
  });
  after(async () => {
    await box?.cleanup();
    if (work) await removeDir(work);
  });

  for (const format of ["ext4", "erofs", "cpio"]) {
    it(`${format}: the bomb adds less than ${SLACK >> 20} MiB to the peak RSS`, async () => {
      const control = await exportPeak("bomb/control:1", format);
      const bomb = await exportPeak("bomb/zstd:1", format);
      assert.ok(
        bomb < control + SLACK,
        `peak RSS ${bomb >> 20} MiB with the bomb, ${control >> 20} MiB without`,
      );
    });
  }
});
