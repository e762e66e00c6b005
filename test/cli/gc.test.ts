/**
 * kiln gc end to end, on images pulled from a real registry: it frees exactly what no image needs,
 * and a `kiln pull` running at the same time (held mid-download by the fault proxy) survives both
 * `kiln rm` of the image it shares a layer with and `kiln gc --grace 0`.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { formatBytes } from "../../src/cli/format.js";
import { makeTempDir, removeDir } from "../helpers/exec.js";
import { type FaultProxy, startFaultProxy } from "../helpers/faultproxy.js";
import { buildImage, type EntrySpec, type Layout, pushImage } from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import { assertBlobsVerify, assertTmpEmpty, blobNames, type PullJson, sandbox } from "./kiln.js";

interface GcJson {
  blobs: { digest: string; size: number }[];
  artifacts: { path: string; size: number }[];
  temp: { path: string; size: number }[];
  bytes: number;
  dryRun: boolean;
}

/** Every blob of a pulled image: manifest, config, layers (no index here). */
const blobsOf = (p: PullJson) => [p.digest, p.configDigest, ...p.layers.map((l) => l.digest)];
const sorted = (a: readonly string[]) => [...a].sort();

const SHARED: EntrySpec[] = [
  { path: "base/", type: "dir" },
  { path: "base/lib.bin", size: 300_000 },
];
const own = (name: string): EntrySpec[] => [
  { path: `${name}/`, type: "dir" },
  { path: `${name}/data.bin`, size: 100_000 },
  { path: `${name}/name.txt`, content: `${name}\n` },
];

