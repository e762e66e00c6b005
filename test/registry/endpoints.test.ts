import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { allowsPlainHttp, endpointCandidates, isListedInsecure } from "../../src/registry/endpoints.js";
import { parseRetryAfter, Transport } from "../../src/registry/transport.js";

describe("endpoints", () => {
  it("allows plain HTTP to loopback names and listed hosts only", () => {
    for (const r of ["localhost", "localhost:5000", "127.0.0.1:5000", "[::1]:5000"]) {
      assert.ok(allowsPlainHttp(r, []), r);
    }
    for (const r of ["127.0.0.2:5000", "registry.example:5000", "ghcr.io", "localhost.example"]) {
      assert.ok(!allowsPlainHttp(r, []), r);
    }
    assert.ok(allowsPlainHttp("registry.example:5000", ["registry.example:5000"]));
    assert.ok(allowsPlainHttp("registry.example:5000", ["http://registry.example/"]));
    assert.ok(!allowsPlainHttp("registry.example:5000", ["registry.example:5001"]));
    assert.ok(isListedInsecure("Registry.Example", ["registry.example"]));
  });

  it("tries HTTPS first, then HTTP where allowed", () => {
    assert.deepEqual(endpointCandidates("127.0.0.1:5000", { insecureRegistries: [], registryMirrors: [] }), [
      {
        registry: "127.0.0.1:5000",
        bases: ["https://127.0.0.1:5000", "http://127.0.0.1:5000"],
        insecure: false,
        mirror: false,
      },
    ]);
    assert.deepEqual(
      endpointCandidates("ghcr.io", { insecureRegistries: [], registryMirrors: [] })[0]!.bases,
      ["https://ghcr.io"],
    );
  });

  it("sends docker.io to its mirrors first, then registry-1.docker.io", () => {
    const got = endpointCandidates("docker.io", {
      insecureRegistries: ["mirror.local:5000"],
      registryMirrors: ["https://mirror.example/", "http://mirror.local:5000", "plain.example"],
    });
    assert.deepEqual(
      got.map((c) => [c.bases[0], c.registry, c.insecure, c.mirror]),
      [
        ["https://mirror.example", "mirror.example", false, true],
        ["http://mirror.local:5000", "mirror.local:5000", true, true],
        ["https://plain.example", "plain.example", false, true],
        ["https://registry-1.docker.io", "docker.io", false, false],
      ],
    );
    assert.deepEqual(
      endpointCandidates("quay.io", { insecureRegistries: [], registryMirrors: ["https://mirror.example"] })
        .length,
      1,
      "mirrors are for docker.io only",
    );
  });
});

describe("retry timing", () => {
  it("parses Retry-After seconds and HTTP dates", () => {
    const now = Date.parse("2024-01-01T00:00:00Z");
    assert.equal(parseRetryAfter("3", now), 3000);
    assert.equal(parseRetryAfter("Mon, 01 Jan 2024 00:00:10 GMT", now), 10_000);
    assert.equal(parseRetryAfter("Sun, 31 Dec 2023 00:00:00 GMT", now), 0);
    assert.equal(parseRetryAfter("soon", now), undefined);
    assert.equal(parseRetryAfter(undefined, now), undefined);
  });

  it("backs off exponentially with jitter, capped", () => {
    const t = new Transport({ retries: { baseDelayMs: 100, maxDelayMs: 1000 } });
    for (let i = 0; i < 20; i++) {
      const first = t.backoff(1);
      assert.ok(first >= 50 && first <= 100, String(first));
      const third = t.backoff(3);
      assert.ok(third >= 200 && third <= 400, String(third));
      assert.ok(t.backoff(30) <= 1000);
    }
  });
});
