import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import Database from "better-sqlite3";
import { isKilnError, KilnError } from "../../src/errors.js";
import { Catalog, type NewImage } from "../../src/store/catalog.js";

const sha = (s: string) => `sha256:${createHash("sha256").update(s).digest("hex")}`;
const OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json";
const OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip";

function image(ref: string | null, platform: string, seed: string, extra: Partial<NewImage> = {}): NewImage {
  const [repository, tag] = ref === null ? [null, null] : splitRef(ref);
  return {
    ref,
    repository,
    tag,
    indexDigest: null,
    manifestDigest: sha(`manifest ${seed}`),
    manifestMediaType: OCI_MANIFEST,
    configDigest: sha(`config ${seed}`),
    platform,
    config: JSON.stringify({ architecture: platform.split("/")[1], os: "linux", seed }),
    size: 1234,
    created: "2024-06-01T00:00:00Z",
    layers: [
      { digest: sha("base layer"), diffId: sha("base diff"), mediaType: OCI_LAYER, size: 1000 },
      { digest: sha(`layer ${seed}`), diffId: sha(`diff ${seed}`), mediaType: OCI_LAYER, size: 200 },
    ],
    ...extra,
  };
}

function splitRef(ref: string): [string, string | null] {
  const at = ref.indexOf("@");
  if (at >= 0) return [ref.slice(0, at), null];
  const colon = ref.lastIndexOf(":");
  return [ref.slice(0, colon), ref.slice(colon + 1)];
}

const ALPINE = "docker.io/library/alpine:3.20";

