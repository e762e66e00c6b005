/**
 * `kiln import` end to end: a `docker save`-style archive and an OCI archive written by skopeo,
 * named with --tag and inspected; a truncated archive imports nothing.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { copyFile, readFile, stat, truncate } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { SAMPLE_SPEC, sampleImage } from "../helpers/fixtures.js";
import {
  type Layout,
  MEDIA,
  readBlob,
  tagDescriptor,
  toDockerArchive,
  toOciArchive,
} from "../helpers/images.js";
import {
  assertBlobsVerify,
  assertConfig,
  assertFails,
  assertTmpEmpty,
  type InspectJson,
  type PullJson,
  type Sandbox,
  sandbox,
  snapshot,
} from "./kiln.js";

interface DockerArchiveManifest {
  Config: string;
  RepoTags: string[];
  Layers: string[];
}

interface OciManifest {
  mediaType?: string;
  config: { digest: string };
  layers: { digest: string; mediaType: string; size: number }[];
}

const sha256 = (b: Buffer) => `sha256:${createHash("sha256").update(b).digest("hex")}`;

describe("kiln import", () => {
  let work: string;
  let sample: Layout;
  let dockerTar: string;
  let ociTar: string;
  let box: Sandbox;

  before(async () => {
    work = await makeTempDir("cli-import");
    sample = await sampleImage();
    dockerTar = await toDockerArchive(sample, join(work, "docker.tar"), "example/app:1");
    ociTar = await toOciArchive(sample, join(work, "oci.tar"));
    box = await sandbox();
  });
  after(async () => {
    await box?.cleanup();
    if (work) await removeDir(work);
  });

  it("imports a docker-archive under --tag: config, layers and diff IDs as in the archive", async () => {
    const [entry] = JSON.parse(
      await run("tar", ["-xOf", dockerTar, "manifest.json"]),
    ) as DockerArchiveManifest[];
    assert.ok(entry);
    const config = await run("tar", ["-xOf", dockerTar, entry.Config], { binary: true });
    const diffIds = (JSON.parse(config.toString("utf8")) as { rootfs: { diff_ids: string[] } }).rootfs
      .diff_ids;

    const [imported, ...rest] = await box.json<PullJson[]>(["import", dockerTar, "--tag", "example/app:2"]);
    assert.equal(rest.length, 0);
    assert.equal(imported!.ref, "docker.io/example/app:2");

    const info = await box.json<InspectJson>(["inspect", "example/app:2"]);
    assert.equal(info.digest, imported!.digest);
    assert.equal(info.ref, "docker.io/example/app:2");
    assert.equal(info.platform, "linux/amd64");
    assert.equal(info.mediaType, MEDIA.DOCKER_MANIFEST);
    assert.equal(info.configDigest, sha256(config));
    assert.deepEqual(
      info.layers.map((l) => l.diffId),
      diffIds,
    );
    // docker save layers are plain tars: each blob is its own diff ID.
    for (const l of info.layers) {
      assert.equal(l.mediaType, MEDIA.DOCKER_LAYER);
      assert.equal(l.digest, l.diffId);
    }
    assertConfig(info, SAMPLE_SPEC.config!);

    // The manifest kiln wrote for the archive is a blob like any other and names the same parts.
    const manifest = JSON.parse(
      (await readFile(join(box.root, "blobs", "sha256", info.digest.slice(7)))).toString("utf8"),
    ) as OciManifest;
    assert.equal(manifest.config.digest, info.configDigest);
    assert.deepEqual(
      manifest.layers.map((l) => l.digest),
      info.layers.map((l) => l.digest),
    );
    const blobs = await assertBlobsVerify(box.root);
    for (const d of [info.digest, info.configDigest, ...info.layers.map((l) => l.digest)])
      assert.ok(blobs.includes(d), `blob ${d} stored`);
    await assertTmpEmpty(box.root);
  });

  it("imports a docker-archive under its own RepoTag without --tag", async () => {
    const [imported] = await box.json<PullJson[]>(["import", dockerTar]);
    assert.equal(imported!.ref, "docker.io/example/app:1");
    assert.equal(imported!.downloaded, 0, "the layers are in the store already");
    const info = await box.json<InspectJson>(["inspect", "example/app:1"]);
    assert.equal(info.digest, (await box.json<InspectJson>(["inspect", "example/app:2"])).digest);
  });

  it("imports an OCI archive under --tag with the layout's manifest digest", async () => {
    const desc = await tagDescriptor(sample);
    const manifest = JSON.parse((await readBlob(sample.dir, desc.digest)).toString("utf8")) as OciManifest;

    const [imported] = await box.json<PullJson[]>(["import", ociTar, "--tag", "example/oci:1"]);
    assert.equal(imported!.ref, "docker.io/example/oci:1");
    const info = await box.json<InspectJson>(["inspect", "example/oci:1"]);
    assert.equal(info.digest, desc.digest);
    assert.equal(info.mediaType, MEDIA.OCI_MANIFEST);
    assert.equal(info.configDigest, manifest.config.digest);
    assert.deepEqual(
      info.layers.map((l) => ({ digest: l.digest, mediaType: l.mediaType, size: l.size })),
      manifest.layers.map((l) => ({ digest: l.digest, mediaType: l.mediaType, size: l.size })),
    );
    for (const l of info.layers) assert.equal(l.mediaType, MEDIA.OCI_LAYER_GZIP);
    const config = JSON.parse((await readBlob(sample.dir, manifest.config.digest)).toString("utf8")) as {
      rootfs: { diff_ids: string[] };
    };
    assert.deepEqual(
      info.layers.map((l) => l.diffId),
      config.rootfs.diff_ids,
    );
    assertConfig(info, SAMPLE_SPEC.config!);
    await assertBlobsVerify(box.root);
    await assertTmpEmpty(box.root);
  });

  it("refuses a truncated docker-archive with INVALID_ARCHIVE and stores nothing", async () => {
    // A store holding the OCI import only: the archive's plain-tar layers would all be new blobs.
    const fresh = await sandbox();
    try {
      assert.equal((await fresh.kiln(["import", ociTar, "--tag", "example/oci:1"])).code, 0);
      const before = await snapshot(fresh);
      assert.equal(before.images.length, 1);
      const size = (await stat(dockerTar)).size;
      // Inside the big layer; and inside manifest.json, the archive's last member but one.
      for (const cut of [Math.floor(size / 2), size - 2048 - 300]) {
        const file = join(work, `truncated-${cut}.tar`);
        await copyFile(dockerTar, file);
        await truncate(file, cut);
        assertFails(await fresh.kiln(["import", file, "--tag", "example/truncated:1"]), "INVALID_ARCHIVE");
        assert.deepEqual(await snapshot(fresh), before, `after a cut at ${cut} of ${size} bytes`);
      }
    } finally {
      await fresh.cleanup();
    }
  });
});
