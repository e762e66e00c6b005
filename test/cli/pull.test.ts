/**
 * `kiln pull` end to end: the real CLI (dist/) against Docker's registry with images pushed by
 * skopeo, in gzip, zstd, uncompressed and Docker schema 2 form, a layer without tar end blocks,
 * a multi-arch index, shared base layers, warm pulls, and progress bars on a terminal.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { makeTempDir, removeDir } from "../helpers/exec.js";
import { type FaultProxy, startFaultProxy } from "../helpers/faultproxy.js";
import { multiArchImage, NO_EOF_SPEC, noEofImage, SAMPLE_SPEC, sampleImage } from "../helpers/fixtures.js";
import {
  buildImage,
  type ConfigSpec,
  inspectRaw,
  type LayerSpec,
  MEDIA,
  type Pushed,
  pushImage,
  type RawImage,
} from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import {
  assertBlobsVerify,
  assertConfig,
  assertFails,
  assertMatchesRaw,
  assertTmpEmpty,
  BLOB_PATH,
  blobDigestOf,
  childEnv,
  escapeRegExp,
  type ImageRow,
  type InspectJson,
  type PullJson,
  runInPty,
  type Sandbox,
  sandbox,
  scriptMissing,
} from "./kiln.js";

interface Case {
  tag: string;
  /** What every layer's media type must be. */
  layerType: string;
  manifestType: string;
  config: ConfigSpec;
}

const CASES: Case[] = [
  {
    tag: "gzip",
    layerType: MEDIA.OCI_LAYER_GZIP,
    manifestType: MEDIA.OCI_MANIFEST,
    config: SAMPLE_SPEC.config!,
  },
  {
    tag: "zstd",
    layerType: MEDIA.OCI_LAYER_ZSTD,
    manifestType: MEDIA.OCI_MANIFEST,
    config: SAMPLE_SPEC.config!,
  },
  { tag: "none", layerType: MEDIA.OCI_LAYER, manifestType: MEDIA.OCI_MANIFEST, config: SAMPLE_SPEC.config! },
  {
    tag: "v2s2",
    layerType: MEDIA.DOCKER_LAYER_GZIP,
    manifestType: MEDIA.DOCKER_MANIFEST,
    config: SAMPLE_SPEC.config!,
  },
  {
    tag: "no-eof",
    layerType: MEDIA.OCI_LAYER_GZIP,
    manifestType: MEDIA.OCI_MANIFEST,
    config: NO_EOF_SPEC.config!,
  },
];

/** Shares the sample's first two layers (same tars, so the same gzip blobs) and adds its own. */
const DERIVED_LAYERS: LayerSpec[] = [
  SAMPLE_SPEC.layers[0]!,
  SAMPLE_SPEC.layers[1]!,
  [
    { path: "srv/", type: "dir" },
    { path: "srv/derived.txt", content: "only in the derived image\n" },
  ],
];

