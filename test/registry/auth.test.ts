import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { isKilnError } from "../../src/errors.js";
import { parseChallenges } from "../../src/registry/auth.js";
import { RegistryClient, type RegistryOptions } from "../../src/registry/client.js";
import type { Credential } from "../../src/registry/credentials.js";
import {
  FakeRegistry,
  makeImage,
  type Served,
  serve,
  type TokenServer,
  tokenServer,
} from "./fake-registry.js";

const FAST: RegistryOptions = { retries: { attempts: 2, baseDelayMs: 1, maxDelayMs: 10 } };

function creds(c: Credential | undefined) {
  return { get: async () => c };
}

describe("parseChallenges", () => {
  it("parses Bearer parameters, quoted and not", () => {
    assert.deepEqual(
      parseChallenges(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"',
      ),
      [
        {
          scheme: "bearer",
          params: {
            realm: "https://auth.docker.io/token",
            service: "registry.docker.io",
            scope: "repository:library/alpine:pull",
          },
        },
      ],
    );
    assert.deepEqual(parseChallenges("Basic realm=registry"), [
      { scheme: "basic", params: { realm: "registry" } },
    ]);
  });

  it("parses several challenges in one header and across headers", () => {
    const got = parseChallenges(['Basic realm="a, b", Bearer realm="https://t/x",service=s', "Negotiate"]);
    assert.deepEqual(
      got.map((c) => c.scheme),
      ["basic", "bearer", "negotiate"],
    );
    assert.equal(got[0]!.params.realm, "a, b");
    assert.equal(got[1]!.params.service, "s");
  });

  it("handles escapes and nothing", () => {
    assert.equal(parseChallenges('Bearer realm="a\\"b"')[0]!.params.realm, 'a"b');
    assert.deepEqual(parseChallenges(undefined), []);
    assert.deepEqual(parseChallenges(""), []);
  });
});

