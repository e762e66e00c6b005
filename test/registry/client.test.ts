import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import type http from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Readable } from "node:stream";
import { after, before, describe, it } from "node:test";
import { isKilnError } from "../../src/errors.js";
import { RegistryClient, type RegistryOptions } from "../../src/registry/client.js";
import type { Descriptor } from "../../src/registry/manifest.js";
import {
  FakeRegistry,
  json,
  makeImage,
  type Served,
  selfSignedCert,
  sendBlob,
  serve,
  sha256,
} from "./fake-registry.js";

const FAST: RegistryOptions = { retries: { attempts: 3, baseDelayMs: 1, maxDelayMs: 20, resumeAttempts: 3 } };

async function collect(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

function blobDesc(bytes: Buffer, extra: Partial<Descriptor> = {}): Descriptor {
  return {
    mediaType: "application/vnd.oci.image.layer.v1.tar+gzip",
    digest: sha256(bytes),
    size: bytes.length,
    ...extra,
  };
}

/** Deterministic, incompressible-looking bytes. */
function pattern(n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 131 + (i >> 8) * 17) & 0xff;
  return b;
}

describe("RegistryClient over a fake registry", () => {
  const reg = new FakeRegistry();
  let server: Served;
  let client: RegistryClient;
  let ref: { registry: string; repository: string };
  const image = makeImage({ layers: [pattern(300_000), Buffer.from("small layer")] });
  let tmp: string;

  before(async () => {
    tmp = mkdtempSync(join(tmpdir(), "kiln-client-"));
    server = await serve(reg.handler);
    reg.putImage("app", image, "v1");
    client = new RegistryClient(FAST);
    ref = { registry: server.host, repository: "app" };
  });
  after(async () => {
    await client.close();
    await server.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  it("pings /v2/", async () => {
    await client.ping(server.host);
    assert.ok(server.requests.some((r) => r.path === "/v2/"));
  });

  it("gets a manifest by tag and by digest, verified", async () => {
    const byTag = await client.getManifest(ref, "v1");
    assert.equal(byTag.digest, image.manifestDigest);
    assert.equal(byTag.mediaType, "application/vnd.oci.image.manifest.v1+json");
    assert.deepEqual(byTag.bytes, image.manifest);
    const accept = server.requests.findLast((r) => r.path === "/v2/app/manifests/v1")?.headers.accept;
    assert.match(String(accept), /application\/vnd\.oci\.image\.index\.v1\+json/);
    assert.match(String(accept), /application\/vnd\.docker\.distribution\.manifest\.v2\+json/);
    const byDigest = await client.getManifest(ref, image.manifestDigest);
    assert.equal(byDigest.digest, image.manifestDigest);
    assert.deepEqual(byDigest.bytes, image.manifest);
  });

  it("heads a manifest", async () => {
    const head = await client.headManifest(ref, "v1");
    assert.deepEqual(head, {
      digest: image.manifestDigest,
      mediaType: "application/vnd.oci.image.manifest.v1+json",
      size: image.manifest.length,
    });
    assert.equal(server.requests.at(-1)?.method, "HEAD");
  });

  it("refuses manifest bytes that do not match the digest asked for", async () => {
    const other = json({
      schemaVersion: 2,
      mediaType: "application/vnd.oci.image.manifest.v1+json",
      layers: [],
    });
    const fake = sha256("something else");
    reg.repos
      .get("app")!
      .manifests.set(fake, { mediaType: "application/vnd.oci.image.manifest.v1+json", bytes: other });
    await assert.rejects(client.getManifest(ref, fake), (err) => {
      assert.ok(isKilnError(err, "DIGEST_MISMATCH"), String(err));
      assert.match(err.message, new RegExp(fake));
      return true;
    });
  });

  it("refuses a manifest whose Docker-Content-Digest disagrees with its bytes", async () => {
    reg.faults = { wrongDigestHeader: sha256("nope") };
    try {
      await assert.rejects(client.getManifest(ref, "v1"), (err) => isKilnError(err, "DIGEST_MISMATCH"));
      await assert.rejects(client.headManifest(ref, image.manifestDigest), (err) =>
        isKilnError(err, "DIGEST_MISMATCH"),
      );
    } finally {
      reg.faults = {};
    }
  });

  it("caps manifest size", async () => {
    const small = new RegistryClient({ ...FAST, maxManifestBytes: 64 });
    try {
      await assert.rejects(small.getManifest(ref, "v1"), (err) => isKilnError(err, "TOO_LARGE"));
    } finally {
      await small.close();
    }
  });

  it("reports an unknown tag, repository and blob as NOT_FOUND with the reference", async () => {
    await assert.rejects(client.getManifest(ref, "nope"), (err) => {
      assert.ok(isKilnError(err, "NOT_FOUND"));
      assert.equal(err.message, `manifest unknown: ${server.host}/app:nope`);
      return true;
    });
    await assert.rejects(client.getManifest({ registry: server.host, repository: "foo" }, "bar"), (err) => {
      assert.ok(isKilnError(err, "NOT_FOUND"));
      assert.equal(err.message, `repository unknown: ${server.host}/foo`);
      return true;
    });
    const missing = blobDesc(Buffer.from("not there"));
    await assert.rejects(client.openBlob(ref, missing), (err) => {
      assert.ok(isKilnError(err, "NOT_FOUND"));
      assert.equal(err.message, `blob unknown: ${server.host}/app@${missing.digest}`);
      return true;
    });
  });

  it("retries a 500 and succeeds", async () => {
    let failures = 1;
    reg.faults = {
      before: (req, res) => {
        if (req.url === "/v2/app/manifests/v1" && failures > 0) {
          failures--;
          res.statusCode = 500;
          res.end("boom");
          return true;
        }
        return false;
      },
    };
    const before = server.requests.length;
    try {
      const m = await client.getManifest(ref, "v1");
      assert.equal(m.digest, image.manifestDigest);
      const tries = server.requests.slice(before).filter((r) => r.path === "/v2/app/manifests/v1");
      assert.equal(tries.length, 2);
    } finally {
      reg.faults = {};
    }
  });

  it("retries a connection reset before the response", async () => {
    let resets = 1;
    reg.faults = {
      before: (req, res) => {
        if (req.url === "/v2/app/manifests/v1" && resets > 0) {
          resets--;
          res.socket?.destroy();
          return true;
        }
        return false;
      },
    };
    const before = server.requests.length;
    try {
      assert.equal((await client.getManifest(ref, "v1")).digest, image.manifestDigest);
      assert.equal(server.requests.slice(before).filter((r) => r.path === "/v2/app/manifests/v1").length, 2);
    } finally {
      reg.faults = {};
    }
  });

  it("honours 429 Retry-After (capped by maxDelayMs) and then succeeds", async () => {
    let busy = 1;
    reg.faults = {
      before: (req, res) => {
        if (req.url === "/v2/app/manifests/v1" && busy > 0) {
          busy--;
          res.statusCode = 429;
          res.setHeader("retry-after", "1");
          res.end();
          return true;
        }
        return false;
      },
    };
    const before = server.requests.length;
    try {
      await client.getManifest(ref, "v1");
      assert.equal(server.requests.slice(before).filter((r) => r.path === "/v2/app/manifests/v1").length, 2);
    } finally {
      reg.faults = {};
    }
  });

  it("gives up after the configured attempts with the registry's message", async () => {
    reg.faults = {
      before: (req, res) => {
        if (req.url !== "/v2/app/manifests/v1") return false;
        res.statusCode = 503;
        res.setHeader("content-type", "application/json");
        res.end(JSON.stringify({ errors: [{ code: "UNAVAILABLE", message: "maintenance window" }] }));
        return true;
      },
    };
    const before = server.requests.length;
    try {
      await assert.rejects(client.getManifest(ref, "v1"), (err) => {
        assert.ok(isKilnError(err, "REGISTRY_ERROR"));
        assert.match(err.message, /503/);
        assert.match(err.message, /maintenance window/);
        return true;
      });
      assert.equal(server.requests.slice(before).filter((r) => r.path === "/v2/app/manifests/v1").length, 3);
    } finally {
      reg.faults = {};
    }
  });

  it("maps other 4xx to REGISTRY_ERROR with the registry's message, without retrying", async () => {
    reg.faults = {
      before: (req, res) => {
        if (req.url !== "/v2/app/manifests/v1") return false;
        res.statusCode = 400;
        res.setHeader("content-type", "application/json");
        res.end(
          JSON.stringify({ errors: [{ code: "TAG_INVALID", message: "manifest tag did not match URI" }] }),
        );
        return true;
      },
    };
    const before = server.requests.length;
    try {
      await assert.rejects(client.getManifest(ref, "v1"), (err) => {
        assert.ok(isKilnError(err, "REGISTRY_ERROR"));
        assert.match(err.message, /manifest tag did not match URI/);
        return true;
      });
      assert.equal(server.requests.slice(before).length, 1);
    } finally {
      reg.faults = {};
    }
  });

  it("streams a blob, counting bytes", async () => {
    const layer = image.layers[0]!;
    let counted = 0;
    const stream = await client.openBlob(ref, blobDesc(layer.bytes), { onBytes: (n) => (counted += n) });
    assert.deepEqual(await collect(stream), layer.bytes);
    assert.equal(counted, layer.bytes.length);
  });

  it("resumes a cut blob download with Range", async () => {
    const layer = image.layers[0]!;
    reg.faults = { cut: { digest: layer.digest, after: 100_000, times: 1 } };
    const before = server.requests.length;
    try {
      const got = await collect(await client.openBlob(ref, blobDesc(layer.bytes)));
      assert.equal(sha256(got), layer.digest);
      const ranges = server.requests
        .slice(before)
        .map((r) => r.headers.range)
        .filter((r): r is string => r !== undefined);
      assert.equal(ranges.length, 1);
      const offset = Number(/^bytes=(\d+)-$/.exec(ranges[0]!)?.[1]);
      assert.ok(offset > 0 && offset <= 100_000, `resumed at ${offset}`);
    } finally {
      reg.faults = {};
    }
  });

  it("resumes correctly when the server ignores Range and resends from 0", async () => {
    const layer = image.layers[0]!;
    reg.faults = { cut: { digest: layer.digest, after: 70_000, times: 2 }, ignoreRange: true };
    try {
      let counted = 0;
      const got = await collect(
        await client.openBlob(ref, blobDesc(layer.bytes), { onBytes: (n) => (counted += n) }),
      );
      assert.deepEqual(got, layer.bytes);
      assert.ok(counted > layer.bytes.length, "re-sent bytes are reported too");
    } finally {
      reg.faults = {};
    }
  });

  it("gives up after the bounded number of resumes", async () => {
    const layer = image.layers[0]!;
    reg.faults = { cut: { digest: layer.digest, after: 0, times: 100 } };
    try {
      const stream = await client.openBlob(ref, blobDesc(layer.bytes));
      await assert.rejects(collect(stream), (err) => {
        assert.ok(isKilnError(err, "NETWORK"), String(err));
        assert.match(err.message, /resumes failed/);
        return true;
      });
    } finally {
      reg.faults = {};
    }
  });

  it("never yields more than the descriptor's size", async () => {
    const layer = image.layers[1]!;
    const short = { ...blobDesc(layer.bytes), size: layer.bytes.length - 3 };
    await assert.rejects((async () => collect(await client.openBlob(ref, short)))(), (err) =>
      isKilnError(err, "SIZE_MISMATCH"),
    );
  });

  it("getBlob verifies the digest of a small blob", async () => {
    const cfg = await client.getBlob(ref, blobDesc(image.config), 1024 * 1024);
    assert.deepEqual(cfg, image.config);
    const liar = Buffer.from("ABCDEFGH");
    const fakeDigest = sha256("abcdefgh");
    reg.repos.get("app")!.blobs.set(fakeDigest, liar);
    await assert.rejects(client.getBlob(ref, { ...blobDesc(liar), digest: fakeDigest }, 1024), (err) =>
      isKilnError(err, "DIGEST_MISMATCH"),
    );
    await assert.rejects(client.getBlob(ref, blobDesc(image.config), 10), (err) =>
      isKilnError(err, "TOO_LARGE"),
    );
  });

  it("resumes after a stalled body (idle timeout)", async () => {
    const layer = image.layers[0]!;
    let stalls = 1;
    reg.faults = {
      before: (req, res) => {
        if (req.url !== `/v2/app/blobs/${layer.digest}` || stalls <= 0) return false;
        stalls--;
        res.setHeader("content-length", layer.bytes.length);
        res.write(layer.bytes.subarray(0, 1000)); // and then nothing
        return true;
      },
    };
    const slowClient = new RegistryClient({ ...FAST, timeouts: { bodyIdleMs: 1000 } });
    try {
      const got = await collect(await slowClient.openBlob(ref, blobDesc(layer.bytes)));
      assert.deepEqual(got, layer.bytes);
    } finally {
      reg.faults = {};
      await slowClient.close();
    }
  });

  it("aborts a download when the signal fires", async () => {
    const layer = image.layers[0]!;
    reg.faults = {
      before: (req, res) => {
        if (req.url !== `/v2/app/blobs/${layer.digest}`) return false;
        res.setHeader("content-length", layer.bytes.length);
        res.write(layer.bytes.subarray(0, 1000));
        return true;
      },
    };
    try {
      const ac = new AbortController();
      const stream = await client.openBlob(ref, blobDesc(layer.bytes), {
        signal: ac.signal,
        onBytes: () => ac.abort(new Error("stop now")),
      });
      await assert.rejects(collect(stream), /stop now/);
    } finally {
      reg.faults = {};
    }
  });

  it("allows at least 3 blob downloads at once to one registry", async () => {
    const blobs = [pattern(1000), pattern(2000), pattern(3000)].map((b) => ({ b, d: reg.putBlob("app", b) }));
    let active = 0;
    let peak = 0;
    const waiting: (() => void)[] = [];
    reg.faults = {
      before: (req, res) => {
        const hit = blobs.find((x) => req.url === `/v2/app/blobs/${x.d}`);
        if (!hit) return false;
        active++;
        peak = Math.max(peak, active);
        const release = () => {
          active--;
          sendBlob(req, res, hit.b);
        };
        waiting.push(release);
        if (waiting.length === 3) for (const r of waiting.splice(0)) r();
        // Should the client serialize requests, answer anyway so the test fails instead of hanging.
        else
          setTimeout(() => {
            for (const r of waiting.splice(0)) r();
          }, 5000).unref();
        return true;
      },
    };
    try {
      const got = await Promise.all(
        blobs.map(async (x) => collect(await client.openBlob(ref, blobDesc(x.b)))),
      );
      assert.deepEqual(
        got,
        blobs.map((x) => x.b),
      );
      assert.equal(peak, 3);
    } finally {
      reg.faults = {};
    }
  });
});

describe("redirects", () => {
  const reg = new FakeRegistry();
  let registry: Served;
  let storage: Served;
  const blob = pattern(50_000);

  before(async () => {
    storage = await serve(
      (req, res) => {
        if (req.url === `/blobs/${sha256(blob)}`) return sendBlob(req, res, blob);
        res.statusCode = 404;
        res.end();
      },
      { address: "127.0.0.2" },
    );
    registry = await serve(reg.handler);
    reg.auth = { kind: "basic", user: "u", pass: "p" };
    reg.putBlob("app", blob);
    reg.faults = { redirectBlobsTo: storage.url };
  });
  after(async () => {
    await registry.close();
    await storage.close();
  });

  it("follows a redirect to another host without sending Authorization there", async () => {
    const client = new RegistryClient({
      ...FAST,
      credentials: { get: async () => ({ username: "u", password: "p" }) },
    });
    try {
      const got = await collect(
        await client.openBlob({ registry: registry.host, repository: "app" }, blobDesc(blob)),
      );
      assert.deepEqual(got, blob);
      assert.equal(storage.requests.length, 1);
      assert.equal(storage.requests[0]!.headers.authorization, undefined);
      const blobReq = registry.requests.find((r) => r.path.startsWith("/v2/app/blobs/"));
      assert.match(String(blobReq?.headers.authorization), /^Basic /);
    } finally {
      await client.close();
    }
  });
});

describe("TLS and plain HTTP", () => {
  const reg = new FakeRegistry();
  let tmp: string;
  let tlsServer: Served;
  let plain2: Served;
  let certFile: string;
  const image = makeImage({});

  before(async () => {
    tmp = mkdtempSync(join(tmpdir(), "kiln-tls-"));
    const cert = selfSignedCert(tmp);
    certFile = cert.certFile;
    reg.putImage("app", image, "v1");
    tlsServer = await serve(reg.handler, { tls: { key: cert.key, cert: cert.cert } });
    plain2 = await serve(reg.handler, { address: "127.0.0.2" });
  });
  after(async () => {
    await tlsServer.close();
    await plain2.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  it("refuses a self-signed certificate without the CA, with a TLS error", async () => {
    const client = new RegistryClient(FAST);
    try {
      await assert.rejects(
        client.getManifest({ registry: tlsServer.host, repository: "app" }, "v1"),
        (err) => {
          assert.ok(isKilnError(err, "TLS"), String(err));
          assert.match(err.message, new RegExp(tlsServer.host.replace(/\./g, "\\.")));
          return true;
        },
      );
    } finally {
      await client.close();
    }
  });

  it("trusts the certificate given as caFile", async () => {
    const client = new RegistryClient({ ...FAST, caFile: certFile });
    try {
      const m = await client.getManifest({ registry: tlsServer.host, repository: "app" }, "v1");
      assert.equal(m.digest, image.manifestDigest);
    } finally {
      await client.close();
    }
  });

  it("trusts NODE_EXTRA_CA_CERTS from the environment", async () => {
    const client = new RegistryClient({ ...FAST, env: { NODE_EXTRA_CA_CERTS: certFile } });
    try {
      await client.ping(tlsServer.host);
    } finally {
      await client.close();
    }
  });

  it("trusts KILN_DEFERRED_CA_CERTS, the NODE_EXTRA_CA_CERTS that bin/kiln hands on", async () => {
    const client = new RegistryClient({ ...FAST, env: { KILN_DEFERRED_CA_CERTS: certFile } });
    try {
      await client.ping(tlsServer.host);
    } finally {
      await client.close();
    }
  });

  it("reports an unreadable caFile clearly", () => {
    assert.throws(
      () => new RegistryClient({ caFile: join(tmp, "missing.pem") }),
      (err) => isKilnError(err, "INVALID_ARGUMENT"),
    );
  });

  it("skips TLS verification for a registry in insecureRegistries", async () => {
    const client = new RegistryClient({ ...FAST, insecureRegistries: [tlsServer.host] });
    try {
      await client.getManifest({ registry: tlsServer.host, repository: "app" }, "v1");
    } finally {
      await client.close();
    }
  });

  it("never speaks plain HTTP to a host that is not loopback-by-default or listed", async () => {
    const client = new RegistryClient(FAST);
    const before = plain2.requests.length;
    try {
      await assert.rejects(client.getManifest({ registry: plain2.host, repository: "app" }, "v1"), (err) => {
        assert.ok(isKilnError(err, "TLS"), String(err));
        assert.match(err.message, /does not speak TLS/);
        return true;
      });
      assert.equal(plain2.requests.length, before, "no HTTP request reached the server");
    } finally {
      await client.close();
    }
  });

  it("falls back to plain HTTP for a listed insecure registry", async () => {
    const client = new RegistryClient({ ...FAST, insecureRegistries: [plain2.host] });
    try {
      const m = await client.getManifest({ registry: plain2.host, repository: "app" }, "v1");
      assert.equal(m.digest, image.manifestDigest);
    } finally {
      await client.close();
    }
  });

  it("accepts a host-only insecure entry for any port", async () => {
    const client = new RegistryClient({ ...FAST, insecureRegistries: ["127.0.0.2"] });
    try {
      await client.ping(plain2.host);
    } finally {
      await client.close();
    }
  });
});

describe("non-distributable layers and mirrors", () => {
  const reg = new FakeRegistry();
  let registry: Served;
  let foreign: Served;
  const foreignLayer = pattern(20_000);
  const foreignHits: http.IncomingHttpHeaders[] = [];

  before(async () => {
    registry = await serve(reg.handler);
    foreign = await serve((req, res) => {
      if (req.url === "/layers/win.tar.gz") {
        foreignHits.push(req.headers);
        return sendBlob(req, res, foreignLayer);
      }
      res.statusCode = 404;
      res.end();
    });
    reg.auth = { kind: "basic", user: "u", pass: "p" };
  });
  after(async () => {
    await registry.close();
    await foreign.close();
  });

  it("fetches a non-distributable layer from its urls, without credentials", async () => {
    const client = new RegistryClient({
      ...FAST,
      credentials: { get: async () => ({ username: "u", password: "p" }) },
    });
    try {
      const desc = blobDesc(foreignLayer, {
        mediaType: "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        urls: [`${foreign.url}/missing`, `${foreign.url}/layers/win.tar.gz`],
      });
      const got = await collect(await client.openBlob({ registry: registry.host, repository: "app" }, desc));
      assert.deepEqual(got, foreignLayer);
      assert.equal(foreignHits.length, 1);
      assert.equal(foreignHits[0]!.authorization, undefined);
      assert.ok(!registry.requests.some((r) => r.path.includes("/blobs/")), "the registry was not asked");
    } finally {
      await client.close();
    }
  });

  it("falls back to the registry when the urls fail", async () => {
    const bytes = pattern(1234);
    reg.putBlob("app", bytes);
    const client = new RegistryClient({
      ...FAST,
      credentials: { get: async () => ({ username: "u", password: "p" }) },
    });
    try {
      const desc = blobDesc(bytes, {
        mediaType: "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        urls: [`${foreign.url}/gone`],
      });
      const got = await collect(await client.openBlob({ registry: registry.host, repository: "app" }, desc));
      assert.deepEqual(got, bytes);
    } finally {
      await client.close();
    }
  });

  it("uses docker.io mirrors in order, skipping a dead one", async () => {
    const hub = new FakeRegistry();
    const image = makeImage({});
    hub.putImage("library/alpine", image, "3.20");
    const mirror = await serve(hub.handler);
    const dead = await serve(() => {});
    const deadUrl = dead.url;
    await dead.close();
    const client = new RegistryClient({ ...FAST, registryMirrors: [deadUrl, mirror.url] });
    try {
      const m = await client.getManifest({ registry: "docker.io", repository: "library/alpine" }, "3.20");
      assert.equal(m.digest, image.manifestDigest);
      assert.ok(mirror.requests.some((r) => r.path === "/v2/library/alpine/manifests/3.20"));
    } finally {
      await client.close();
      await mirror.close();
    }
  });

  it("rejects a malformed mirror URL up front", () => {
    assert.throws(
      () => new RegistryClient({ registryMirrors: ["ftp://mirror"] }),
      (err) => isKilnError(err, "INVALID_ARGUMENT"),
    );
  });
});
