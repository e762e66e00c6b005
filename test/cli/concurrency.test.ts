/**
 * Two `kiln pull` processes of one image into one store at once. A barrier in the proxy holds each
 * layer download until both processes asked for it, so they really overlap (no sleeps).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import Database from "better-sqlite3";
import { makeTempDir } from "../helpers/exec.js";
import { type FaultProxy, startFaultProxy } from "../helpers/faultproxy.js";
import { sampleImage } from "../helpers/fixtures.js";
import { buildImage, inspectRaw, pushImage, type RawImage } from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import {
  assertBlobsVerify,
  assertMatchesRaw,
  assertTmpEmpty,
  type ImageRow,
  type InspectJson,
  type PullJson,
  type Sandbox,
  sandbox,
} from "./kiln.js";

describe("two kiln pull processes of one image into one store", () => {
  let reg: Registry;
  let proxy: FaultProxy;
  let raw: RawImage;
  let box: Sandbox;

  before(async () => {
    const sample = await sampleImage();
    reg = await startRegistry();
    await pushImage(sample, reg, "sample:1");
    raw = await inspectRaw(reg, "sample:1");
    proxy = await startFaultProxy(reg.url);
    box = await sandbox();
  });
  after(async () => {
    await proxy?.close();
    await reg?.stop();
    await box?.cleanup();
  });

  it("both succeed; one file per blob, one catalog row, tmp/ empty", async () => {
    const layers = raw.json.layers as { digest: string }[];
    const barriers = layers.map((l) =>
      proxy.addRule({
        method: "GET",
        path: new RegExp(`^/v2/sample/blobs/${l.digest}$`),
        action: { barrier: 2 },
      }),
    );
    const ref = `${proxy.host}/sample:1`;
    const [a, b] = await Promise.all([box.kiln(["--json", "pull", ref]), box.kiln(["--json", "pull", ref])]);
    assert.equal(a.code, 0, a.stderr);
    assert.equal(b.code, 0, b.stderr);
    // Each layer was held until both processes had asked for it: both downloaded every layer.
    for (const [i, rule] of barriers.entries()) assert.equal(rule.hits, 2, `layer ${i + 1} barrier`);
    for (const l of layers) {
      const gets = proxy.matching("GET", new RegExp(`/blobs/${l.digest}$`));
      assert.deepEqual(
        gets.map((g) => g.status),
        [200, 200],
      );
    }
    for (const r of [a, b]) {
      const pulled = JSON.parse(r.stdout) as PullJson;
      assert.equal(pulled.digest, raw.manifestDigest);
      assert.equal(pulled.downloaded, 3);
    }

    const blobs = await assertBlobsVerify(box.root);
    assert.deepEqual(blobs, [raw.manifestDigest, raw.configDigest!, ...layers.map((l) => l.digest)].sort());
    await assertTmpEmpty(box.root);

    const images = await box.json<ImageRow[]>(["images"]);
    assert.equal(images.length, 1);
    const db = new Database(join(box.root, "catalog.db"), { readonly: true });
    try {
      const row = db
        .prepare("SELECT count(*) AS n FROM images WHERE manifest_digest = ?")
        .get(raw.manifestDigest) as { n: number };
      assert.equal(row.n, 1);
    } finally {
      db.close();
    }
    assertMatchesRaw(await box.json<InspectJson>(["inspect", ref]), raw);
  });
});

describe("parallel layer downloads of one pull", () => {
  let reg: Registry;
  let proxy: FaultProxy;
  let box: Sandbox;
  let layerPath: RegExp;
  const LAYERS = 6;

  before(async () => {
    const dir = await makeTempDir("six-layers");
    const image = await buildImage(join(dir, "layout"), {
      tag: "six",
      layers: Array.from({ length: LAYERS }, (_, i) => [{ path: `layer-${i}.txt`, content: `layer ${i}\n` }]),
    });
    reg = await startRegistry();
    await pushImage(image, reg, "six:1");
    // Only the layers: the config is a blob too, fetched alone first, and a barrier on it never fills.
    const digests = ((await inspectRaw(reg, "six:1")).json.layers as { digest: string }[]).map(
      (l) => l.digest,
    );
    layerPath = new RegExp(`^/v2/six/blobs/(${digests.join("|")})$`);
    proxy = await startFaultProxy(reg.url);
  });
  after(async () => {
    await proxy?.close();
    await reg?.stop();
  });

  // The barrier holds the first N layer requests until N are open at once: a pull that opened fewer
  // would wait on it and fail. Completion order tells how many overlapped, so nothing here is timed.
  for (const [args, limit] of [[[], 3] as const, [["--concurrency", "2"], 2] as const]) {
    it(`keeps ${limit} layer downloads in flight, never more (${args.join(" ") || "default"})`, async () => {
      box = await sandbox();
      try {
        proxy.reset();
        const barrier = proxy.addRule({ method: "GET", path: layerPath, action: { barrier: limit } });
        const pulled = await box.json<PullJson>(["pull", ...args, `${proxy.host}/six:1`]);
        assert.equal(pulled.downloaded, LAYERS);
        assert.equal(barrier.hits, limit);
        // The config is fetched before the layers, alone; the layer GETs overlap up to the limit.
        assert.equal(proxy.maxConcurrent("GET", layerPath), limit);
      } finally {
        await box.cleanup();
      }
    });
  }
});
