/**
 * `kiln pull --format`: the export's pass 1 (decompression, diff ID check, tar headers, spool) runs
 * on each layer while it downloads. The result must be byte-identical to `kiln export` of the same
 * image pulled beforehand (gzip, zstd and uncompressed layers; whiteouts; some layers already in the
 * store), and a layer that does not read (wrong diff ID, not a tar, cut-short gzip) fails the export
 * exactly as `kiln export` fails it, leaving no output, no temp file and a consistent store.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { readdir, rm } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { gzipSync } from "node:zlib";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { type FaultProxy, startFaultProxy } from "../helpers/faultproxy.js";
import { richImage, sampleImage } from "../helpers/fixtures.js";
import {
  buildImage,
  type EntrySpec,
  editConfig,
  editManifest,
  type Layout,
  MEDIA,
  pushImage,
  sha256,
  writeBlob,
} from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import { END, entry } from "../tar/fixtures.js";
import {
  assertBlobsVerify,
  assertFails,
  assertTmpEmpty,
  escapeRegExp,
  type ImageRow,
  type PullJson,
  type Sandbox,
  sandbox,
  snapshot,
} from "./kiln.js";

interface ExportJson {
  format: string;
  output: string;
  bytes: number;
  cached: boolean;
}
type PullExportJson = PullJson & { export: ExportJson };

const FORMATS = ["ext4", "erofs", "cpio"] as const;

/** The format's own checker on an exported file. */
async function check(format: string, file: string): Promise<void> {
  if (format === "ext4") await run("e2fsck", ["-fn", file]);
  else if (format === "erofs") await run("fsck.erofs", [file]);
  else await run("sh", ["-c", `cpio -it --quiet < '${file}' > /dev/null`]);
}

/** Adds a gzip layer of exactly `tar` (any bytes) on top of the layout's image, with its diff ID. */
async function addRawLayer(layout: Layout, tar: Buffer, gz: Buffer = gzipSync(tar)): Promise<void> {
  const desc = await writeBlob(layout.dir, MEDIA.OCI_LAYER_GZIP, gz);
  await editConfig(layout, (c) => {
    (c.rootfs as { diff_ids: string[] }).diff_ids.push(sha256(tar));
  });
  await editManifest(layout, (m) => {
    (m.layers as unknown[]).push(desc);
  });
}

const BASE: EntrySpec[] = [
  { path: "base/", type: "dir" },
  { path: "base/lib.bin", size: 300_000 },
  { path: "etc/", type: "dir" },
  { path: "etc/gone", content: "whited out above\n" },
];
const TOP: EntrySpec[] = [
  { path: "etc/", type: "dir" },
  { path: "etc/.wh.gone", content: "" },
  { path: "app/", type: "dir" },
  { path: "app/data.bin", size: 200_000 },
];

