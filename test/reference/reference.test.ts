import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { isKilnError } from "../../src/errors.js";
import { parseDigest } from "../../src/reference/digest.js";
import {
  familiarName,
  formatReference,
  parseReference,
  refIdentifier,
} from "../../src/reference/reference.js";
import {
  formatPlatform,
  hostPlatform,
  normalizePlatform,
  parsePlatform,
  platformMatches,
} from "../../src/registry/platform.js";

const HEX = "a".repeat(64);
const HEX2 = "0123456789abcdef".repeat(4);

describe("parseReference", () => {
  const cases: [string, string][] = [
    ["alpine", "docker.io/library/alpine:latest"],
    ["alpine:3.20", "docker.io/library/alpine:3.20"],
    ["user/app", "docker.io/user/app:latest"],
    ["docker.io/alpine", "docker.io/library/alpine:latest"],
    ["index.docker.io/library/alpine:1", "docker.io/library/alpine:1"],
    ["ghcr.io/o/r:tag", "ghcr.io/o/r:tag"],
    ["localhost:5000/x", "localhost:5000/x:latest"],
    ["localhost/x", "localhost/x:latest"],
    ["127.0.0.1:5055/a/b:t", "127.0.0.1:5055/a/b:t"],
    ["[::1]:5000/a:t", "[::1]:5000/a:t"],
    [`alpine@sha256:${HEX}`, `docker.io/library/alpine@sha256:${HEX}`],
    [`alpine:3.20@sha256:${HEX}`, `docker.io/library/alpine:3.20@sha256:${HEX}`],
    ["a/b-c/d__e/f.g:v1.2_3-x", "docker.io/a/b-c/d__e/f.g:v1.2_3-x"],
    ["Registry.Example.com/app", "Registry.Example.com/app:latest"],
    ["docker://alpine:3.20", "docker.io/library/alpine:3.20"],
    ["docker://127.0.0.1:5055/a/b:t", "127.0.0.1:5055/a/b:t"],
  ];
  for (const [input, want] of cases) {
    it(`${input} → ${want}`, () => assert.equal(formatReference(parseReference(input)), want));
  }

  it("splits the parts", () => {
    const r = parseReference("127.0.0.1:5055/a/b:t");
    assert.deepEqual([r.registry, r.repository, r.tag, r.digest], ["127.0.0.1:5055", "a/b", "t", undefined]);
    const d = parseReference(`ghcr.io/o/r@sha256:${HEX2}`);
    assert.equal(d.tag, undefined);
    assert.equal(d.digest?.hex, HEX2);
  });

  it("lets the digest win over the tag when resolving", () => {
    const r = parseReference(`alpine:3.20@sha256:${HEX}`);
    assert.equal(r.tag, "3.20");
    assert.equal(refIdentifier(r), `sha256:${HEX}`);
    assert.equal(refIdentifier(parseReference("alpine:3.20")), "3.20");
  });

  it("gives the familiar short name", () => {
    assert.equal(familiarName(parseReference("alpine")), "alpine:latest");
    assert.equal(familiarName(parseReference("user/app:1")), "user/app:1");
    assert.equal(familiarName(parseReference("ghcr.io/o/r:1")), "ghcr.io/o/r:1");
  });

  const bad = [
    "",
    "   ",
    "Alpine",
    "user/App",
    "alpine:",
    "alpine@sha256:abc",
    `alpine@sha256:${"A".repeat(64)}`,
    `alpine@md5:${HEX}`,
    "alpine@",
    "/alpine",
    "alpine/",
    "a//b",
    "-alpine",
    "alpine:-tag",
    "al pine",
    `a:${"x".repeat(129)}`,
    `${"a".repeat(256)}`,
    "ghcr.io/o/r:t:u",
    "host:port/x",
    "docker://",
    "docker://docker://alpine",
    "oci://alpine",
  ];
  for (const input of bad) {
    it(`rejects ${JSON.stringify(input.length > 40 ? `${input.slice(0, 40)}…` : input)}`, () => {
      assert.throws(
        () => parseReference(input),
        (err) => isKilnError(err, "INVALID_REFERENCE") && err.message.includes("invalid reference"),
      );
    });
  }
});

describe("parseReference with a URL scheme", () => {
  for (const scheme of ["https", "http", "HTTPS"]) {
    it(`refuses ${scheme}:// with a hint naming the reference without it`, () => {
      assert.throws(
        () => parseReference(`${scheme}://127.0.0.1:5000/app:1`),
        (err) =>
          isKilnError(err, "INVALID_REFERENCE") &&
          err.message ===
            `invalid reference "${scheme}://127.0.0.1:5000/app:1": a registry reference has no scheme: use 127.0.0.1:5000/app:1`,
      );
    });
  }
});

describe("parseDigest", () => {
  it("parses sha256 and sha512", () => {
    assert.deepEqual(parseDigest(`sha256:${HEX}`), { algorithm: "sha256", hex: HEX, value: `sha256:${HEX}` });
    assert.equal(parseDigest(`sha512:${"b".repeat(128)}`).algorithm, "sha512");
  });
  for (const d of ["sha256", `sha256:${HEX}0`, `sha256:${"g".repeat(64)}`, `:${HEX}`, `SHA256:${HEX}`]) {
    it(`rejects ${d.slice(0, 20)}`, () =>
      assert.throws(
        () => parseDigest(d),
        (e) => isKilnError(e, "INVALID_REFERENCE"),
      ));
  }
});

describe("platforms", () => {
  it("normalizes architecture names and the arm64 variant", () => {
    assert.deepEqual(parsePlatform("linux/x86_64"), { os: "linux", architecture: "amd64" });
    assert.deepEqual(parsePlatform("linux/aarch64"), { os: "linux", architecture: "arm64", variant: "v8" });
    assert.deepEqual(parsePlatform("linux/arm64"), { os: "linux", architecture: "arm64", variant: "v8" });
    assert.deepEqual(parsePlatform("linux/arm/v6"), { os: "linux", architecture: "arm", variant: "v6" });
    assert.equal(formatPlatform(parsePlatform("arm64")), "linux/arm64/v8");
    // One word is an OS (with the host's architecture) or an architecture, as containerd reads it.
    assert.equal(parsePlatform("linux").architecture, hostPlatform().architecture);
    assert.equal(parsePlatform("linux").os, "linux");
    assert.throws(
      () => parsePlatform("plan9x"),
      (e) => isKilnError(e, "INVALID_PLATFORM"),
    );
    assert.deepEqual(normalizePlatform({ os: "Linux", architecture: "AMD64" }), {
      os: "linux",
      architecture: "amd64",
    });
  });
  it("matches variants as containerd does", () => {
    assert.ok(platformMatches(parsePlatform("linux/arm64"), { os: "linux", architecture: "arm64" }));
    assert.ok(
      !platformMatches(parsePlatform("linux/arm/v7"), { os: "linux", architecture: "arm", variant: "v6" }),
    );
    assert.ok(!platformMatches(parsePlatform("linux/amd64"), { os: "linux", architecture: "arm64" }));
  });
  for (const p of ["", "linux/", "a/b/c/d", "linux amd64"]) {
    it(`rejects platform ${JSON.stringify(p)}`, () =>
      assert.throws(
        () => parsePlatform(p),
        (e) => isKilnError(e, "INVALID_PLATFORM"),
      ));
  }
});
