import assert from "node:assert/strict";
import {
  copyFileSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  unlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { gzipSync } from "node:zlib";
import { isKilnError } from "../../src/errors.js";
import { formatReference } from "../../src/reference/reference.js";
import { MediaType } from "../../src/registry/manifest.js";
import { parsePlatform } from "../../src/registry/platform.js";
import { openArchive } from "../../src/source/archive.js";
import { digestOfMemberName, dockerLayerMediaType } from "../../src/source/docker-archive.js";
import type { ImageSource, ResolvedImage } from "../../src/source/types.js";
import { scanTar } from "../../src/tar/scan.js";
import {
  buildBaseImages,
  collect,
  flipByteInMember,
  packDir,
  run,
  sha256,
  skopeo,
  skopeoInspect,
  unpack,
} from "./fixtures.js";

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

interface ManifestJsonEntry {
  Config: string;
  RepoTags: string[] | null;
  Layers: string[];
}

describe("docker-archive sources", () => {
  let dir: string;
  let layout: string;
  /** skopeo's docker-archive of `t`: RepoTags example.com/app:1 and :latest, uncompressed layers. */
  let archive: string;
  let n = 0;
  const fresh = (name: string) => join(dir, `${name}-${n++}`);

  before(() => {
    dir = mkdtempSync(join(tmpdir(), "kiln-docker-"));
    layout = buildBaseImages(dir).layout;
    archive = join(dir, "docker.tar");
    skopeo(
      "copy",
      "-q",
      "--additional-tag",
      "example.com/app:latest",
      `oci:${layout}:t`,
      `docker-archive:${archive}:example.com/app:1`,
    );
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  async function resolveOnly(path: string, opts: { tag?: string } = {}): Promise<ResolvedImage> {
    const sources = await openArchive(path, opts);
    try {
      return await sources[0]!.resolve({});
    } finally {
      await closeAll(sources);
    }
  }

  test("skopeo's archive: one source per RepoTag, a Docker schema 2 manifest as skopeo writes it", async () => {
    const sources = await openArchive(archive);
    try {
      assert.deepEqual(
        sources.map((s) => s.origin),
        [`docker-archive:${archive}:example.com/app:1`, `docker-archive:${archive}:example.com/app:latest`],
      );
      const [a, b] = [await sources[0]!.resolve({}), await sources[1]!.resolve({})];
      assert.equal(formatReference(a.ref!), "example.com/app:1");
      assert.equal(formatReference(b.ref!), "example.com/app:latest");
      assert.equal(a.manifest.digest, b.manifest.digest);
      assert.equal(a.manifest.mediaType, MediaType.DOCKER_MANIFEST);
      assert.equal(a.config.mediaType, MediaType.DOCKER_CONFIG);
      assert.equal(a.manifest.digest, sha256(a.manifest.bytes));
      // skopeo synthesizes the same document but calls uncompressed layers tar.gzip.
      const skopeoRaw = skopeo("inspect", "--raw", `docker-archive:${archive}`);
      assert.equal(
        a.manifest.bytes.toString(),
        skopeoRaw.replaceAll(MediaType.DOCKER_LAYER_GZIP, MediaType.DOCKER_LAYER),
      );
      // The config bytes are the OCI image's, untouched.
      assert.deepEqual(a.config.bytes, skopeoInspect(`oci:${layout}:t`).config);
      assert.deepEqual(
        a.layers.map((l) => l.digest),
        a.config.parsed.rootfs?.diff_ids,
      );
      assert.ok(a.layers.every((l) => l.mediaType === MediaType.DOCKER_LAYER));
      for (const layer of a.layers) {
        const bytes = await collect(await sources[1]!.openBlob(layer));
        assert.equal(bytes.length, layer.size);
        assert.equal(sha256(bytes), layer.digest);
      }
      assert.deepEqual(
        await collect(
          await sources[0]!.openBlob({
            mediaType: a.config.mediaType,
            digest: a.config.digest,
            size: a.config.bytes.length,
          }),
        ),
        a.config.bytes,
      );
      assert.deepEqual(
        await collect(
          await sources[0]!.openBlob({
            mediaType: a.manifest.mediaType,
            digest: a.manifest.digest,
            size: a.manifest.bytes.length,
          }),
        ),
        a.manifest.bytes,
      );
    } finally {
      await closeAll(sources);
    }
    const again = await resolveOnly(archive);
    assert.deepEqual(again.manifest.bytes, (await resolveOnly(archive)).manifest.bytes, "deterministic");
  });

  test("--tag names the image once, whatever its RepoTags", async () => {
    const sources = await openArchive(archive, { tag: "localhost:5000/renamed:v2" });
    assert.equal(sources.length, 1);
    assert.equal(formatReference((await sources[0]!.resolve({})).ref!), "localhost:5000/renamed:v2");
    await closeAll(sources);
  });

  test("old layout with real <id>/layer.tar files: plain, gzip and zstd layers by magic bytes", async () => {
    const base = await resolveOnly(archive);
    const d = unpack(archive, fresh("old"));
    const entries: ManifestJsonEntry[] = JSON.parse(readFileSync(join(d, "manifest.json"), "utf8"));
    const diffTars = entries[0]!.Layers;
    for (const name of readdirSync(d))
      if (/^[0-9a-f]{64}$/.test(name)) rmSync(join(d, name), { recursive: true });

    // Uncompressed, as real files: the same manifest as from skopeo's symlinked layout.
    diffTars.forEach((t, i) => {
      mkdirSync(join(d, `id${i}`));
      copyFileSync(join(d, t), join(d, `id${i}`, "layer.tar"));
    });
    for (const t of diffTars) unlinkSync(join(d, t));
    writeFileSync(
      join(d, "manifest.json"),
      JSON.stringify([{ ...entries[0], RepoTags: null, Layers: diffTars.map((_, i) => `id${i}/layer.tar`) }]),
    );
    const plain = await resolveOnly(packDir(d, `${fresh("old-plain")}.tar`));
    assert.equal(plain.ref, undefined, "no RepoTags: untagged");
    assert.equal(plain.manifest.digest, base.manifest.digest);
    assert.deepEqual(
      (await resolveOnly(d)).manifest.bytes,
      plain.manifest.bytes,
      "an unpacked archive directory too",
    );

    // Layer 1 gzip, layer 2 zstd.
    const l0 = join(d, "id0", "layer.tar");
    const l1 = join(d, "id1", "layer.tar");
    writeFileSync(l0, gzipSync(readFileSync(l0)));
    run("zstd", ["-q", "-f", "--rm", l1, "-o", `${l1}.zst`]);
    copyFileSync(`${l1}.zst`, l1);
    unlinkSync(`${l1}.zst`);
    const tarPath = packDir(d, `${fresh("old-compressed")}.tar`);
    const sources = await openArchive(tarPath, { tag: "example.com/compressed:1" });
    const got = await sources[0]!.resolve({});
    assert.deepEqual(
      got.layers.map((l) => l.mediaType),
      [MediaType.DOCKER_LAYER_GZIP, MediaType.DOCKER_LAYER_ZSTD],
    );
    for (const [i, file] of [l0, l1].entries()) {
      const bytes = readFileSync(file);
      assert.equal(got.layers[i]!.digest, sha256(bytes));
      assert.equal(got.layers[i]!.size, bytes.length);
      assert.deepEqual(await collect(await sources[0]!.openBlob(got.layers[i]!)), bytes);
    }
    assert.notEqual(got.manifest.digest, base.manifest.digest);
    assert.equal(formatReference(got.ref!), "example.com/compressed:1");
    await closeAll(sources);
  });

  test("docker 25+ layout: the OCI manifests are used, manifest.json adds its RepoTags", async () => {
    const base = await resolveOnly(archive);
    const d = fresh("v25");
    mkdirSync(join(d, "blobs", "sha256"), { recursive: true });
    const old = unpack(archive, fresh("v25-src"));
    const entry: ManifestJsonEntry = JSON.parse(readFileSync(join(old, "manifest.json"), "utf8"))[0];
    const put = (bytes: Buffer) => {
      writeFileSync(join(d, "blobs", "sha256", sha256(bytes).slice(7)), bytes);
      return `blobs/sha256/${sha256(bytes).slice(7)}`;
    };
    const config = readFileSync(join(old, entry.Config));
    const layers = entry.Layers.map((l) => readFileSync(join(old, l)));
    const manifest = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: MediaType.OCI_MANIFEST,
        config: { mediaType: MediaType.OCI_CONFIG, digest: sha256(config), size: config.length },
        layers: layers.map((l) => ({ mediaType: MediaType.OCI_LAYER, digest: sha256(l), size: l.length })),
      }),
    );
    put(manifest);
    writeFileSync(join(d, "oci-layout"), '{"imageLayoutVersion":"1.0.0"}');
    writeFileSync(
      join(d, "index.json"),
      JSON.stringify({
        schemaVersion: 2,
        mediaType: MediaType.OCI_INDEX,
        manifests: [
          {
            mediaType: MediaType.OCI_MANIFEST,
            digest: sha256(manifest),
            size: manifest.length,
            annotations: {
              "io.containerd.image.name": "docker.io/library/app:2",
              "org.opencontainers.image.ref.name": "2",
            },
          },
        ],
      }),
    );
    // A second image listed only in manifest.json (old-style members) is read the docker way.
    const small = join(dir, `small-${n++}.tar`);
    skopeo("copy", "-q", `oci:${layout}:small`, `docker-archive:${small}:example.com/small:1`);
    const smallDir = unpack(small, fresh("v25-small"));
    const smallEntry: ManifestJsonEntry = JSON.parse(
      readFileSync(join(smallDir, "manifest.json"), "utf8"),
    )[0];
    for (const name of [smallEntry.Config, ...smallEntry.Layers])
      copyFileSync(join(smallDir, name), join(d, name));
    writeFileSync(
      join(d, "manifest.json"),
      JSON.stringify([
        { Config: put(config), RepoTags: ["app:2", "app:extra"], Layers: layers.map(put) },
        { Config: smallEntry.Config, RepoTags: ["example.com/small:1"], Layers: smallEntry.Layers },
      ]),
    );
    const tarPath = packDir(d, `${fresh("v25")}.tar`);
    const sources = await openArchive(tarPath);
    try {
      assert.deepEqual(
        sources.map((s) => s.origin),
        [
          `docker-archive:${tarPath}:docker.io/library/app:2`,
          `docker-archive:${tarPath}:docker.io/library/app:extra`,
          `docker-archive:${tarPath}:example.com/small:1`,
        ],
      );
      const got = await sources[1]!.resolve({});
      assert.equal(got.manifest.digest, sha256(manifest), "the archive's own OCI manifest");
      assert.equal(got.manifest.mediaType, MediaType.OCI_MANIFEST);
      assert.equal(got.config.digest, base.config.digest);
      assert.deepEqual(await collect(await sources[0]!.openBlob(got.layers[1]!)), layers[1]);
      const other = await sources[2]!.resolve({ platform: parsePlatform("linux/arm64") });
      assert.equal(
        other.manifest.mediaType,
        MediaType.DOCKER_MANIFEST,
        "synthesized for the manifest.json-only image",
      );
      assert.equal(other.platform.architecture, "arm64");
    } finally {
      await closeAll(sources);
    }
  });

  test("an archive cut inside a layer is INVALID_ARCHIVE: truncated", async () => {
    const index = await scanTar(archive);
    const { layers } = await resolveOnly(archive);
    const member = index.get(`${layers[0]!.digest.slice(7)}.tar`)!;
    const cut = fresh("cut");
    writeFileSync(cut, readFileSync(archive).subarray(0, member.offset + 4096));
    await assert.rejects(openArchive(cut), code("INVALID_ARCHIVE", /truncated.*\.tar"/));
  });

  test("a flipped byte in the config or in a layer is INVALID_ARCHIVE naming it", async () => {
    const { config, layers } = await resolveOnly(archive);
    const badConfig = await flipByteInMember(archive, `${config.digest.slice(7)}.json`, fresh("cfg"), 40);
    await assert.rejects(
      resolveOnly(badConfig),
      code("INVALID_ARCHIVE", new RegExp(`config "${config.digest.slice(7)}.json" does not match`)),
    );
    const badLayer = await flipByteInMember(
      archive,
      `${layers[1]!.digest.slice(7)}.tar`,
      fresh("layer"),
      700,
    );
    await assert.rejects(
      resolveOnly(badLayer),
      code("INVALID_ARCHIVE", /layer 2\/2 ".*\.tar" hashes to sha256:.* but the config's diff ID is/),
    );
  });

  test("a layer or config named in manifest.json but absent is INVALID_ARCHIVE naming it", async () => {
    const d = unpack(archive, fresh("missing"));
    const entries: ManifestJsonEntry[] = JSON.parse(readFileSync(join(d, "manifest.json"), "utf8"));
    writeFileSync(
      join(d, "manifest.json"),
      JSON.stringify([{ ...entries[0], Layers: [entries[0]!.Layers[0], "gone/layer.tar"] }]),
    );
    await assert.rejects(
      resolveOnly(packDir(d, `${fresh("missing-layer")}.tar`)),
      code("INVALID_ARCHIVE", /layer 2\/2 "gone\/layer.tar" named in manifest.json is missing/),
    );
    writeFileSync(join(d, "manifest.json"), JSON.stringify([{ ...entries[0], Config: "nope.json" }]));
    await assert.rejects(
      resolveOnly(packDir(d, `${fresh("missing-config")}.tar`)),
      code("INVALID_ARCHIVE", /missing member "nope.json"/),
    );
    writeFileSync(join(d, "manifest.json"), JSON.stringify({ Config: "x" }));
    await assert.rejects(
      openArchive(packDir(d, `${fresh("bad-manifest")}.tar`)),
      code("INVALID_ARCHIVE", /manifest\.json: not a list/),
    );
  });

  test("openBlob: a descriptor longer than the member, an unknown digest, another platform", async () => {
    const [source, other] = await openArchive(archive);
    const { layers } = await source!.resolve({});
    await assert.rejects(
      source!.openBlob({ ...layers[0]!, size: layers[0]!.size + 1 }),
      code("INVALID_ARCHIVE", /shorter than the/),
    );
    await assert.rejects(source!.openBlob({ ...layers[0]!, digest: sha256("nothing") }), code("NOT_FOUND"));
    await assert.rejects(
      source!.resolve({ platform: parsePlatform("linux/arm64") }),
      code("PLATFORM_MISMATCH"),
    );
    await closeAll([source!, other!]);
  });

  test("member-name digests and layer magic", () => {
    const hex = "a".repeat(64);
    assert.equal(digestOfMemberName(`blobs/sha256/${hex}`), `sha256:${hex}`);
    assert.equal(digestOfMemberName(`${hex}.json`), `sha256:${hex}`);
    assert.equal(digestOfMemberName(`${hex}/layer.tar`), undefined);
    assert.equal(dockerLayerMediaType(Buffer.from([0x1f, 0x8b, 8, 0])), MediaType.DOCKER_LAYER_GZIP);
    assert.equal(dockerLayerMediaType(Buffer.from([0x28, 0xb5, 0x2f, 0xfd])), MediaType.DOCKER_LAYER_ZSTD);
    assert.equal(dockerLayerMediaType(Buffer.from("etc/")), MediaType.DOCKER_LAYER);
    assert.equal(dockerLayerMediaType(Buffer.alloc(0)), MediaType.DOCKER_LAYER);
  });
});