describe("kiln pull --format", () => {
  let reg: Registry;
  let work: string;
  const boxes: Sandbox[] = [];
  const newBox = async () => {
    const b = await sandbox();
    boxes.push(b);
    return b;
  };

  before(async () => {
    reg = await startRegistry();
    work = await makeTempDir("pull-export");
  });
  after(async () => {
    await reg?.stop();
    for (const b of boxes) await b.cleanup();
    if (work) await removeDir(work);
  });

  /** No temp file (`.…kiln-tmp`) was left in `dir`. */
  const assertNoTempBeside = async (dir: string) =>
    assert.deepEqual(
      (await readdir(dir)).filter((n) => n.startsWith(".")),
      [],
      `temp files left in ${dir}`,
    );

  const cases = [
    { name: "sample, gzip", image: sampleImage, compression: "gzip" as const },
    { name: "sample, uncompressed", image: sampleImage, compression: "none" as const },
    { name: "rich, zstd", image: richImage, compression: "zstd" as const },
  ];
  for (const c of cases) {
    it(`${c.name}: -o gives the bytes of export -o from a store that pulled first (${FORMATS.join(", ")})`, async () => {
      const ref = (
        await pushImage(await c.image(), reg, `${c.name.replace(/\W+/g, "-")}:1`, {
          compression: c.compression,
        })
      ).ref;
      const pulledFirst = await newBox();
      await pulledFirst.json(["pull", ref]);
      const dir = await makeTempDir("pull-export-out");
      try {
        for (const format of FORMATS) {
          const fresh = await newBox();
          const a = join(dir, `pulled.${format}`);
          const r = await fresh.json<PullExportJson>(["pull", ref, "--format", format, "-o", a]);
          assert.equal(r.present, 0);
          assert.equal(r.downloaded, r.layers.length);
          assert.deepEqual(
            { cached: r.export.cached, output: r.export.output, format: r.export.format },
            { cached: false, output: a, format },
          );
          const b = join(dir, `exported.${format}`);
          await pulledFirst.json(["export", ref, "--format", format, "-o", b]);
          await run("cmp", [a, b]);
          await check(format, a);
          await assertTmpEmpty(fresh.root);
          await fresh.cleanup();
        }
        await assertNoTempBeside(dir);
      } finally {
        await removeDir(dir);
      }
    });
  }

  it("erofs-layers (no pass 1 ahead): the same files as export", async () => {
    const ref = (await pushImage(await sampleImage(), reg, "layers:1")).ref;
    const a = join(work, "pulled-layers");
    const b = join(work, "exported-layers");
    await (await newBox()).json(["pull", ref, "--format", "erofs-layers", "-o", a]);
    const other = await newBox();
    await other.json(["pull", ref]);
    await other.json(["export", ref, "--format", "erofs-layers", "-o", b]);
    await run("diff", ["-r", a, b]);
  });

  it("with some layers already in the store: the tapped and the stored layers make the same bytes", async () => {
    const layout = join(work, "shared-layout");
    const base = await buildImage(layout, { tag: "base", layers: [BASE] });
    const app = await buildImage(layout, { tag: "app", layers: [BASE, TOP] });
    const baseRef = (await pushImage(base, reg, "shared-base:1")).ref;
    const appRef = (await pushImage(app, reg, "shared-app:1")).ref;
    const reference = await newBox();
    await reference.json(["pull", appRef]);
    for (const format of FORMATS) {
      const box = await newBox();
      await box.json(["pull", baseRef]);
      const a = join(work, `shared-pulled.${format}`);
      const r = await box.json<PullExportJson>(["pull", appRef, "--format", format, "-o", a]);
      assert.deepEqual({ present: r.present, downloaded: r.downloaded }, { present: 1, downloaded: 1 });
      const b = join(work, `shared-exported.${format}`);
      await reference.json(["export", appRef, "--format", format, "-o", b]);
      await run("cmp", [a, b]);
      await check(format, a);
      await assertTmpEmpty(box.root);
    }
    // The whiteout in the second layer applied to the first.
    assert.equal(
      await run("debugfs", ["-R", "ls -p /etc", join(work, "shared-pulled.ext4")]).then((t) =>
        t.includes("gone"),
      ),
      false,
    );
  });

  describe("a layer that does not read", () => {
    /** A one-layer image from `layers`, then `edit`, pushed as `repo:1`. */
    const broken = async (repo: string, edit: (layout: Layout) => Promise<void>): Promise<string> => {
      const layout = await buildImage(join(work, `${repo}-layout`), {
        tag: repo,
        layers: [BASE, TOP],
        config: { cmd: ["/bin/sh"] },
      });
      await edit(layout);
      return (await pushImage(layout, reg, `${repo}:1`)).ref;
    };

    const failures = [
      {
        name: "a wrong diff ID",
        repo: "bad-diffid",
        code: "DIGEST_MISMATCH",
        edit: (layout: Layout) =>
          editConfig(layout, (c) => {
            (c.rootfs as { diff_ids: string[] }).diff_ids[1] = sha256(Buffer.from("not this layer"));
          }),
      },
      {
        name: "valid gzip but not a tar (a header with a bad checksum)",
        repo: "not-a-tar",
        code: "INVALID_ARCHIVE",
        edit: (layout: Layout) =>
          addRawLayer(
            layout,
            Buffer.concat([entry({ name: "bad", checksum: "0000000\0" }, Buffer.from("z")), END]),
          ),
      },
      {
        name: "a gzip stream cut short",
        repo: "short-gzip",
        code: "INVALID_ARCHIVE",
        edit: (layout: Layout) => {
          const tar = Buffer.concat([entry({ name: "file" }, randomBytes(64 * 1024)), END]);
          const gz = gzipSync(tar);
          return addRawLayer(layout, tar, gz.subarray(0, gz.length - 1000));
        },
      },
    ];

    for (const f of failures) {
      it(`${f.name}: ${f.code}, as export fails; no output, no temp file, the store consistent`, async () => {
        const ref = await broken(f.repo, f.edit);
        const dir = await makeTempDir("pull-export-fail");
        try {
          const box = await newBox();
          const out = join(dir, "out.ext4");
          const pulled = await box.kiln(["pull", ref, "--format", "ext4", "-o", out]);
          const line = assertFails(pulled, f.code);
          assert.ok(!existsSync(out), "no output");
          await assertNoTempBeside(dir);
          await assertTmpEmpty(box.root); // no prefetch-* or export spool left
          // The pull itself succeeded: the image is recorded and every blob is whole.
          const images = await box.json<ImageRow[]>(["images"]);
          assert.deepEqual(
            images.map((i) => i.ref),
            [ref],
          );
          const blobs = await assertBlobsVerify(box.root);
          assert.equal(blobs.length, images[0]!.layers + 2, "manifest, config and every layer");
          assert.deepEqual(await readdir(join(box.root, "artifacts")).catch(() => []), []);

          // `kiln export` of the image afterwards (its own pass 1) fails the same way.
          assert.equal(
            assertFails(await box.kiln(["export", ref, "--format", "ext4", "-o", out]), f.code),
            line,
          );
          assert.ok(!existsSync(out));
          await assertNoTempBeside(dir);
          await assertTmpEmpty(box.root);

          // Without -o, into the store: the same failure, and nothing published.
          const fresh = await newBox();
          assert.equal(assertFails(await fresh.kiln(["pull", ref, "--format", "erofs"]), f.code), line);
          await assertTmpEmpty(fresh.root);
          assert.deepEqual(await readdir(join(fresh.root, "artifacts")).catch(() => []), []);
          assert.equal((await fresh.json<{ bytes: number }>(["gc", "--grace", "0"])).bytes, 0);
        } finally {
          await rm(dir, { recursive: true, force: true });
        }
      });
    }
  });

  it("without -o: the image goes into the store's cache, and its path is printed", async () => {
    const ref = (await pushImage(await sampleImage(), reg, "cache:1")).ref;
    const box = await newBox();
    const r = await box.kiln(["-q", "pull", ref, "--format", "erofs"]);
    assert.equal(r.code, 0, r.stderr);
    const path = r.stdout.trim();
    assert.match(path.slice(box.root.length), /^\/artifacts\/[0-9a-f]{64}\.erofs$/);
    assert.ok(path.startsWith(box.root));
    await run("fsck.erofs", [path]);
    await assertTmpEmpty(box.root);
    const again = await box.json<ExportJson>(["export", ref, "--format", "erofs"]);
    assert.deepEqual({ cached: again.cached, output: again.output }, { cached: true, output: path });
  });

  describe("through a faulty connection", () => {
    let proxy: FaultProxy;
    /** The sample's third layer: 1 MiB of incompressible data. */
    let big: string;
    let reference: string;
    before(async () => {
      await pushImage(await sampleImage(), reg, "faulty:1");
      proxy = await startFaultProxy(reg.url);
      const box = await newBox();
      const pulled = await box.json<PullJson>(["pull", `${reg.host}/faulty:1`]);
      big = pulled.layers[2]!.digest;
      reference = join(work, "faulty-reference.ext4");
      await box.json(["export", `${reg.host}/faulty:1`, "--format", "ext4", "-o", reference]);
    });
    after(async () => {
      await proxy?.close();
    });
    const bigPath = () => new RegExp(`^/v2/faulty/blobs/${escapeRegExp(big)}$`);

    it("a layer download cut mid-blob resumes, and pass 1 sees each byte once", async () => {
      proxy.reset();
      proxy.addRule({ method: "GET", path: bigPath(), action: { cutAfter: 300_000 } });
      const box = await newBox();
      const out = join(work, "faulty-resumed.ext4");
      await box.json(["pull", `${proxy.host}/faulty:1`, "--format", "ext4", "-o", out]);
      assert.equal(proxy.matching("GET", bigPath()).length, 2, "cut once, then resumed");
      await run("cmp", [reference, out]);
      await assertTmpEmpty(box.root);
    });

    it("wrong layer bytes fail the pull (DIGEST_MISMATCH): no image, no output, no temp file", async () => {
      proxy.reset();
      proxy.addRule({
        method: "GET",
        path: bigPath(),
        times: Number.POSITIVE_INFINITY,
        action: { corruptAt: 500_000 },
      });
      const box = await newBox();
      const dir = await makeTempDir("pull-export-corrupt");
      try {
        const out = join(dir, "out.ext4");
        const line = assertFails(
          await box.kiln(["pull", `${proxy.host}/faulty:1`, "--format", "ext4", "-o", out]),
          "DIGEST_MISMATCH",
        );
        assert.match(line, new RegExp(escapeRegExp(big)));
        assert.deepEqual(await readdir(dir), []);
        assert.deepEqual(await snapshot(box), { blobs: [], tmp: [], images: [] });
      } finally {
        await removeDir(dir);
      }
    });
  });

  it("-o without --format is refused", async () => {
    const box = await newBox();
    const line = assertFails(
      await box.kiln(["pull", `${reg.host}/cache:1`, "-o", join(work, "x.ext4")]),
      "INVALID_ARGUMENT",
    );
    assert.match(line, /--format/);
    assert.ok(!existsSync(join(work, "x.ext4")));
  });
});
