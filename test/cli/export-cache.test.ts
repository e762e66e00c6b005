/**
 * The artifact cache of `kiln export`. With -o the image is written once, at the output: the store
 * keeps a copy only where its filesystem can clone the output (then recorded as pending for this
 * boot). Without -o the image is built into the cache (fsynced, published), and a later -o export
 * copies it. A pending artifact of this boot is fsynced and published by the next export that uses
 * it; one of another boot (maybe a crash) is never trusted: it is built again and removed.
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { readdir, rename } from "node:fs/promises";
import { basename, join } from "node:path";
import { after, before, describe, it } from "node:test";
import Database from "better-sqlite3";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { sampleImage } from "../helpers/fixtures.js";
import { pushImage } from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import { assertTmpEmpty, canClone, type Sandbox, sandbox } from "./kiln.js";

interface ExportJson {
  cached: boolean;
  output: string;
  bytes: number;
}

const BOOT = readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim();
const OTHER_BOOT = "00000000-0000-0000-0000-000000000000";

describe("kiln export: the artifact cache", () => {
  let reg: Registry;
  let box: Sandbox;
  let work: string;
  let ref: string;
  /** The store's filesystem can clone (btrfs, XFS): an export with -o then keeps a pending copy. */
  let clones: boolean;

  /** The catalog's artifact paths (relative to the root), sorted. */
  const artifactPaths = (): string[] => {
    const db = new Database(join(box.root, "catalog.db"), { readonly: true });
    try {
      return (db.prepare("SELECT path FROM artifacts ORDER BY path").all() as { path: string }[]).map(
        (r) => r.path,
      );
    } finally {
      db.close();
    }
  };
  const artifactFiles = async (): Promise<string[]> =>
    (await readdir(join(box.root, "artifacts")).catch(() => [] as string[])).sort();

  /**
   * Renames a published artifact to `PATH.pending-BOOT`, its file and its catalog row: as an export
   * with -o leaves its store copy on a filesystem that can clone.
   */
  const makePending = async (published: string, boot: string): Promise<string> => {
    const pending = `${published}.pending-${boot}`;
    await rename(join(box.root, published), join(box.root, pending));
    const db = new Database(join(box.root, "catalog.db"));
    try {
      assert.equal(
        db.prepare("UPDATE artifacts SET path = ? WHERE path = ?").run(pending, published).changes,
        1,
      );
    } finally {
      db.close();
    }
    return pending;
  };

  /** `export REF --format ARGS…` without -o: the result is the store's (published) copy. */
  const intoCache = async (args: string[]): Promise<ExportJson & { path: string }> => {
    const r = await box.json<ExportJson>(["export", ref, "--format", ...args]);
    assert.ok(r.output.startsWith(`${join(box.root, "artifacts")}/`), r.output);
    return { ...r, path: r.output.slice(box.root.length + 1) };
  };

  before(async () => {
    reg = await startRegistry();
    ref = (await pushImage(await sampleImage(), reg, "sample:1")).ref;
    box = await sandbox();
    work = await makeTempDir("export-cache");
    await box.json(["pull", ref]);
    clones = await canClone(work, join(box.root, "tmp"));
  });
  after(async () => {
    await reg?.stop();
    await box?.cleanup();
    if (work) await removeDir(work);
  });

  it("with -o writes the output only: no artifact where the store cannot clone it", async () => {
    const a = join(work, "a.erofs");
    const r = await box.json<ExportJson>(["export", ref, "--format", "erofs", "-o", a]);
    assert.equal(r.cached, false);
    assert.equal(r.output, a);
    await run("fsck.erofs", [a]);
    if (clones) {
      const [pending] = artifactPaths();
      assert.match(pending!, new RegExp(`^artifacts/[0-9a-f]{64}\\.erofs\\.pending-${BOOT}$`));
      assert.ok(existsSync(join(box.root, pending!)));
    } else {
      assert.deepEqual(artifactPaths(), []);
      assert.deepEqual(await artifactFiles(), []);
    }
    assert.deepEqual((await readdir(work)).sort(), ["a.erofs"], "no temp file beside the output");
    await assertTmpEmpty(box.root);
  });

  it("without -o builds into the cache; a later -o export copies it, identical to one written in place", async () => {
    const direct = join(work, "direct.ext4");
    await box.json(["export", ref, "--format", "ext4", "-o", direct]);

    const built = await intoCache(["ext4"]);
    // On a cloning filesystem the -o export above left a pending copy, which this one published.
    assert.equal(built.cached, clones);
    assert.match(built.path, /^artifacts\/[0-9a-f]{64}\.ext4$/);
    assert.ok(artifactPaths().includes(built.path));
    await run("e2fsck", ["-fn", built.output]);
    await run("cmp", [direct, built.output]);

    const again = await intoCache(["ext4"]);
    assert.equal(again.cached, true);
    assert.equal(again.output, built.output);

    const copy = join(work, "copy.ext4");
    const copied = await box.json<ExportJson>(["export", ref, "--format", "ext4", "-o", copy]);
    assert.equal(copied.cached, true);
    assert.equal(copied.output, copy);
    await run("cmp", [built.output, copy]);
    assert.ok(existsSync(built.output), "the cached artifact stays");
    await assertTmpEmpty(box.root);
  });

  // A pending artifact, made by hand from a published one: as an export with -o on a cloning
  // filesystem leaves it. Published by the next export, with -o (a file) or without (a directory).
  for (const c of [
    { format: "cpio", output: true },
    { format: "erofs-layers", output: false },
  ]) {
    it(`a pending ${c.format} artifact of this boot is published by the next export (${c.output ? "with" : "without"} -o)`, async () => {
      const published = (await intoCache([c.format])).path;
      const before = join(work, `before.${c.format}`);
      await box.json(["export", ref, "--format", c.format, "-o", before]);
      const pending = await makePending(published, BOOT);

      const after = join(work, `after.${c.format}`);
      const next = await box.json<ExportJson>(
        c.output ? ["export", ref, "--format", c.format, "-o", after] : ["export", ref, "--format", c.format],
      );
      assert.equal(next.cached, true, "a pending artifact of this boot is trusted");
      assert.ok(artifactPaths().includes(published), "and published under its final path");
      assert.ok(!artifactPaths().includes(pending));
      assert.ok(!existsSync(join(box.root, pending)));
      const name = basename(published);
      assert.deepEqual(
        (await artifactFiles()).filter((n) => n.startsWith(name)),
        [name],
        "the pending copy is gone",
      );
      if (c.output) {
        await run("cmp", [before, after]);
      } else {
        assert.equal(next.output, join(box.root, published));
        await run("diff", ["-r", before, next.output]);
      }
      await assertTmpEmpty(box.root);
    });
  }

  it("builds again over a pending artifact of another boot, and removes it", async () => {
    const published = (await intoCache(["cpio", "--compress", "gzip"])).path;
    const a = join(work, "a.cpio.gz");
    await box.json(["export", ref, "--format", "cpio", "--compress", "gzip", "-o", a]);
    // As if written before a reboot: its blocks may never have reached the disk.
    const stale = await makePending(published, OTHER_BOOT);

    const b = join(work, "b.cpio.gz");
    const again = await box.json<ExportJson>([
      "export",
      ref,
      "--format",
      "cpio",
      "--compress",
      "gzip",
      "-o",
      b,
    ]);
    assert.equal(again.cached, false, "a pending artifact of another boot is not trusted");
    assert.ok(!existsSync(join(box.root, stale)), "and is removed");
    assert.ok(!artifactPaths().includes(stale));
    await run("cmp", [a, b]);
    // Written at -o only: the store has the artifact again only if it could clone it.
    assert.equal(artifactPaths().includes(`${published}.pending-${BOOT}`), clones);
    assert.ok(!artifactPaths().includes(published));
    await assertTmpEmpty(box.root);
  });
});
