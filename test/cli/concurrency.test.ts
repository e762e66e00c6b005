/**
 * Two `kiln pull` processes of one image into one store at once. A barrier in the proxy holds each
 * layer download until both processes asked for it, so they really overlap (no sleeps).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import Database from "better-sqlite3";
import { type FaultProxy, startFaultProxy } from "../helpers/faultproxy.js";
import { sampleImage } from "../helpers/fixtures.js";
import { inspectRaw, pushImage, type RawImage } from "../helpers/images.js";
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
