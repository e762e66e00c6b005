/**
 * collectGarbage on a real store (blobs on disk, the SQLite catalog): what is swept and what is kept.
 * Ages are set with utimes, never by waiting.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, readdir, readFile, stat, utimes, writeFile } from "node:fs/promises";
import { join, relative } from "node:path";
import { afterEach, beforeEach, describe, it } from "node:test";
import type { NewImage } from "../../src/store/catalog.js";
import { collectGarbage, deleteUnpinnedBlob } from "../../src/store/gc.js";
import { addLease, releaseLease } from "../../src/store/leases.js";
import { openStore, removeImages, type Store } from "../../src/store/store.js";
import { makeTempDir, removeDir } from "../helpers/exec.js";

const HOUR = 3_600_000;
const sha = (s: string) => `sha256:${createHash("sha256").update(s).digest("hex")}`;

/** A pid no process has: a child that has exited (pids are not reused this fast). */
const DEAD_PID = spawnSync("true").pid!;

let dir: string;
let store: Store;

beforeEach(async () => {
  dir = await makeTempDir("gc");
  store = await openStore(join(dir, "store"));
});
afterEach(async () => {
  store.close();
  await removeDir(dir);
});

/** Sets the mtime (and atime) of `path` to `ms` before now. */
async function age(path: string, ms: number): Promise<void> {
  const t = new Date(Date.now() - ms);
  await utimes(path, t, t);
}

async function addBlob(content: string, ageMs = 2 * HOUR): Promise<string> {
  const staging = await store.blobs.stage();
  const digest = await staging.writeBytes(Buffer.from(content));
  await staging.commit();
  await age(store.blobs.path(digest), ageMs);
  return digest;
}

/** Commits an image's blobs (old) and records it. */
async function addImage(ref: string, parts: { index?: string; manifest: string; layers: string[] }) {
  const indexDigest = parts.index === undefined ? null : await addBlob(parts.index);
  const manifestDigest = await addBlob(parts.manifest);
  const config = `config of ${ref}`;
  const configDigest = await addBlob(config);
  const layers = [];
  for (const l of parts.layers) {
    layers.push({
      digest: await addBlob(l),
      diffId: null,
      mediaType: "application/vnd.oci.image.layer.v1.tar",
      size: l.length,
    });
  }
  const input: NewImage = {
    ref,
    repository: ref.slice(0, ref.lastIndexOf(":")),
    tag: ref.slice(ref.lastIndexOf(":") + 1),
    indexDigest,
    manifestDigest,
    manifestMediaType: "application/vnd.oci.image.manifest.v1+json",
    configDigest,
    platform: "linux/amd64",
    config,
    size: 0,
    created: null,
    layers,
  };
  return store.catalog.putImage(input);
}

async function blobFiles(): Promise<string[]> {
  return (await readdir(store.blobs.dir)).map((n) => `sha256:${n}`).sort();
}