describe("Bearer token auth", () => {
  const reg = new FakeRegistry();
  let registry: Served;
  let tokens: TokenServer;
  const image = makeImage({});
  let ref: { registry: string; repository: string };

  before(async () => {
    tokens = await tokenServer({ users: { alice: "secret" }, refreshTokens: { "refresh-1": "alice" } });
    registry = await serve(reg.handler);
    reg.auth = { kind: "bearer", realm: `${tokens.url}/token`, service: "fake-registry", tokens };
    reg.putImage("public/app", image, "v1");
    reg.putImage("private/app", image, "v1");
    reg.privateRepos.add("private/app");
    ref = { registry: registry.host, repository: "public/app" };
  });
  after(async () => {
    await registry.close();
    await tokens.close();
  });

  it("gets an anonymous token once and reuses it", async () => {
    const client = new RegistryClient(FAST);
    const hits = tokens.hits.length;
    try {
      await client.getManifest(ref, "v1");
      await client.getManifest(ref, image.manifestDigest);
      await client.getBlob(
        ref,
        { mediaType: "x", digest: image.configDigest, size: image.config.length },
        1 << 20,
      );
      const mine = tokens.hits.slice(hits);
      assert.equal(mine.length, 1);
      const q = new URL(mine[0]!.path, "http://x").searchParams;
      assert.equal(q.get("service"), "fake-registry");
      assert.equal(q.get("scope"), "repository:public/app:pull");
      assert.equal(mine[0]!.headers.authorization, undefined);
    } finally {
      await client.close();
    }
  });

  it("sends Basic credentials to the token endpoint", async () => {
    const client = new RegistryClient({
      ...FAST,
      credentials: creds({ username: "alice", password: "secret" }),
    });
    const hits = tokens.hits.length;
    try {
      const m = await client.getManifest({ registry: registry.host, repository: "private/app" }, "v1");
      assert.equal(m.digest, image.manifestDigest);
      const mine = tokens.hits.slice(hits);
      assert.equal(mine.length, 1);
      assert.equal(mine[0]!.headers.authorization, `Basic ${Buffer.from("alice:secret").toString("base64")}`);
      assert.equal(new URL(mine[0]!.path, "http://x").searchParams.get("account"), "alice");
    } finally {
      await client.close();
    }
  });

  it("says authentication is needed when an anonymous token is not enough", async () => {
    const client = new RegistryClient(FAST);
    try {
      await assert.rejects(
        client.getManifest({ registry: registry.host, repository: "private/app" }, "v1"),
        (err) => {
          assert.ok(isKilnError(err, "UNAUTHORIZED"), String(err));
          assert.match(err.message, new RegExp(`^${registry.host.replace(/\./g, "\\.")}: `));
          assert.match(err.message, /no credentials|none found/);
          return true;
        },
      );
    } finally {
      await client.close();
    }
  });

  it("reports wrong credentials (401 from the token server) as UNAUTHORIZED naming the registry", async () => {
    const client = new RegistryClient({
      ...FAST,
      credentials: creds({ username: "alice", password: "wrong" }),
    });
    try {
      await assert.rejects(client.getManifest(ref, "v1"), (err) => {
        assert.ok(isKilnError(err, "UNAUTHORIZED"), String(err));
        assert.match(err.message, new RegExp(`^${registry.host.replace(/\./g, "\\.")}: invalid credentials`));
        assert.doesNotMatch(err.message, /\n/);
        return true;
      });
    } finally {
      await client.close();
    }
  });

  it("fetches a new token when the cached one expires", async () => {
    let now = 1_000_000;
    const client = new RegistryClient({ ...FAST, now: () => now });
    const hits = tokens.hits.length;
    try {
      await client.getManifest(ref, "v1");
      now += 60_000; // tokens live 300 s here
      await client.getManifest(ref, "v1");
      assert.equal(tokens.hits.length - hits, 1);
      now += 300_000;
      await client.getManifest(ref, "v1");
      assert.equal(tokens.hits.length - hits, 2);
    } finally {
      await client.close();
    }
  });

  it("gets a fresh token when the registry stops accepting the cached one", async () => {
    const client = new RegistryClient(FAST);
    const hits = tokens.hits.length;
    try {
      await client.getManifest(ref, "v1");
      tokens.issued.clear();
      await client.getManifest(ref, "v1");
      assert.equal(tokens.hits.length - hits, 2);
    } finally {
      await client.close();
    }
  });

  it("exchanges an identity token with the OAuth2 POST form", async () => {
    const client = new RegistryClient({ ...FAST, credentials: creds({ identityToken: "refresh-1" }) });
    const hits = tokens.hits.length;
    try {
      await client.getManifest({ registry: registry.host, repository: "private/app" }, "v1");
      const mine = tokens.hits.slice(hits);
      assert.equal(mine.length, 1);
      assert.equal(mine[0]!.method, "POST");
    } finally {
      await client.close();
    }
  });

  it("reports a refused identity token as UNAUTHORIZED", async () => {
    const client = new RegistryClient({ ...FAST, credentials: creds({ identityToken: "stale" }) });
    try {
      await assert.rejects(client.getManifest(ref, "v1"), (err) => isKilnError(err, "UNAUTHORIZED"));
    } finally {
      await client.close();
    }
  });

  it("maps a 403 from the token server to DENIED", async () => {
    const denying = await serve((_req, res) => {
      res.statusCode = 403;
      res.setHeader("content-type", "application/json");
      res.end(JSON.stringify({ details: "access to the requested resource is not authorized" }));
    });
    const reg2 = new FakeRegistry();
    reg2.auth = { kind: "bearer", realm: `${denying.url}/token`, service: "s", tokens };
    const server2 = await serve(reg2.handler);
    const client = new RegistryClient(FAST);
    try {
      await assert.rejects(client.getManifest({ registry: server2.host, repository: "x" }, "v1"), (err) => {
        assert.ok(isKilnError(err, "DENIED"), String(err));
        assert.match(err.message, /not authorized/);
        return true;
      });
    } finally {
      await client.close();
      await server2.close();
      await denying.close();
    }
  });
});