describe("kiln pull from docker-registry", () => {
  let reg: Registry;
  let proxy: FaultProxy;
  let work: string;
  const raw = new Map<string, RawImage>();
  let multiRaw: RawImage;
  let derivedRaw: RawImage;
  let pushedMulti: Pushed;

  before(async () => {
    work = await makeTempDir("cli-pull");
    const [sample, noEof, multi, derived] = await Promise.all([
      sampleImage(),
      noEofImage(),
      multiArchImage(),
      buildImage(`${work}/derived`, { tag: "derived", layers: DERIVED_LAYERS, config: { cmd: ["/bin/sh"] } }),
    ]);
    reg = await startRegistry();
    proxy = await startFaultProxy(reg.url);
    // One push at a time: parallel pushes of the same blobs to one registry race each other.
    await pushImage(sample, reg, "sample:gzip");
    await pushImage(sample, reg, "sample:zstd", { compression: "zstd" });
    await pushImage(sample, reg, "sample:none", { compression: "none" });
    await pushImage(sample, reg, "sample:v2s2", { format: "v2s2" });
    await pushImage(noEof, reg, "sample:no-eof");
    await pushImage(derived, reg, "derived:1");
    pushedMulti = await pushImage(multi, reg, "multi:1");
    for (const c of CASES) raw.set(c.tag, await inspectRaw(reg, `sample:${c.tag}`));
    multiRaw = await inspectRaw(reg, "multi:1");
    derivedRaw = await inspectRaw(reg, "derived:1");
  });
  after(async () => {
    await proxy?.close();
    await reg?.stop();
    if (work) await removeDir(work);
  });

  for (const c of CASES) {
    it(`pulls the ${c.tag} image: digests, media types, diff IDs and config as pushed; every blob verifies`, async () => {
      const box = await sandbox();
      try {
        const r = raw.get(c.tag)!;
        const ref = `${reg.host}/sample:${c.tag}`;
        const pulled = await box.json<PullJson>(["pull", ref]);
        const layerCount = (r.json.layers as unknown[]).length;
        assert.equal(pulled.digest, r.manifestDigest);
        assert.equal(
          pulled.downloaded,
          new Set((r.json.layers as { digest: string }[]).map((l) => l.digest)).size,
        );
        assert.equal(pulled.present, 0);

        const info = await box.json<InspectJson>(["inspect", ref]);
        assert.equal(info.ref, ref);
        assert.equal(info.platform, "linux/amd64");
        assert.equal(info.indexDigest, null);
        assert.equal(info.mediaType, c.manifestType);
        assertMatchesRaw(info, r);
        assert.equal(info.layers.length, layerCount);
        for (const l of info.layers) assert.equal(l.mediaType, c.layerType);
        if (c.tag === "none") for (const l of info.layers) assert.equal(l.diffId, l.digest);
        assertConfig(info, c.config);

        const blobs = await assertBlobsVerify(box.root);
        assert.deepEqual(
          blobs,
          [r.manifestDigest, r.configDigest!, ...info.layers.map((l) => l.digest)].sort(),
          "the store holds exactly the manifest, config and layers",
        );
        await assertTmpEmpty(box.root);
      } finally {
        await box.cleanup();
      }
    });
  }

  describe("through a counting proxy", () => {
    let box: Sandbox;
    before(async () => {
      box = await sandbox();
    });
    after(async () => {
      await box?.cleanup();
    });

    const layerGets = () =>
      proxy
        .matching("GET", BLOB_PATH)
        .map((r) => blobDigestOf(r.path))
        .filter((d) => d !== raw.get("gzip")!.configDigest && d !== derivedRaw.configDigest);

    it("fetches every layer once on a cold pull", async () => {
      proxy.reset();
      const pulled = await box.json<PullJson>(["pull", `${proxy.host}/sample:gzip`]);
      assert.equal(pulled.digest, raw.get("gzip")!.manifestDigest);
      assert.equal(pulled.downloaded, 3);
      assert.deepEqual(layerGets().sort(), pulled.layers.map((l) => l.digest).sort());
    });

    it("fetches only the layers it lacks when a second image shares base layers", async () => {
      proxy.reset();
      const sampleLayers = (raw.get("gzip")!.json.layers as { digest: string }[]).map((l) => l.digest);
      const derivedLayers = (derivedRaw.json.layers as { digest: string }[]).map((l) => l.digest);
      assert.deepEqual(
        derivedLayers.slice(0, 2),
        sampleLayers.slice(0, 2),
        "fixture: two shared base layers",
      );

      const pulled = await box.json<PullJson>(["pull", `${proxy.host}/derived:1`]);
      assert.equal(pulled.digest, derivedRaw.manifestDigest);
      assert.equal(pulled.present, 2);
      assert.equal(pulled.downloaded, 1);
      assert.deepEqual(layerGets(), [derivedLayers[2]]);
      await assertBlobsVerify(box.root);
      await assertTmpEmpty(box.root);
    });

    it("fetches no blob on a warm pull", async () => {
      proxy.reset();
      const pulled = await box.json<PullJson>(["pull", `${proxy.host}/sample:gzip`]);
      assert.equal(pulled.digest, raw.get("gzip")!.manifestDigest);
      assert.equal(pulled.downloaded, 0);
      assert.equal(pulled.present, 3);
      assert.deepEqual(layerGets(), []);
      // The config is read back from the store, not fetched again.
      assert.deepEqual(
        proxy.matching("GET", BLOB_PATH).map((r) => blobDigestOf(r.path)),
        [],
      );
      const images = await box.json<ImageRow[]>(["images"]);
      assert.equal(images.filter((i) => i.digest === raw.get("gzip")!.manifestDigest).length, 1);
      await assertTmpEmpty(box.root);
    });
  });

  describe("a multi-arch index", () => {
    let box: Sandbox;
    const ref = () => `${reg.host}/multi:1`;
    const entry = (arch: string) =>
      (multiRaw.json.manifests as { digest: string; platform: { architecture: string } }[]).find(
        (m) => m.platform.architecture === arch,
      )!;

    before(async () => {
      box = await sandbox();
    });
    after(async () => {
      await box?.cleanup();
    });

    it("pulls linux/amd64 and linux/arm64 into one store as two images of one index", async () => {
      assert.equal(multiRaw.manifestDigest, pushedMulti.digest);
      const amd = await box.json<PullJson>(["pull", "--platform", "linux/amd64", ref()]);
      const arm = await box.json<PullJson>(["pull", "--platform", "linux/arm64", ref()]);
      assert.equal(amd.digest, entry("amd64").digest);
      assert.equal(arm.digest, entry("arm64").digest);
      const images = await box.json<ImageRow[]>(["images"]);
      assert.deepEqual(images.map((i) => i.platform).sort(), ["linux/amd64", "linux/arm64/v8"]);
      for (const i of images) {
        assert.equal(i.indexDigest, multiRaw.manifestDigest);
        assert.equal(i.ref, ref());
      }
      await assertBlobsVerify(box.root);
      await assertTmpEmpty(box.root);
    });

    it("inspect --platform picks each image", async () => {
      for (const [platform, arch] of [
        ["linux/amd64", "amd64"],
        ["linux/arm64", "arm64"],
        ["linux/arm64/v8", "arm64"],
      ] as const) {
        const info = await box.json<InspectJson>(["inspect", "--platform", platform, ref()]);
        assert.equal(info.digest, entry(arch).digest, platform);
        assert.equal(info.indexDigest, multiRaw.manifestDigest);
        assert.deepEqual(info.config.env, [`ARCH=${arch}`]);
      }
    });

    it("refuses a platform the index lacks, naming the ones it has", async () => {
      const before = await box.json<ImageRow[]>(["images"]);
      const line = assertFails(
        await box.kiln(["pull", "--platform", "linux/s390x", ref()]),
        "PLATFORM_NOT_FOUND",
      );
      assert.match(line, /linux\/s390x/);
      assert.match(line, /linux\/amd64/);
      assert.match(line, /linux\/arm64\/v8/);
      assert.doesNotMatch(line, /unknown\/unknown/, "the attestation entry is no platform");
      assert.deepEqual(await box.json<ImageRow[]>(["images"]), before);
      await assertTmpEmpty(box.root);
    });
  });

  it("shows layer bars and a total with bytes and blob i/n on a terminal", {
    skip: scriptMissing(),
  }, async () => {
    const box = await sandbox();
    try {
      const ref = `${reg.host}/sample:gzip`;
      const cmd = `bin/kiln --root '${box.root}' pull ${ref}`;
      const out = await runInPty(cmd, childEnv({}, box.dockerConfig));
      assert.equal(out.code, 0, out.text);
      const text = out.text.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, "");
      const layers = raw.get("gzip")!.json.layers as { digest: string }[];
      for (const l of layers) assert.ok(text.includes(l.digest.slice(7, 19)), `a bar for layer ${l.digest}`);
      assert.match(text, /total/);
      assert.match(text, /blob 3\/3/);
      assert.match(text, /\d+(\.\d+)? (B|KiB|MiB)\/\d+(\.\d+)? (B|KiB|MiB)/, "bytes received / total");
      assert.match(text, new RegExp(`Pulled ${escapeRegExp(ref)} linux/amd64`));
    } finally {
      await box.cleanup();
    }
  });
});