describe("kiln gc", () => {
  let reg: Registry;
  let work: string;
  let images: Record<"keep" | "app1" | "app2" | "other", Layout>;

  before(async () => {
    work = await makeTempDir("gc");
    const layout = join(work, "layout");
    // Built one after another into one layout: the shared layer is the same blob in all of them.
    images = {
      keep: await buildImage(layout, { tag: "keep", layers: [SHARED, own("keep")] }),
      app1: await buildImage(layout, { tag: "app1", layers: [SHARED, own("app1")] }),
      app2: await buildImage(layout, { tag: "app2", layers: [SHARED, own("app2")] }),
      other: await buildImage(layout, { tag: "other", layers: [SHARED, own("other")] }),
    };
    reg = await startRegistry();
    await pushImage(images.keep, reg, "keep:1");
    await pushImage(images.app1, reg, "app:1");
    await pushImage(images.other, reg, "other:1");
  });
  after(async () => {
    await reg?.stop();
    if (work) await removeDir(work);
  });

  it("frees exactly the blobs and export no image needs; the remaining image still exports, identically", async () => {
    const box = await sandbox();
    const fresh = await sandbox();
    try {
      const keep = await box.json<PullJson>(["pull", `${reg.host}/keep:1`]);
      const app1 = await box.json<PullJson>(["pull", `${reg.host}/app:1`]);
      const shared = keep.layers[0]!.digest;
      assert.equal(app1.layers[0]!.digest, shared, "the images share their first layer");
      // Both exported into the store's cache (no -o), then copied out of it.
      const keepExt4 = join(work, "keep-before.ext4");
      const app1Out = join(work, "app1.ext4");
      for (const [ref, out] of [
        [`${reg.host}/keep:1`, keepExt4],
        [`${reg.host}/app:1`, app1Out],
      ] as const) {
        assert.equal(
          (await box.json<{ cached: boolean }>(["export", ref, "--format", "ext4"])).cached,
          false,
        );
        assert.equal(
          (await box.json<{ cached: boolean }>(["export", ref, "--format", "ext4", "-o", out])).cached,
          true,
        );
      }

      // The tag moves: app:1's first image is now in no image of the store, nor is its export.
      await pushImage(images.app2, reg, "app:1");
      const app2 = await box.json<PullJson>(["pull", `${reg.host}/app:1`]);
      assert.notEqual(app2.digest, app1.digest);
      // And app:1 is removed: its own blobs go at once, the shared layer stays for keep:1.
      const rm = await box.kiln(["rm", `${reg.host}/app:1`]);
      assert.equal(rm.code, 0, rm.stderr);

      const orphans = blobsOf(app1).filter((d) => d !== shared);
      assert.deepEqual(sorted(await assertBlobsVerify(box.root)), sorted([...blobsOf(keep), ...orphans]));
      const artifactsBefore = sorted(await readdir(join(box.root, "artifacts")));
      assert.equal(artifactsBefore.length, 2);

      // A dry run says what goes and removes nothing.
      const dry = await box.kiln(["gc", "--grace", "0", "--dry-run"]);
      assert.equal(dry.code, 0, dry.stderr);
      const lines = dry.stdout.trimEnd().split("\n");
      assert.equal(lines.length, 5, dry.stdout);
      for (const d of orphans)
        assert.ok(
          lines.some((l) => /^blob\s/.test(l) && l.includes(d)),
          d,
        );
      assert.ok(
        lines.some((l) => /^artifact\s+artifacts\/[0-9a-f]{64}\.ext4\s+\d/.test(l)),
        dry.stdout,
      );
      assert.deepEqual(sorted(await blobNames(box.root)).length, blobsOf(keep).length + orphans.length);
      assert.deepEqual(sorted(await readdir(join(box.root, "artifacts"))), artifactsBefore);

      const report = await box.json<GcJson>(["gc", "--grace", "0"]);
      assert.equal(report.dryRun, false);
      assert.deepEqual(sorted(report.blobs.map((b) => b.digest)), sorted(orphans));
      assert.equal(report.artifacts.length, 1);
      assert.deepEqual(report.temp, []);
      const app1Artifact = report.artifacts[0]!;
      assert.ok(artifactsBefore.includes(app1Artifact.path.replace(/^artifacts\//, "")));
      assert.equal(app1Artifact.size, (await readFile(app1Out)).length);
      const blobBytes = report.blobs.reduce((s, b) => s + b.size, 0);
      assert.equal(report.bytes, blobBytes + app1Artifact.size);
      // app:1's first manifest + config + its own layer: the sizes the registry gave.
      assert.equal(blobBytes, app1.size - app1.layers[0]!.size);

      assert.equal(lines.at(-1), `Would free ${formatBytes(report.bytes)} (3 blobs, 1 artifact, 0 temp)`);

      // What remains is exactly keep:1, intact, and its cached export.
      assert.deepEqual(sorted(await assertBlobsVerify(box.root)), sorted(blobsOf(keep)));
      assert.deepEqual(
        await readdir(join(box.root, "artifacts")),
        artifactsBefore.filter((a) => `artifacts/${a}` !== app1Artifact.path),
      );
      await assertTmpEmpty(box.root);
      assert.deepEqual((await box.json<GcJson>(["gc", "--grace", "0"])).bytes, 0);
      const quiet = await box.kiln(["-q", "gc", "--grace", "0"]);
      assert.equal(quiet.stdout, "0\n");

      // keep:1 exports from the cache, byte-identical, and from its blobs again (a format not
      // cached) byte-identical to a store that never saw GC.
      const keepAgain = join(work, "keep-after.ext4");
      const again = await box.json<{ cached: boolean }>([
        "export",
        `${reg.host}/keep:1`,
        "--format",
        "ext4",
        "-o",
        keepAgain,
      ]);
      assert.equal(again.cached, true);
      assert.ok((await readFile(keepAgain)).equals(await readFile(keepExt4)));
      const erofs = join(work, "keep-after.erofs");
      const erofsFresh = join(work, "keep-fresh.erofs");
      const a = await box.json<{ cached: boolean }>([
        "export",
        `${reg.host}/keep:1`,
        "--format",
        "erofs",
        "-o",
        erofs,
      ]);
      assert.equal(a.cached, false);
      await fresh.json(["pull", `${reg.host}/keep:1`, "--format", "erofs", "-o", erofsFresh]);
      assert.ok((await readFile(erofs)).equals(await readFile(erofsFresh)));
    } finally {
      await box.cleanup();
      await fresh.cleanup();
    }
  });

  describe("while a kiln pull runs", () => {
    let proxy: FaultProxy;
    before(async () => {
      proxy = await startFaultProxy(reg.url, { barrierTimeoutMs: 120_000 });
    });
    after(async () => {
      await proxy?.close();
    });

    it("kiln rm and kiln gc --grace 0 leave the pull's pinned layer and staging dir alone", async () => {
      const box = await sandbox();
      try {
        const keep = await box.json<PullJson>(["pull", `${proxy.host}/keep:1`]);
        const shared = keep.layers[0]!.digest;
        const otherOwn = await ownLayerDigest(proxy, "other");
        // Hold other:1's own layer until released: the pull has checked that the shared layer is
        // present (and pinned it), staged its manifest and config, and waits on the download.
        const hold = proxy.addRule({
          method: "GET",
          path: new RegExp(`^/v2/other/blobs/${otherOwn}$`),
          times: 1,
          action: { barrier: 2 },
        });
        const pulling = box.kiln(["--json", "pull", `${proxy.host}/other:1`]);
        for (let i = 0; hold.hits < 1; i++) {
          assert.ok(i < 3000, "the pull never asked for its layer");
          await sleep(10);
        }
        const staging = (await readdir(join(box.root, "tmp"))).filter((n) => n.startsWith("stage-"));
        assert.equal(staging.length, 1);

        // keep:1 goes; the layer it shares with the pull in flight stays.
        const rm = await box.kiln(["rm", `${proxy.host}/keep:1`]);
        assert.equal(rm.code, 0, rm.stderr);
        assert.deepEqual(await blobNames(box.root), [shared.slice("sha256:".length)]);
        const report = await box.json<GcJson>(["gc", "--grace", "0"]);
        assert.deepEqual(report, { blobs: [], artifacts: [], temp: [], bytes: 0, dryRun: false });
        assert.ok(existsSync(join(box.root, "tmp", staging[0]!)));

        hold.remove();
        const r = await pulling;
        assert.equal(r.code, 0, r.stderr);
        const other = JSON.parse(r.stdout) as PullJson;
        assert.equal(other.layers[0]!.digest, shared);
        assert.equal(other.present, 1);
        assert.equal(other.downloaded, 1);

        // The image is whole: every blob there and verified, and it exports.
        assert.deepEqual(sorted(await assertBlobsVerify(box.root)), sorted(blobsOf(other)));
        await assertTmpEmpty(box.root);
        const out = join(work, "other.ext4");
        const exp = await box.kiln(["export", `${proxy.host}/other:1`, "--format", "ext4", "-o", out]);
        assert.equal(exp.code, 0, exp.stderr);
        // With the pull done and its lease released, nothing is garbage.
        assert.equal((await box.json<GcJson>(["gc", "--grace", "0"])).bytes, 0);
      } finally {
        await box.cleanup();
      }
    });
  });
});

/** The digest of an image's second (own) layer, read from the registry through the proxy. */
async function ownLayerDigest(proxy: FaultProxy, repo: string): Promise<string> {
  const res = await fetch(`${proxy.url}/v2/${repo}/manifests/1`, {
    headers: { accept: "application/vnd.oci.image.manifest.v1+json" },
  });
  assert.equal(res.status, 200);
  const manifest = (await res.json()) as { layers: { digest: string }[] };
  return manifest.layers[1]!.digest;
}
