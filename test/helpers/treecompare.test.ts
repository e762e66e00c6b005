import assert from "node:assert/strict";
import { chmod, link, mkdir, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { makeTempDir, removeDir, run } from "./exec.js";
import { diffTrees, snapshotTree } from "./treecompare.js";

describe("snapshotTree / diffTrees", () => {
  const dirs: string[] = [];
  after(async () => {
    for (const d of dirs) await removeDir(d);
  });

  async function sample(): Promise<string> {
    const d = await makeTempDir("tree");
    dirs.push(d);
    await mkdir(join(d, "etc"));
    await writeFile(join(d, "etc", "a"), "alpha\n");
    await link(join(d, "etc", "a"), join(d, "etc", "b"));
    await symlink("/etc/a", join(d, "abs"));
    await writeFile(join(d, "x"), "x");
    await chmod(join(d, "x"), 0o4755);
    await run("setfattr", ["-n", "user.k", "-v", "0x00ff", join(d, "x")]);
    await run("mknod", [join(d, "null"), "c", "1", "3"]);
    return d;
  }

  it("describes types, modes, content, links, devices and xattrs", async () => {
    const s = await snapshotTree(await sample());
    assert.equal(s.get("x")!.mode, 0o4755);
    assert.equal(s.get("x")!.xattrs["user.k"], "0x00ff");
    assert.equal(s.get("abs")!.target, "/etc/a");
    assert.deepEqual(s.get("etc/a")!.links, ["etc/a", "etc/b"]);
    assert.equal(s.get("null")!.rdev, "1:3");
    assert.equal(s.get("etc/a")!.sha256, s.get("etc/b")!.sha256);
  });

  it("finds every kind of difference, and none between equal trees", async () => {
    const a = await sample();
    const b = await sample();
    assert.deepEqual(diffTrees(await snapshotTree(a), await snapshotTree(b)), []);
    await writeFile(join(b, "etc", "a"), "changed\n");
    await chmod(join(b, "x"), 0o755);
    await writeFile(join(b, "new"), "");
    const diff = diffTrees(await snapshotTree(a), await snapshotTree(b));
    assert.ok(diff.some((d) => d.startsWith("/etc/a: sha256")));
    assert.ok(diff.some((d) => d.startsWith("/x: mode")));
    assert.ok(diff.includes("/new: only in actual"));
  });
});
