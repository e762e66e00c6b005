import assert from "node:assert/strict";
import { cpSync, mkdtempSync, readFileSync, rmSync, truncateSync, unlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { isKilnError } from "../../src/errors.js";
import { formatReference } from "../../src/reference/reference.js";
import { MediaType } from "../../src/registry/manifest.js";
import { hostPlatform, parsePlatform } from "../../src/registry/platform.js";
import { openArchive } from "../../src/source/archive.js";
import type { ImageSource } from "../../src/source/types.js";
import { buildBaseImages, collect, flipByteInMember, sha256, skopeo, skopeoInspect } from "./fixtures.js";

interface IndexJson {
  schemaVersion: number;
  manifests: { mediaType: string; digest: string; size: number; annotations?: Record<string, string> }[];
}

const blobFile = (layout: string, digest: string) =>
  join(layout, "blobs", "sha256", digest.slice("sha256:".length));

function code(c: string, pattern?: RegExp) {
  return (err: unknown) => {
    assert.ok(isKilnError(err, c as never), `expected ${c}, got ${String(err)}`);
    if (pattern) assert.match((err as Error).message, pattern);
    return true;
  };
}

async function closeAll(sources: ImageSource[]): Promise<void> {
  for (const s of sources) await s.close();
}

describe("OCI layouts and archives", () => {
  let dir: string;
  let layout: string;
  let n = 0;
  const copyLayout = () => {
    const to = join(dir, `copy${n++}`);
    cpSync(layout, to, { recursive: true });
    return to;
  };
  const readIndex = (l: string): IndexJson => JSON.parse(readFileSync(join(l, "index.json"), "utf8"));
  const writeIndex = (l: string, index: IndexJson) =>
    writeFileSync(join(l, "index.json"), JSON.stringify(index));

  before(() => {
    dir = mkdtempSync(join(tmpdir(), "kiln-oci-"));
    layout = buildBaseImages(dir).layout;
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  test("a layout directory: manifest, config and layers are what skopeo reports", async () => {
    const sources = await openArchive(layout);
    try {
      assert.equal(sources.length, 2, "two images with bare tags: two untagged sources");
      for (const [i, tag] of ["t", "small"].entries()) {
        const source = sources[i]!;
        assert.equal(source.origin, `oci:${layout}:@${i}`);
        const want = skopeoInspect(`oci:${layout}:${tag}`);
        const got = await source.resolve({});
        assert.equal(got.ref, undefined);
        assert.equal(got.index, undefined);
        assert.equal(got.manifest.digest, sha256(want.manifest));
        assert.deepEqual(got.manifest.bytes, want.manifest);
        assert.equal(got.manifest.mediaType, MediaType.OCI_MANIFEST);
        assert.deepEqual(got.config.bytes, want.config);
        assert.equal(got.config.digest, sha256(want.config));
        const skopeoLayers = JSON.parse(want.manifest.toString()).layers as {
          digest: string;
          size: number;
        }[];
        assert.deepEqual(
          got.layers.map((l) => [l.digest, l.size]),
          skopeoLayers.map((l) => [l.digest, l.size]),
        );
        for (const layer of got.layers) {
          let counted = 0;
          const bytes = await collect(await source.openBlob(layer, { onBytes: (k) => (counted += k) }));
          assert.equal(sha256(bytes), layer.digest);
          assert.equal(counted, layer.size);
        }
      }
      assert.deepEqual((await sources[1]!.resolve({})).platform, {
        os: "linux",
        architecture: "arm64",
        variant: "v8",
      });
    } finally {
      await closeAll(sources);
    }
  });

  test("an oci-archive from skopeo: its bare tag needs --tag to name the image", async () => {
    const archive = join(dir, "oci-archive.tar");
    skopeo("copy", "-q", `oci:${layout}:t`, `oci-archive:${archive}:1.0`);
    const [plain, ...rest] = await openArchive(archive);
    assert.equal(rest.length, 0);
    assert.equal(plain!.origin, `oci-archive:${archive}`);
    const resolved = await plain!.resolve({});
    assert.equal(resolved.ref, undefined);
    assert.equal(resolved.manifest.digest, sha256(skopeoInspect(`oci:${layout}:t`).manifest));
    const bytes = await collect(await plain!.openBlob(resolved.layers[0]!));
    assert.deepEqual(bytes, readFileSync(blobFile(layout, resolved.layers[0]!.digest)));
    await plain!.close();

    const [tagged] = await openArchive(archive, { tag: "example.com/app:1.0" });
    assert.equal(formatReference((await tagged!.resolve({})).ref!), "example.com/app:1.0");
    await tagged!.close();
  });

  test("full ref.name and io.containerd.image.name annotations name the image", async () => {
    const l = copyLayout();
    const index = readIndex(l);
    index.manifests[0]!.annotations = {
      "org.opencontainers.image.ref.name": "docker.io/library/x:1",
      "io.containerd.image.name": "registry.example:5000/team/x:1",
    };
    index.manifests.push({
      ...index.manifests[0]!,
      annotations: { "org.opencontainers.image.ref.name": "x:2" },
    });
    writeIndex(l, index);
    const sources = await openArchive(l);
    const refs = await Promise.all(
      sources.map(async (s) => {
        const { ref } = await s.resolve({});
        return ref && formatReference(ref);
      }),
    );
    assert.deepEqual(refs, [
      "registry.example:5000/team/x:1",
      "docker.io/library/x:1",
      "docker.io/library/x:2",
      undefined,
    ]);
    assert.equal(sources.length, 4, "the second image (bare tag) is one more, untagged");
    assert.equal(sources[0]!.origin, `oci:${l}:registry.example:5000/team/x:1`);
    await closeAll(sources);
  });

  test("a nested index is a multi-platform image: resolve picks the platform", async () => {
    const l = copyLayout();
    const index = readIndex(l);
    const [t, small] = index.manifests;
    const absent = sha256("not in this archive");
    const nested = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: MediaType.OCI_INDEX,
        manifests: [
          {
            mediaType: t!.mediaType,
            digest: t!.digest,
            size: t!.size,
            platform: { os: "linux", architecture: "amd64" },
          },
          {
            mediaType: small!.mediaType,
            digest: small!.digest,
            size: small!.size,
            platform: { os: "linux", architecture: "arm64" },
          },
          {
            mediaType: t!.mediaType,
            digest: absent,
            size: 10,
            platform: { os: "linux", architecture: "s390x" },
          },
        ],
      }),
    );
    writeFileSync(blobFile(l, sha256(nested)), nested);
    writeIndex(l, {
      schemaVersion: 2,
      manifests: [
        {
          mediaType: MediaType.OCI_INDEX,
          digest: sha256(nested),
          size: nested.length,
          annotations: { "org.opencontainers.image.ref.name": "example.com/multi:1" },
        },
      ],
    });
    const [source, ...rest] = await openArchive(l);
    assert.equal(rest.length, 0);
    const arm = await source!.resolve({ platform: parsePlatform("linux/arm64") });
    assert.equal(arm.manifest.digest, small!.digest);
    assert.equal(arm.config.parsed.architecture, "arm64");
    assert.equal(arm.index?.digest, sha256(nested));
    assert.deepEqual(arm.index?.bytes, nested);
    assert.equal(formatReference(arm.ref!), "example.com/multi:1");

    const host = hostPlatform();
    if (host.architecture === "amd64" || host.architecture === "arm64") {
      const auto = await source!.resolve({});
      assert.equal(auto.manifest.digest, host.architecture === "amd64" ? t!.digest : small!.digest);
    }
    await assert.rejects(
      source!.resolve({ platform: parsePlatform("linux/s390x") }),
      code("PLATFORM_NOT_FOUND", /linux\/amd64, linux\/arm64/),
    );
    await assert.rejects(
      source!.resolve({ platform: parsePlatform("linux/riscv64") }),
      code("PLATFORM_NOT_FOUND"),
    );
    await source!.close();
  });

  test("a single-platform image: another platform asked is PLATFORM_MISMATCH, none asked is fine", async () => {
    const [t, small] = await openArchive(layout);
    await assert.rejects(
      t!.resolve({ platform: parsePlatform("linux/arm64") }),
      code("PLATFORM_MISMATCH", /linux\/amd64/),
    );
    assert.equal(
      (await t!.resolve({ platform: parsePlatform("linux/amd64") })).platform.architecture,
      "amd64",
    );
    assert.equal(
      (await small!.resolve({ platform: parsePlatform("linux/arm64/v8") })).platform.architecture,
      "arm64",
    );
    assert.equal((await small!.resolve({})).platform.architecture, "arm64");
    await closeAll([t!, small!]);
  });

  test("documents that do not hash to their digest, or are missing, are INVALID_ARCHIVE naming the blob", async () => {
    const base = readIndex(layout).manifests[0]!;
    const manifest = JSON.parse(readFileSync(blobFile(layout, base.digest), "utf8"));
    const configDigest: string = manifest.config.digest;
    const layerDigest: string = manifest.layers[0].digest;

    const flip = (file: string) => {
      const b = readFileSync(file);
      b[5]! ^= 0x01;
      writeFileSync(file, b);
    };
    let l = copyLayout();
    flip(blobFile(l, configDigest));
    let [s] = await openArchive(l);
    await assert.rejects(
      s!.resolve({}),
      code("INVALID_ARCHIVE", new RegExp(`config blob blobs/sha256/${configDigest.slice(7)}`)),
    );
    await s!.close();

    l = copyLayout();
    flip(blobFile(l, base.digest));
    [s] = await openArchive(l);
    await assert.rejects(
      s!.resolve({}),
      code("INVALID_ARCHIVE", new RegExp(`manifest blob .*${base.digest.slice(7)}`)),
    );
    await s!.close();

    l = copyLayout();
    unlinkSync(blobFile(l, configDigest));
    [s] = await openArchive(l);
    await assert.rejects(
      s!.resolve({}),
      code("INVALID_ARCHIVE", new RegExp(`config blob ${configDigest} is missing`)),
    );
    await s!.close();

    l = copyLayout();
    unlinkSync(blobFile(l, layerDigest));
    [s] = await openArchive(l);
    const resolved = await s!.resolve({});
    await assert.rejects(
      s!.openBlob(resolved.layers[0]!),
      code("INVALID_ARCHIVE", new RegExp(`${layerDigest} is missing`)),
    );
    await s!.close();

    l = copyLayout();
    truncateSync(blobFile(l, layerDigest), 1000);
    [s] = await openArchive(l);
    await assert.rejects(
      s!.openBlob((await s!.resolve({})).layers[0]!),
      code("INVALID_ARCHIVE", new RegExp(`${layerDigest} is 1000 bytes, shorter than`)),
    );
    await s!.close();
  });

  test("a directory without oci-layout, or with a broken index.json, is INVALID_ARCHIVE", async () => {
    let l = copyLayout();
    unlinkSync(join(l, "oci-layout"));
    await assert.rejects(openArchive(l), code("INVALID_ARCHIVE", /index\.json without an oci-layout/));
    l = copyLayout();
    writeFileSync(join(l, "oci-layout"), "{}");
    await assert.rejects(openArchive(l), code("INVALID_ARCHIVE", /imageLayoutVersion/));
    l = copyLayout();
    writeFileSync(join(l, "index.json"), "{not json");
    await assert.rejects(openArchive(l), code("INVALID_ARCHIVE", /index\.json/));
  });

  test("an oci-archive with a flipped config byte or cut short is INVALID_ARCHIVE", async () => {
    const archive = join(dir, "oci-archive-2.tar");
    skopeo("copy", "-q", `oci:${layout}:t`, `oci-archive:${archive}:1.0`);
    const [s0] = await openArchive(archive);
    const { config, layers } = await s0!.resolve({});
    await s0!.close();

    const flipped = await flipByteInMember(
      archive,
      `blobs/sha256/${config.digest.slice(7)}`,
      join(dir, "flipped.tar"),
    );
    const [s] = await openArchive(flipped);
    await assert.rejects(s!.resolve({}), code("INVALID_ARCHIVE", /config blob .* does not match its digest/));
    await s!.close();

    const whole = readFileSync(archive);
    const { scanTar } = await import("../../src/tar/scan.js");
    const layer = (await scanTar(archive)).get(`blobs/sha256/${layers[0]!.digest.slice(7)}`)!;
    const cut = join(dir, "cut.tar");
    writeFileSync(cut, whole.subarray(0, layer.offset + Math.floor(layer.size / 2)));
    await assert.rejects(openArchive(cut), code("INVALID_ARCHIVE", /truncated/));
  });
});
