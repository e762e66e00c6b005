/**
 * The client against Docker distribution 2.8 itself (docker-registry), with images pushed by skopeo:
 * plain, Basic (htpasswd), token auth with real JWTs, and TLS with a private CA.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import type { Readable } from "node:stream";
import { after, before, describe, it } from "node:test";
import { isKilnError } from "../../src/errors.js";
import { parseReference } from "../../src/reference/reference.js";
import { RegistryClient, type RegistryOptions } from "../../src/registry/client.js";
import { parsePlatform } from "../../src/registry/platform.js";
import { RegistrySource } from "../../src/source/registry.js";
import { multiArchImage, sampleImage } from "../helpers/fixtures.js";
import { type Pushed, pushImage } from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";

const FAST: RegistryOptions = { retries: { attempts: 2, baseDelayMs: 1, maxDelayMs: 10 } };

async function digestOf(stream: Readable): Promise<string> {
  const h = createHash("sha256");
  for await (const c of stream) h.update(c as Buffer);
  return `sha256:${h.digest("hex")}`;
}

/** Resolves `ref` and streams every layer, checking each against its digest; returns the manifest digest. */
async function pullAll(client: RegistryClient, ref: string, platform = "linux/amd64"): Promise<string> {
  const source = new RegistrySource(parseReference(ref), client);
  const image = await source.resolve({ platform: parsePlatform(platform) });
  for (const layer of image.layers) assert.equal(await digestOf(await source.openBlob(layer)), layer.digest);
  return image.manifest.digest;
}

function creds(user: string, pass: string) {
  return { get: async () => ({ username: user, password: pass }) };
}

describe("against docker-registry", () => {
  let plain: Registry;
  let basic: Registry;
  let token: Registry;
  let tls: Registry;
  let pushed: Record<string, Pushed> = {};

  before(async () => {
    const [sample, multi] = await Promise.all([sampleImage(), multiArchImage()]);
    [plain, basic, token, tls] = await Promise.all([
      startRegistry(),
      startRegistry({ auth: "htpasswd" }),
      startRegistry({ auth: "token" }),
      startRegistry({ tls: true }),
    ]);
    const [p, m, b, t, s] = await Promise.all([
      pushImage(sample, plain, "sample:1"),
      pushImage(multi, plain, "multi:1"),
      pushImage(sample, basic, "sample:1"),
      pushImage(sample, token, "sample:1"),
      pushImage(sample, tls, "sample:1"),
    ]);
    pushed = { plain: p, multi: m, basic: b, token: t, tls: s };
  });
  after(async () => {
    await Promise.all([plain, basic, token, tls].map((r) => r?.stop()));
  });

  it("pulls and verifies an image over plain HTTP on loopback", async () => {
    const client = new RegistryClient(FAST);
    try {
      assert.equal(await pullAll(client, pushed.plain!.ref), pushed.plain!.digest);
      const head = await client.headManifest(parseReference(pushed.plain!.ref), "1");
      assert.equal(head.digest, pushed.plain!.digest);
    } finally {
      await client.close();
    }
  });

  it("selects a platform from a pushed index", async () => {
    const client = new RegistryClient(FAST);
    try {
      const source = new RegistrySource(parseReference(pushed.multi!.ref), client);
      const image = await source.resolve({ platform: parsePlatform("linux/arm64") });
      assert.equal(image.index?.digest, pushed.multi!.digest);
      assert.equal(image.config.parsed.architecture, "arm64");
      await assert.rejects(source.resolve({ platform: parsePlatform("linux/riscv64") }), (err) =>
        isKilnError(err, "PLATFORM_NOT_FOUND"),
      );
    } finally {
      await client.close();
    }
  });

  it("reports an unknown tag and an unknown repository as NOT_FOUND", async () => {
    const client = new RegistryClient(FAST);
    try {
      await assert.rejects(
        client.getManifest({ registry: plain.host, repository: "sample" }, "nope"),
        (err) => {
          assert.ok(isKilnError(err, "NOT_FOUND"));
          assert.equal(err.message, `manifest unknown: ${plain.host}/sample:nope`);
          return true;
        },
      );
      await assert.rejects(client.getManifest({ registry: plain.host, repository: "foo" }, "bar"), (err) => {
        assert.ok(isKilnError(err, "NOT_FOUND"));
        // Distribution 2.8 answers MANIFEST_UNKNOWN (not NAME_UNKNOWN) for a repository it never saw.
        assert.equal(err.message, `manifest unknown: ${plain.host}/foo:bar`);
        return true;
      });
    } finally {
      await client.close();
    }
  });

  it("pulls with Basic auth and refuses wrong credentials", async () => {
    const { user, pass } = basic.users[0]!;
    const good = new RegistryClient({ ...FAST, credentials: creds(user, pass) });
    const bad = new RegistryClient({ ...FAST, credentials: creds(user, "wrong") });
    try {
      assert.equal(await pullAll(good, pushed.basic!.ref), pushed.basic!.digest);
      await assert.rejects(pullAll(bad, pushed.basic!.ref), (err) => {
        assert.ok(isKilnError(err, "UNAUTHORIZED"), String(err));
        assert.match(err.message, new RegExp(basic.host.replace(/\./g, "\\.")));
        return true;
      });
    } finally {
      await good.close();
      await bad.close();
    }
  });

  it("pulls with token auth using one token for the whole image", async () => {
    const { user, pass } = token.users[0]!;
    const client = new RegistryClient({ ...FAST, credentials: creds(user, pass) });
    const ts = token.tokenServer!;
    const before = ts.tokenRequests;
    try {
      assert.equal(await pullAll(client, pushed.token!.ref), pushed.token!.digest);
      assert.equal(ts.tokenRequests - before, 1);
      assert.deepEqual(ts.requests.at(-1)?.scopes, ["repository:sample:pull"]);
    } finally {
      await client.close();
    }
  });

  it("refuses token auth with wrong or no credentials", async () => {
    const { user } = token.users[0]!;
    const wrong = new RegistryClient({ ...FAST, credentials: creds(user, "wrong") });
    const none = new RegistryClient(FAST);
    try {
      await assert.rejects(pullAll(wrong, pushed.token!.ref), (err) => isKilnError(err, "UNAUTHORIZED"));
      await assert.rejects(pullAll(none, pushed.token!.ref), (err) => isKilnError(err, "UNAUTHORIZED"));
    } finally {
      await wrong.close();
      await none.close();
    }
  });

  it("needs the CA for a TLS registry", async () => {
    const without = new RegistryClient(FAST);
    const withCa = new RegistryClient({ ...FAST, caFile: tls.caFile });
    try {
      await assert.rejects(pullAll(without, pushed.tls!.ref), (err) => isKilnError(err, "TLS"));
      assert.equal(await pullAll(withCa, pushed.tls!.ref), pushed.tls!.digest);
    } finally {
      await without.close();
      await withCa.close();
    }
  });
});