describe("identity token without OAuth2 support", () => {
  it("falls back to GET with the token as Basic password", async () => {
    const tokens = await tokenServer({
      refreshTokens: { "refresh-2": "bob" },
      oauth: false,
      anonymous: false,
    });
    const reg = new FakeRegistry();
    reg.auth = { kind: "bearer", realm: `${tokens.url}/token`, service: "s", tokens };
    const image = makeImage({});
    reg.putImage("app", image, "v1");
    const server = await serve(reg.handler);
    const client = new RegistryClient({ ...FAST, credentials: creds({ identityToken: "refresh-2" }) });
    try {
      await client.getManifest({ registry: server.host, repository: "app" }, "v1");
      assert.deepEqual(
        tokens.hits.map((h) => h.method),
        ["POST", "GET"],
      );
      assert.equal(
        tokens.hits[1]!.headers.authorization,
        `Basic ${Buffer.from("<token>:refresh-2").toString("base64")}`,
      );
    } finally {
      await client.close();
      await server.close();
      await tokens.close();
    }
  });
});

describe("Basic auth", () => {
  const reg = new FakeRegistry();
  let server: Served;
  const image = makeImage({});

  before(async () => {
    server = await serve(reg.handler);
    reg.auth = { kind: "basic", user: "bob", pass: "hunter2" };
    reg.putImage("app", image, "v1");
  });
  after(() => server.close());

  it("answers a Basic challenge with the credentials", async () => {
    const client = new RegistryClient({
      ...FAST,
      credentials: creds({ username: "bob", password: "hunter2" }),
    });
    try {
      const m = await client.getManifest({ registry: server.host, repository: "app" }, "v1");
      assert.equal(m.digest, image.manifestDigest);
      const sent = server.requests.at(-1)!.headers.authorization;
      assert.equal(sent, `Basic ${Buffer.from("bob:hunter2").toString("base64")}`);
    } finally {
      await client.close();
    }
  });

  it("reports wrong credentials as UNAUTHORIZED naming the registry", async () => {
    const client = new RegistryClient({ ...FAST, credentials: creds({ username: "bob", password: "nope" }) });
    try {
      await assert.rejects(client.getManifest({ registry: server.host, repository: "app" }, "v1"), (err) => {
        assert.ok(isKilnError(err, "UNAUTHORIZED"), String(err));
        assert.equal(err.message.split("\n").length, 1);
        assert.match(
          err.message,
          new RegExp(`^${server.host.replace(/\./g, "\\.")}: invalid username or password`),
        );
        return true;
      });
    } finally {
      await client.close();
    }
  });

  it("reports missing credentials as UNAUTHORIZED", async () => {
    const client = new RegistryClient(FAST);
    try {
      await assert.rejects(client.getManifest({ registry: server.host, repository: "app" }, "v1"), (err) =>
        isKilnError(err, "UNAUTHORIZED"),
      );
    } finally {
      await client.close();
    }
  });

  it("maps a 403 from the registry to DENIED", async () => {
    reg.faults = {
      before: (req, res) => {
        if (!req.url?.includes("/manifests/")) return false;
        res.statusCode = 403;
        res.setHeader("content-type", "application/json");
        res.end(
          JSON.stringify({
            errors: [{ code: "DENIED", message: "requested access to the resource is denied" }],
          }),
        );
        return true;
      },
    };
    const client = new RegistryClient({
      ...FAST,
      credentials: creds({ username: "bob", password: "hunter2" }),
    });
    try {
      await assert.rejects(client.getManifest({ registry: server.host, repository: "app" }, "v1"), (err) => {
        assert.ok(isKilnError(err, "DENIED"), String(err));
        assert.match(err.message, /requested access to the resource is denied/);
        return true;
      });
    } finally {
      reg.faults = {};
      await client.close();
    }
  });
});