/** Every path under the store root except the catalog (which GC writes to), sorted. */
async function tree(): Promise<string[]> {
  const out: string[] = [];
  const walk = async (d: string) => {
    for (const e of await readdir(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (/^catalog\.db/.test(e.name)) continue;
      out.push(relative(store.root, p));
      if (e.isDirectory()) await walk(p);
    }
  };
  await walk(store.root);
  return out.sort();
}

/** An artifact file (or erofs-layers directory) under artifacts/, `ageMs` old, with an optional row. */
async function addArtifact(
  key: string,
  manifestDigest: string | null,
  opts: { dir?: boolean; ageMs?: number } = {},
): Promise<string> {
  const ext = opts.dir ? "erofs-layers" : "ext4";
  const path = `artifacts/${key}.${ext}`;
  const abs = join(store.root, path);
  await mkdir(join(store.root, "artifacts"), { recursive: true });
  if (opts.dir) {
    await mkdir(abs);
    await writeFile(join(abs, "layer-0.erofs"), "e".repeat(100));
    await writeFile(join(abs, "layers.json"), "{}");
    await age(join(abs, "layer-0.erofs"), opts.ageMs ?? 2 * HOUR);
    await age(join(abs, "layers.json"), opts.ageMs ?? 2 * HOUR);
  } else await writeFile(abs, "x".repeat(1000));
  await age(abs, opts.ageMs ?? 2 * HOUR);
  if (manifestDigest !== null) {
    store.catalog.putArtifact({
      key,
      manifestDigest,
      format: ext,
      options: "{}",
      path,
      size: opts.dir ? 102 : 1000,
      createdAt: new Date(Date.now() - (opts.ageMs ?? 2 * HOUR)).toISOString(),
    });
  }
  return path;
}

function addBuild(name: string, status: string, artifactKey: string): void {
  const now = new Date().toISOString();
  store.catalog.db
    .prepare(
      `INSERT INTO builds (name, format, options, platform, status, seq, artifact_key, created_at, updated_at)
       VALUES (?, 'ext4', '{}', 'linux/amd64', ?, 1, ?, ?, ?)`,
    )
    .run(name, status, artifactKey, now, now);
}

describe("collectGarbage: blobs", () => {
  it("sweeps old unreferenced blobs; keeps young ones and every blob an image references", async () => {
    const image = await addImage("localhost/a:1", {
      index: "index a",
      manifest: "manifest a",
      layers: ["layer 1", "layer 2"],
    });
    const oldOrphan = await addBlob("orphan, old");
    const youngOrphan = await addBlob("orphan, young", 10 * 60_000);

    const report = await collectGarbage(store);
    assert.deepEqual(report.blobs, [{ digest: oldOrphan, size: "orphan, old".length }]);
    assert.equal(report.bytes, "orphan, old".length);
    assert.equal(report.dryRun, false);
    const referenced = [
      image.indexDigest!,
      image.manifestDigest,
      image.configDigest,
      ...image.layers.map((l) => l.digest),
    ];
    assert.deepEqual(await blobFiles(), [...referenced, youngOrphan].sort());
    // Nothing set aside is left in tmp/.
    assert.deepEqual(await readdir(store.tmpDir), []);

    // A shorter grace period takes the young one too, and still nothing referenced.
    const again = await collectGarbage(store, { graceMs: 5 * 60_000 });
    assert.deepEqual(
      again.blobs.map((b) => b.digest),
      [youngOrphan],
    );
    assert.deepEqual(await blobFiles(), referenced.sort());
  });

  it("a lease protects a blob until it expires or is released", async () => {
    const leased = await addBlob("leased");
    const shortLease = await addBlob("short lease");
    const released = await addBlob("released lease");
    addLease(store.catalog, "pull-test-1", [leased]);
    addLease(store.catalog, "pull-test-2", [shortLease], 1000);
    addLease(store.catalog, "pull-test-3", [released]);
    releaseLease(store.catalog, "pull-test-3");

    // Ten seconds from now: the 1 s lease has expired, the 1 h one has not.
    const report = await collectGarbage(store, { now: Date.now() + 10_000 });
    assert.deepEqual(report.blobs.map((b) => b.digest).sort(), [shortLease, released].sort());
    assert.deepEqual(await blobFiles(), [leased]);
  });

  it("kiln rm keeps a blob a pull in flight has pinned; GC frees it once the lease is gone", async () => {
    const a = await addImage("localhost/a:1", { manifest: "manifest a", layers: ["shared layer"] });
    const shared = sha("shared layer");
    // A pull of another image found `shared` present and pinned it.
    addLease(store.catalog, "pull-other", [shared]);
    await removeImages(store, [a]);
    assert.deepEqual(await blobFiles(), [shared]);
    assert.deepEqual((await collectGarbage(store, { graceMs: 0 })).blobs, []);
    // That pull failed: its lease ends, and the blob is garbage.
    releaseLease(store.catalog, "pull-other");
    const report = await collectGarbage(store, { graceMs: 0 });
    assert.deepEqual(report.blobs, [{ digest: shared, size: "shared layer".length }]);
    assert.deepEqual(await blobFiles(), []);
  });

  it("deleteUnpinnedBlob checks pins after the blob left blobs/ and puts a pinned one back intact", async () => {
    const digest = await addBlob("pinned later");
    const before = await stat(store.blobs.path(digest));
    addLease(store.catalog, "pull-x", [digest]);
    assert.equal(await deleteUnpinnedBlob(store, digest), "pinned");
    const after = await stat(store.blobs.path(digest));
    assert.equal(after.mtimeMs, before.mtimeMs, "the restored blob keeps its age");
    assert.equal(await readFile(store.blobs.path(digest), "utf8"), "pinned later");
    assert.deepEqual(await readdir(store.tmpDir), []);
    releaseLease(store.catalog, "pull-x");
    assert.equal(await deleteUnpinnedBlob(store, digest), "deleted");
    assert.equal(await deleteUnpinnedBlob(store, digest), "absent");
    assert.deepEqual(await blobFiles(), []);
    assert.deepEqual(await readdir(store.tmpDir), []);
  });
});

describe("collectGarbage: artifacts", () => {
  it("keeps artifacts of images and of builds; sweeps orphan rows with their files and stray old files", async () => {
    const image = await addImage("localhost/a:1", { manifest: "manifest a", layers: ["layer"] });
    const gone = sha("manifest of a removed image");
    const kept = await addArtifact("k-image", image.manifestDigest);
    const keptDir = await addArtifact("k-image-dir", image.manifestDigest, { dir: true });
    const orphan = await addArtifact("k-orphan", gone);
    const orphanDir = await addArtifact("k-orphan-dir", gone, { dir: true });
    const youngOrphan = await addArtifact("k-young-orphan", gone, { ageMs: 60_000 });
    const built = await addArtifact("k-built", gone);
    addBuild("app:1", "ready", "k-built");
    const failed = await addArtifact("k-failed", gone);
    addBuild("app:2", "failed", "k-failed");
    const stray = await addArtifact("k-stray", null);
    const youngStray = await addArtifact("k-young-stray", null, { ageMs: 60_000 });
    const lock = join(store.root, "artifacts", "k-build.lock");
    await writeFile(lock, "123\n");
    await age(lock, 5 * HOUR);

    const report = await collectGarbage(store);
    assert.deepEqual(report.blobs, []);
    assert.deepEqual(report.artifacts.map((a) => a.path).sort(), [orphan, orphanDir, failed, stray].sort());
    assert.equal(report.artifacts.find((a) => a.path === orphanDir)?.size, 102);
    assert.equal(report.bytes, 1000 + 102 + 1000 + 1000);
    for (const p of [orphan, orphanDir, failed, stray]) assert.ok(!existsSync(join(store.root, p)), p);
    for (const p of [kept, keptDir, youngOrphan, built, youngStray])
      assert.ok(existsSync(join(store.root, p)), p);
    assert.ok(existsSync(lock));
    for (const key of ["k-orphan", "k-orphan-dir", "k-failed"])
      assert.equal(store.catalog.getArtifact(key), undefined, key);
    for (const key of ["k-image", "k-image-dir", "k-young-orphan", "k-built"])
      assert.ok(store.catalog.getArtifact(key), key);
  });

  it("an artifact row whose manifest a pull in flight has pinned is kept", async () => {
    const manifest = sha("manifest being pulled again");
    const path = await addArtifact("k-repull", manifest);
    addLease(store.catalog, "pull-y", [manifest]);
    const report = await collectGarbage(store, { graceMs: 0 });
    assert.deepEqual(report.artifacts, []);
    assert.ok(existsSync(join(store.root, path)));
  });
});

describe("collectGarbage: tmp/", () => {
  it("sweeps stale temp entries; keeps live staging dirs, entries of running processes and lock files", async () => {
    const tmp = store.tmpDir;
    const make = async (name: string, files: Record<string, number>, dirAgeMs: number) => {
      const d = join(tmp, name);
      await mkdir(d);
      for (const [f, ageMs] of Object.entries(files)) {
        await writeFile(join(d, f), "b".repeat(50));
        await age(join(d, f), ageMs);
      }
      await age(d, dirAgeMs);
    };
    // A crashed pull's staging dir: everything in it old.
    await make(`stage-${DEAD_PID}-stale`, { "aa.0": 3 * HOUR, "bb.1": 2 * HOUR }, 3 * HOUR);
    // A long download: the dir is old, the file being written is fresh.
    await make(`stage-${DEAD_PID}-live`, { "cc.0": 3 * HOUR, "dd.1": 1000 }, 3 * HOUR);
    // This process is running: its staging dir stays however old.
    await make(`stage-${process.pid}-mine`, { "ee.0": 3 * HOUR }, 3 * HOUR);
    // A crashed export's temp file, and an import's temp dir (no pid in its name).
    const exportTmp = join(tmp, `export-${"ab".repeat(32)}-${DEAD_PID}-0a1b2c3d`);
    await writeFile(exportTmp, "c".repeat(70));
    await age(exportTmp, 2 * HOUR);
    await make("kiln-import-Xy12Ab", { "archive.tar": 2 * HOUR }, 2 * HOUR);
    const youngFile = join(tmp, "young-temp");
    await writeFile(youngFile, "y");
    const lock = join(tmp, "pull.lock");
    await writeFile(lock, "1\n");
    await age(lock, 9 * HOUR);

    const report = await collectGarbage(store);
    assert.deepEqual(
      report.temp.map((t) => t.path).sort(),
      [
        `tmp/export-${"ab".repeat(32)}-${DEAD_PID}-0a1b2c3d`,
        "tmp/kiln-import-Xy12Ab",
        `tmp/stage-${DEAD_PID}-stale`,
      ].sort(),
    );
    assert.equal(report.bytes, 100 + 70 + 50);
    assert.deepEqual(
      (await readdir(tmp)).sort(),
      ["pull.lock", `stage-${DEAD_PID}-live`, `stage-${process.pid}-mine`, "young-temp"].sort(),
    );
    assert.ok(existsSync(join(store.root, "catalog.db")));
  });
});

describe("collectGarbage: dry run", () => {
  it("reports what a real run then frees, and deletes nothing", async () => {
    await addImage("localhost/a:1", { manifest: "manifest a", layers: ["layer"] });
    await addBlob("orphan 1");
    await addBlob("orphan 2");
    await addArtifact("k-orphan", sha("gone"));
    await addArtifact("k-stray", null);
    const stale = join(store.tmpDir, `stage-${DEAD_PID}-x`);
    await mkdir(stale);
    await age(stale, 2 * HOUR);

    const before = await tree();
    const dry = await collectGarbage(store, { dryRun: true });
    assert.equal(dry.dryRun, true);
    assert.equal(dry.blobs.length, 2);
    assert.equal(dry.artifacts.length, 2);
    assert.equal(dry.temp.length, 1);
    assert.deepEqual(await tree(), before);
    assert.ok(store.catalog.getArtifact("k-orphan"));

    const real = await collectGarbage(store);
    const sorted = (r: typeof dry) => ({
      blobs: [...r.blobs].sort((a, b) => a.digest.localeCompare(b.digest)),
      artifacts: [...r.artifacts].sort((a, b) => a.path.localeCompare(b.path)),
      temp: r.temp,
      bytes: r.bytes,
    });
    assert.deepEqual(sorted(real), sorted(dry));
    assert.notDeepEqual(await tree(), before);
  });
});
