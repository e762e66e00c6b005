import assert from "node:assert/strict";
import type { Readable } from "node:stream";
import { after, before, describe, it } from "node:test";
import { isKilnError } from "../../src/errors.js";
import { parseReference } from "../../src/reference/reference.js";
import { RegistryClient } from "../../src/registry/client.js";
import { parsePlatform } from "../../src/registry/platform.js";
import { RegistrySource } from "../../src/source/registry.js";
import { FakeRegistry, json, makeImage, type Served, serve } from "./fake-registry.js";

async function collect(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

describe("RegistrySource", () => {
  const reg = new FakeRegistry();
  let server: Served;
  let client: RegistryClient;
  const amd64 = makeImage({ architecture: "amd64", layers: [Buffer.from("amd64 layer")] });
  const arm64 = makeImage({ architecture: "arm64", layers: [Buffer.from("arm64 layer")] });
  const armv7 = makeImage({ architecture: "arm", variant: "v7", layers: [Buffer.from("arm layer")] });
  const attestation = makeImage({ architecture: "unknown", os: "unknown", layers: [Buffer.from("{}")] });
  const s390x = makeImage({ architecture: "s390x", layers: [Buffer.from("s390x layer")] });
  let indexDigest: string;

  const source = (ref: string) => new RegistrySource(parseReference(`${server.host}/${ref}`), client);

  before(async () => {
    server = await serve(reg.handler);
    client = new RegistryClient({ retries: { attempts: 1 } });
    for (const img of [amd64, arm64, armv7, attestation]) reg.putImage("multi", img);
    indexDigest = reg.putIndex(
      "multi",
      [
        { image: amd64, platform: { os: "linux", architecture: "amd64" } },
        // arm64 without a variant: must match a request for linux/arm64/v8.
        { image: arm64, platform: { os: "linux", architecture: "arm64" } },
        { image: armv7, platform: { os: "linux", architecture: "arm", variant: "v7" } },
        {
          image: attestation,
          platform: { os: "unknown", architecture: "unknown" },
          annotations: {
            "vnd.docker.reference.type": "attestation-manifest",
            "vnd.docker.reference.digest": amd64.manifestDigest,
          },
        },
      ],
      "latest",
    );
    reg.putImage("single", arm64, "arm");
    reg.putImage("single", s390x, "s390x");
  });
  after(async () => {
    await client.close();
    await server.close();
  });

  it("resolves an index to the requested platform, keeping the tag and the index", async () => {
    const s = source("multi:latest");
    const r = await s.resolve({ platform: parsePlatform("linux/arm64") });
    assert.equal(r.ref?.tag, "latest");
    assert.equal(r.index?.digest, indexDigest);
    assert.equal(r.index?.parsed.manifests.length, 4);
    assert.equal(r.manifest.digest, arm64.manifestDigest);
    assert.deepEqual(r.manifest.bytes, arm64.manifest);
    assert.equal(r.config.digest, arm64.configDigest);
    assert.equal(r.config.parsed.architecture, "arm64");
    assert.deepEqual(r.platform, { os: "linux", architecture: "arm64", variant: "v8" });
    assert.deepEqual(
      r.layers.map((l) => l.digest),
      arm64.layers.map((l) => l.digest),
    );
    assert.equal(s.origin, `${server.host}/multi:latest`);
  });

  it("normalizes arm64/v8 and aarch64 when selecting", async () => {
    for (const p of ["linux/arm64/v8", "linux/aarch64"]) {
      const r = await source("multi").resolve({ platform: parsePlatform(p) });
      assert.equal(r.manifest.digest, arm64.manifestDigest, p);
    }
    const v7 = await source("multi").resolve({ platform: parsePlatform("linux/arm/v7") });
    assert.equal(v7.manifest.digest, armv7.manifestDigest);
  });

  it("lists the available platforms, without attestations, when none matches", async () => {
    await assert.rejects(source("multi").resolve({ platform: parsePlatform("linux/ppc64le") }), (err) => {
      assert.ok(isKilnError(err, "PLATFORM_NOT_FOUND"), String(err));
      assert.match(err.message, /linux\/ppc64le/);
      assert.deepEqual(err.details?.available, ["linux/amd64", "linux/arm64/v8", "linux/arm/v7"]);
      assert.doesNotMatch(err.message, /unknown/);
      return true;
    });
  });

  it("refuses a single-platform image for another requested platform", async () => {
    await assert.rejects(source("single:arm").resolve({ platform: parsePlatform("linux/amd64") }), (err) => {
      assert.ok(isKilnError(err, "PLATFORM_MISMATCH"), String(err));
      assert.equal(err.message, `image ${server.host}/single:arm is linux/arm64/v8, not linux/amd64`);
      return true;
    });
  });

  it("accepts a single-platform image when no platform was asked, with a warning", async () => {
    const s = source("single:s390x");
    const r = await s.resolve({});
    assert.deepEqual(r.platform, { os: "linux", architecture: "s390x" });
    assert.equal(r.index, undefined);
    if (process.arch !== "s390x") assert.match(s.warnings.join("\n"), /is linux\/s390x/);
  });

  it("resolves by digest and streams the layers", async () => {
    const r = await source(`single@${s390x.manifestDigest}`).resolve({
      platform: parsePlatform("linux/s390x"),
    });
    assert.equal(r.manifest.digest, s390x.manifestDigest);
    const s = source(`single@${s390x.manifestDigest}`);
    assert.deepEqual(await collect(await s.openBlob(r.layers[0]!)), s390x.layers[0]!.bytes);
  });

  it("refuses schema 1 manifests", async () => {
    const schema1 = json({ schemaVersion: 1, name: "old", tag: "v1", fsLayers: [], history: [] });
    reg.putManifest("old", schema1, "application/vnd.docker.distribution.manifest.v1+prettyjws", "v1");
    await assert.rejects(source("old:v1").resolve({}), (err) => {
      assert.ok(isKilnError(err, "UNSUPPORTED_MEDIA_TYPE"), String(err));
      assert.match(err.message, /schema 1/);
      return true;
    });
  });

  it("refuses an unknown layer media type", async () => {
    const odd = makeImage({
      layerMediaType: "application/vnd.example.layer.v1+lz4",
      layers: [Buffer.from("x")],
    });
    reg.putImage("odd", odd, "v1");
    await assert.rejects(source("odd:v1").resolve({ platform: parsePlatform("linux/amd64") }), (err) => {
      assert.ok(isKilnError(err, "UNSUPPORTED_MEDIA_TYPE"), String(err));
      assert.match(err.message, /application\/vnd\.example\.layer\.v1\+lz4/);
      return true;
    });
  });

  it("refuses an artifact that is not a container image", async () => {
    const config = json({ name: "chart" });
    const configDigest = reg.putBlob("chart", config);
    const manifest = json({
      schemaVersion: 2,
      mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: {
        mediaType: "application/vnd.cncf.helm.config.v1+json",
        digest: configDigest,
        size: config.length,
      },
      layers: [],
    });
    reg.putManifest("chart", manifest, "application/vnd.oci.image.manifest.v1+json", "1.0");
    await assert.rejects(source("chart:1.0").resolve({}), (err) =>
      isKilnError(err, "UNSUPPORTED_MEDIA_TYPE"),
    );
  });

  it("reports an unknown tag as NOT_FOUND", async () => {
    await assert.rejects(source("multi:nope").resolve({}), (err) => {
      assert.ok(isKilnError(err, "NOT_FOUND"));
      assert.equal(err.message, `manifest unknown: ${server.host}/multi:nope`);
      return true;
    });
  });
});