describe("Catalog", () => {
  let dir: string;
  let file: string;
  let catalog: Catalog;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "kiln-catalog-"));
    file = join(dir, "catalog.db");
    catalog = Catalog.open(file);
  });
  after(async () => {
    catalog.close();
    await rm(dir, { recursive: true, force: true });
  });

  it("uses WAL, a long busy timeout and a versioned schema", () => {
    const db = new Database(file, { readonly: true });
    try {
      assert.equal(db.pragma("journal_mode", { simple: true }), "wal");
      assert.equal(db.pragma("user_version", { simple: true }), 3);
      const tables = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .pluck()
        .all();
      assert.deepEqual(tables, ["artifacts", "builds", "image_layers", "images", "layers", "leases"]);
    } finally {
      db.close();
    }
    // Reopening an up-to-date catalog runs no migration and keeps the data.
    Catalog.open(file).close();
  });

  it("refuses a catalog from a newer kiln", async () => {
    const newer = join(dir, "newer.db");
    const db = new Database(newer);
    db.pragma("user_version = 99");
    db.close();
    assert.throws(
      () => Catalog.open(newer),
      (e) => isKilnError(e, "STORE") && /schema version 99/.test(e.message),
    );
  });

  it("puts, gets and lists images with their layers in order", () => {
    const amd = catalog.putImage(
      image(ALPINE, "linux/amd64", "amd", { addedAt: "2024-07-01T00:00:00.000Z" }),
    );
    assert.ok(amd.id > 0);
    assert.equal(amd.addedAt, "2024-07-01T00:00:00.000Z");
    assert.equal(amd.ref, ALPINE);
    assert.equal(amd.repository, "docker.io/library/alpine");
    assert.equal(amd.tag, "3.20");
    assert.deepEqual(
      amd.layers.map((l) => l.digest),
      [sha("base layer"), sha("layer amd")],
    );
    assert.deepEqual(catalog.get(amd.id), amd);
    assert.equal(catalog.get(amd.id + 1000), undefined);

    const arm = catalog.putImage(image(ALPINE, "linux/arm64/v8", "arm"));
    assert.ok(!Number.isNaN(Date.parse(arm.addedAt)));
    const busybox = catalog.putImage(image("docker.io/library/busybox:latest", "linux/amd64", "bb"));
    const untagged = catalog.putImage(image(null, "linux/amd64", "untagged"));
    assert.deepEqual(
      catalog.list().map((i) => [i.ref, i.platform, i.id]),
      [
        [ALPINE, "linux/amd64", amd.id],
        [ALPINE, "linux/arm64/v8", arm.id],
        ["docker.io/library/busybox:latest", "linux/amd64", busybox.id],
        [null, "linux/amd64", untagged.id],
      ],
    );
    assert.deepEqual(
      catalog.list().find((i) => i.id === arm.id),
      arm,
    );
  });

  it("replaces the row when a tag moves, keeps the id when the same image is put again", () => {
    const before = catalog.list().find((i) => i.ref === "docker.io/library/busybox:latest")!;
    const again = catalog.putImage(image("docker.io/library/busybox:latest", "linux/amd64", "bb"));
    assert.equal(again.id, before.id);

    const moved = catalog.putImage(image("docker.io/library/busybox:latest", "linux/amd64", "bb2"));
    assert.notEqual(moved.id, before.id);
    assert.equal(catalog.get(before.id), undefined);
    const rows = catalog.list().filter((i) => i.ref === "docker.io/library/busybox:latest");
    assert.deepEqual(
      rows.map((r) => r.manifestDigest),
      [sha("manifest bb2")],
    );
    // The old image's own layer is no longer referenced; the shared base still is.
    const refs = catalog.referencedBlobs();
    assert.ok(!refs.has(sha("layer bb")));
    assert.ok(refs.has(sha("layer bb2")) && refs.has(sha("base layer")));

    // Untagged imports dedupe on (manifest digest, platform).
    const n = catalog.list().length;
    catalog.putImage(image(null, "linux/amd64", "untagged"));
    assert.equal(catalog.list().length, n);
  });

  it("keeps each manifest's own layer media type", () => {
    const docker = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    const img = image("localhost:5000/conv:1", "linux/amd64", "conv");
    const put = catalog.putImage({ ...img, layers: img.layers.map((l) => ({ ...l, mediaType: docker })) });
    assert.deepEqual(
      put.layers.map((l) => l.mediaType),
      [docker, docker],
    );
    const alpine = catalog.list().find((i) => i.ref === ALPINE)!;
    assert.equal(alpine.layers[0]!.mediaType, OCI_LAYER);
    catalog.remove(put.id);
  });

  it("referencedBlobs names index, manifest, config and layer digests", () => {
    const indexDigest = sha("index multi");
    const put = catalog.putImage(image("ghcr.io/o/multi:1", "linux/amd64", "multi", { indexDigest }));
    const refs = catalog.referencedBlobs();
    for (const d of [indexDigest, put.manifestDigest, put.configDigest, ...put.layers.map((l) => l.digest)]) {
      assert.ok(refs.has(d), d);
    }
    catalog.remove(put.id);
    catalog.remove(put.id); // absent is fine
    const after = catalog.referencedBlobs();
    assert.ok(!after.has(indexDigest) && !after.has(put.manifestDigest) && !after.has(sha("layer multi")));
    assert.ok(after.has(sha("base layer")));
  });

  describe("resolve", () => {
    const host = "linux/amd64";
    let byDigest: number;
    let single: number;
    before(() => {
      single = catalog.putImage(image("docker.io/library/debian:12", "linux/amd64", "debian")).id;
      byDigest = catalog.putImage(
        image(`docker.io/library/nginx@${sha("index nginx")}`, "linux/arm64/v8", "nginx", {
          indexDigest: sha("index nginx"),
        }),
      ).id;
    });

    it("finds by short name, full ref and stored ref string", () => {
      assert.equal(catalog.resolve("debian:12").id, single);
      assert.equal(catalog.resolve("docker.io/library/debian:12").id, single);
      assert.equal(catalog.resolve("library/debian:12").id, single);
    });

    it("finds by repo@digest of the index or of the manifest", () => {
      assert.equal(catalog.resolve(`nginx@${sha("index nginx")}`).id, byDigest);
      assert.equal(catalog.resolve(`nginx@${sha("manifest nginx")}`).id, byDigest);
      assert.equal(catalog.resolve(`debian@${sha("manifest debian")}`).id, single);
      assert.throws(
        () => catalog.resolve(`busybox@${sha("manifest debian")}`),
        (e) => isKilnError(e, "NOT_FOUND"),
      );
    });

    it("finds by a unique manifest digest prefix, with or without sha256:", () => {
      const hex = sha("manifest debian").slice(7);
      assert.equal(catalog.resolve(hex.slice(0, 12)).id, single);
      assert.equal(catalog.resolve(`sha256:${hex.slice(0, 12)}`).id, single);
      assert.equal(catalog.resolve(`sha256:${hex}`).id, single);
      assert.equal(catalog.resolve(hex).id, single);
    });

    it("an ambiguous prefix → AMBIGUOUS_REF listing the candidates", () => {
      // Find a one-character prefix shared by two stored manifests.
      const digests = catalog.list().map((i) => i.manifestDigest.slice(7));
      const counts = new Map<string, number>();
      for (const d of digests) counts.set(d[0]!, (counts.get(d[0]!) ?? 0) + 1);
      let shared = [...counts].find(([, n]) => n > 1)?.[0];
      if (shared === undefined) {
        // Make one: an extra image whose manifest digest starts like an existing one.
        let i = 0;
        while (sha(`manifest extra${i}`)[7] !== digests[0]![0]) i++;
        catalog.putImage(image("localhost/extra:1", host, `extra${i}`));
        shared = digests[0]![0]!;
      }
      assert.throws(
        () => catalog.resolve(shared),
        (e) => {
          assert.ok(isKilnError(e, "AMBIGUOUS_REF"));
          assert.ok(!e.message.includes("\n"));
          const candidates = e.details?.candidates as {
            manifestDigest: string;
            ref: string | null;
            platform: string;
          }[];
          assert.ok(candidates.length >= 2);
          for (const c of candidates) {
            assert.ok(c.manifestDigest.startsWith(`sha256:${shared}`));
            assert.ok(e.message.includes(`${c.platform}, ${c.manifestDigest.slice(0, 19)}`), e.message);
          }
          return true;
        },
      );
    });

    it("nothing → NOT_FOUND", () => {
      assert.throws(
        () => catalog.resolve("foo"),
        (e) => isKilnError(e, "NOT_FOUND") && e.message === 'no image matches "foo" in the store',
      );
      assert.throws(
        () => catalog.resolve("deadbeef"),
        (e) => isKilnError(e, "NOT_FOUND"),
      );
    });

    it("a bad reference → INVALID_REFERENCE", () => {
      for (const bad of ["Alpine:3.20", "alpine:bad tag", "a//b", "alpine@sha256:zz"]) {
        assert.throws(
          () => catalog.resolve(bad),
          (e) => e instanceof KilnError && e.code === "INVALID_REFERENCE",
          bad,
        );
      }
    });

    it("several platforms of one ref: by platform, else the host's", () => {
      const amd = catalog.list().find((i) => i.ref === ALPINE && i.platform === "linux/amd64")!;
      const arm = catalog.list().find((i) => i.ref === ALPINE && i.platform === "linux/arm64/v8")!;
      assert.equal(catalog.resolve("alpine:3.20", { platform: "linux/arm64/v8" }).id, arm.id);
      assert.equal(catalog.resolve("alpine:3.20", { platform: "linux/arm64" }).id, arm.id);
      assert.equal(catalog.resolve("alpine:3.20", { platform: "linux/amd64" }).id, amd.id);
      assert.equal(catalog.resolve("alpine:3.20", { hostPlatform: "linux/arm64/v8" }).id, arm.id);
      assert.equal(catalog.resolve("alpine:3.20", { hostPlatform: host }).id, amd.id);
      assert.throws(
        () => catalog.resolve("alpine:3.20", { hostPlatform: "linux/s390x" }),
        (e) =>
          isKilnError(e, "AMBIGUOUS_REF") &&
          e.message.includes("linux/amd64") &&
          e.message.includes("linux/arm64/v8"),
      );
      assert.throws(
        () => catalog.resolve("alpine:3.20"),
        (e) => isKilnError(e, "AMBIGUOUS_REF"),
      );
      assert.throws(
        () => catalog.resolve("alpine:3.20", { platform: "linux/riscv64" }),
        (e) => isKilnError(e, "NOT_FOUND") && e.message.includes("linux/amd64, linux/arm64/v8"),
      );
      // A single match on another platform is refused when a platform is asked for.
      assert.throws(
        () => catalog.resolve("debian:12", { platform: "linux/arm64" }),
        (e) => isKilnError(e, "NOT_FOUND"),
      );
    });

    it("different refs of one image are ambiguous even on the host platform", () => {
      const other = catalog.putImage(image("docker.io/library/debian:bookworm", "linux/amd64", "debian"));
      assert.throws(
        () => catalog.resolve(sha("manifest debian").slice(7, 20), { hostPlatform: host }),
        (e) => isKilnError(e, "AMBIGUOUS_REF"),
      );
      catalog.remove(other.id);
    });
  });
});

describe("Catalog artifacts", () => {
  it("records, finds by key and by manifest, and removes exported artifacts", async () => {
    const dir = await mkdtemp(join(tmpdir(), "kiln-artifacts-"));
    const catalog = Catalog.open(join(dir, "catalog.db"));
    try {
      const a = catalog.putArtifact({
        key: "k1",
        manifestDigest: "sha256:m",
        format: "ext4",
        options: '{"format":"ext4"}',
        path: "artifacts/k1.ext4",
        size: 42,
        createdAt: "2026-01-01T00:00:00.000Z",
      });
      assert.deepEqual(catalog.getArtifact("k1"), a);
      assert.deepEqual(catalog.artifactsOf("sha256:m"), [a]);
      catalog.removeArtifact("k1");
      assert.equal(catalog.getArtifact("k1"), undefined);
      assert.deepEqual(catalog.artifactsOf("sha256:m"), []);
    } finally {
      catalog.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
