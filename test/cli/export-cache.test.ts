/**
 * The artifact cache when exporting to a file: the output is fsynced, the store's copy is recorded
 * as pending for this boot and fsynced by the next export that needs it; a pending artifact of
 * another boot (maybe a crash) is never trusted.
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { readdir, rename } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import Database from "better-sqlite3";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { sampleImage } from "../helpers/fixtures.js";
import { pushImage } from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import { type Sandbox, sandbox } from "./kiln.js";

interface ExportJson {
  cached: boolean;
  output: string;
}

const BOOT = readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim();

describe("kiln export: the artifact cache", () => {
  let reg: Registry;
  let box: Sandbox;
  let work: string;
  let ref: string;

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

  before(async () => {
    reg = await startRegistry();
    ref = (await pushImage(await sampleImage(), reg, "sample:1")).ref;
    box = await sandbox();
    work = await makeTempDir("export-cache");
    await box.json(["pull", ref]);
  });
  after(async () => {
    await reg?.stop();
    await box?.cleanup();
    if (work) await removeDir(work);
  });

  it("records the store's copy as pending for this boot; the next export publishes it", async () => {
    const a = join(work, "a.erofs");
    const first = await box.json<ExportJson>(["export", ref, "--format", "erofs", "-o", a]);
    assert.equal(first.cached, false);
    const [pending] = artifactPaths();
    assert.match(pending!, new RegExp(`^artifacts/[0-9a-f]{64}\\.erofs\\.pending-${BOOT}$`));
    assert.ok(existsSync(join(box.root, pending!)));

    const b = join(work, "b.erofs");
    const second = await box.json<ExportJson>(["export", ref, "--format", "erofs", "-o", b]);
    assert.equal(second.cached, true);
    const [published] = artifactPaths();
    assert.equal(published, pending!.replace(/\.pending-.*$/, ""));
    assert.deepEqual(await readdir(join(box.root, "artifacts")), [published!.slice("artifacts/".length)]);
    await run("cmp", [a, b]);
    await run("fsck.erofs", [b]);
  });

  it("builds again over a pending artifact of another boot, and removes it", async () => {
    const a = join(work, "c.cpio");
    await box.json(["export", ref, "--format", "cpio", "-o", a]);
    const pending = artifactPaths().find((p) => p.endsWith(`.cpio.pending-${BOOT}`));
    assert.ok(pending);
    // As if written before a reboot: its blocks may never have reached the disk.
    const stale = pending.replace(BOOT, "00000000-0000-0000-0000-000000000000");
    await rename(join(box.root, pending), join(box.root, stale));
    const db = new Database(join(box.root, "catalog.db"));
    try {
      db.prepare("UPDATE artifacts SET path = ? WHERE path = ?").run(stale, pending);
    } finally {
      db.close();
    }

    const b = join(work, "d.cpio");
    const again = await box.json<ExportJson>(["export", ref, "--format", "cpio", "-o", b]);
    assert.equal(again.cached, false, "a pending artifact of another boot is not trusted");
    assert.ok(!existsSync(join(box.root, stale)), "and is removed");
    await run("cmp", [a, b]);
  });
});
