/**
 * `kiln pull` through a fault-injecting proxy in front of a real registry: busy and failing
 * answers are retried, a cut download resumes with a Range request, wrong bytes fail with
 * DIGEST_MISMATCH and leave the store as it was, and missing things are NOT_FOUND.
 */
import assert from "node:assert/strict";
import { after, before, beforeEach, describe, it } from "node:test";
import { type FaultProxy, startFaultProxy } from "../helpers/faultproxy.js";
import { noEofImage, sampleImage } from "../helpers/fixtures.js";
import { inspectRaw, pushImage, type RawImage } from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import {
  assertBlobsVerify,
  assertFails,
  assertMatchesRaw,
  assertTmpEmpty,
  escapeRegExp,
  type InspectJson,
  type PullJson,
  type Sandbox,
  sandbox,
  snapshot,
} from "./kiln.js";

describe("kiln pull through a faulty connection", () => {
  let reg: Registry;
  let proxy: FaultProxy;
  let raw: RawImage;
  /** The sample's third layer: 1 MiB of incompressible data. */
  let big: { digest: string; size: number };
  let box: Sandbox;
  const ref = () => `${proxy.host}/sample:1`;
  const blobPath = (digest: string) => new RegExp(`^/v2/sample/blobs/${escapeRegExp(digest)}$`);

  /** The pull succeeded, recorded the image as pushed, and the store verifies. */
  async function assertGood(r: { code: number | null; stdout: string; stderr: string }): Promise<void> {
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stderr, "");
    const pulled = JSON.parse(r.stdout) as PullJson;
    assert.equal(pulled.digest, raw.manifestDigest);
    assertMatchesRaw(await box.json<InspectJson>(["inspect", ref()]), raw);
    const blobs = await assertBlobsVerify(box.root);
    assert.deepEqual(
      blobs,
      [raw.manifestDigest, raw.configDigest!, ...pulled.layers.map((l) => l.digest)].sort(),
    );
    await assertTmpEmpty(box.root);
  }

  before(async () => {
    const [sample, noEof] = await Promise.all([sampleImage(), noEofImage()]);
    reg = await startRegistry();
    await pushImage(sample, reg, "sample:1");
    await pushImage(noEof, reg, "other:1");
    raw = await inspectRaw(reg, "sample:1");
    const layers = raw.json.layers as { digest: string; size: number }[];
    big = layers[2]!;
    assert.ok(big.size > 1_000_000, "fixture: the third layer is about 1 MiB");
    proxy = await startFaultProxy(reg.url);
  });
  after(async () => {
    await proxy?.close();
    await reg?.stop();
  });
  beforeEach(async () => {
    proxy.reset();
    await box?.cleanup();
    box = await sandbox();
  });
  after(async () => {
    await box?.cleanup();
  });

  it("retries a 500 on the manifest and on a layer, then succeeds", async () => {
    proxy.addRule({ method: "GET", path: /^\/v2\/sample\/manifests\/1$/, action: { status: 500 } });
    proxy.addRule({ method: "GET", path: blobPath(big.digest), action: { status: 500 } });
    await assertGood(await box.kiln(["--json", "pull", ref()]));
    assert.deepEqual(
      proxy.matching("GET", /\/manifests\/1$/).map((r) => r.status),
      [500, 200],
    );
    assert.deepEqual(
      proxy.matching("GET", blobPath(big.digest)).map((r) => r.status),
      [500, 200],
    );
  });

  it("waits out a 429 with Retry-After, then succeeds", async () => {
    const rule = proxy.addRule({
      method: "GET",
      path: blobPath(big.digest),
      action: { status: 429, headers: { "retry-after": "1" } },
    });
    await assertGood(await box.kiln(["--json", "pull", ref()]));
    assert.equal(rule.hits, 1);
    assert.deepEqual(
      proxy.matching("GET", blobPath(big.digest)).map((r) => r.status),
      [429, 200],
    );
  });

  it("resumes a layer download cut mid-blob with a Range request", async () => {
    const cutAt = 300_000;
    proxy.addRule({ method: "GET", path: blobPath(big.digest), action: { cutAfter: cutAt } });
    await assertGood(await box.kiln(["--json", "pull", ref()]));
    const gets = proxy.matching("GET", blobPath(big.digest));
    assert.equal(gets.length, 2, JSON.stringify(gets));
    assert.equal(gets[0]!.fault, "cut");
    assert.equal(gets[0]!.range, undefined);
    assert.equal(gets[0]!.bytes, cutAt);
    // It resumes where its data ended: at the cut, or a little before if the client dropped bytes
    // it had buffered when the connection closed.
    const m = /^bytes=(\d+)-$/.exec(gets[1]!.range ?? "");
    assert.ok(m, `a Range request after the cut, got ${gets[1]!.range}`);
    const resumedAt = Number(m[1]);
    assert.ok(resumedAt > 0 && resumedAt <= cutAt, `resumed at ${resumedAt}`);
    assert.equal(gets[1]!.status, 206);
    assert.equal(gets[1]!.bytes, big.size - resumedAt);
  });

  it("fails with DIGEST_MISMATCH on wrong layer bytes and leaves the store unchanged", async () => {
    // Something in the store first, so "unchanged" is not just "empty".
    assert.equal((await box.kiln(["pull", `${proxy.host}/other:1`])).code, 0);
    const before = await snapshot(box);
    assert.equal(before.images.length, 1);
    proxy.reset();
    proxy.addRule({
      method: "GET",
      path: blobPath(big.digest),
      times: Number.POSITIVE_INFINITY,
      action: { corruptAt: 500_000 },
    });
    const line = assertFails(await box.kiln(["pull", ref()]), "DIGEST_MISMATCH");
    assert.match(line, new RegExp(escapeRegExp(big.digest)));
    assert.ok(proxy.matching("GET", blobPath(big.digest)).every((r) => r.fault === "corrupt"));
    assert.deepEqual(await snapshot(box), before);
    await assertBlobsVerify(box.root);
  });

  it("fails with DIGEST_MISMATCH on wrong manifest bytes", async () => {
    proxy.addRule({
      method: "GET",
      path: /^\/v2\/sample\/manifests\/1$/,
      times: Number.POSITIVE_INFINITY,
      action: { corruptAt: 20 },
    });
    assertFails(await box.kiln(["pull", ref()]), "DIGEST_MISMATCH");
    assert.deepEqual(await snapshot(box), { blobs: [], tmp: [], images: [] });
  });

  it("fails with UNAUTHORIZED when the registry asks for credentials it was not given", async () => {
    proxy.addRule({
      path: /^\/v2\//,
      times: Number.POSITIVE_INFINITY,
      action: { status: 401, headers: { "www-authenticate": 'Basic realm="kiln-proxy"' } },
    });
    assertFails(await box.kiln(["pull", ref()]), "UNAUTHORIZED");
    assert.deepEqual(await snapshot(box), { blobs: [], tmp: [], images: [] });
  });

  it("fails with NOT_FOUND for an unknown repository and an unknown tag", async () => {
    const repo = assertFails(await box.kiln(["pull", `${proxy.host}/no/such-repo:1`]), "NOT_FOUND");
    assert.match(repo, /(manifest|repository) unknown: 127\.0\.0\.1:\d+\/no\/such-repo/);
    const tag = assertFails(await box.kiln(["pull", `${proxy.host}/sample:no-such-tag`]), "NOT_FOUND");
    assert.match(tag, /manifest unknown: 127\.0\.0\.1:\d+\/sample:no-such-tag$/);
    assert.deepEqual(await snapshot(box), { blobs: [], tmp: [], images: [] });
  });
});
