/**
 * kiln export end to end: a real image (whiteouts, an opaque directory, hardlinks, setuid, owners,
 * xattrs) pulled from a real registry, exported, unpacked by an independent tool, and compared
 * entry by entry with `umoci unpack` of the same image.
 */
import assert from "node:assert/strict";
import { readdir, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { sampleImage } from "../helpers/fixtures.js";
import { type Layout, pushImage } from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import { diffTrees, type EntryFacts, snapshotTree } from "../helpers/treecompare.js";
import { assertFails, type Sandbox, sandbox } from "./kiln.js";

/** The reference: umoci's unpack applies whiteouts correctly (TESTING.md). */
async function umociRootfs(image: Layout, work: string): Promise<string> {
  const bundle = join(work, "bundle");
  await run("umoci", ["unpack", "--image", `${image.dir}:${image.tag}`, bundle]);
  return join(bundle, "rootfs");
}

/** What cpio cannot carry (xattrs) and what differs by design (the root and directory mtimes). */
function forCpio(facts: Map<string, EntryFacts>): Map<string, EntryFacts> {
  const out = new Map<string, EntryFacts>();
  for (const [path, f] of facts) {
    if (path === "") continue;
    out.set(path, { ...f, xattrs: {} });
  }
  return out;
}

describe("kiln export", () => {
  let reg: Registry;
  let box: Sandbox;
  let work: string;
  let reference: Map<string, EntryFacts>;
  let ref: string;

  before(async () => {
    const image = await sampleImage();
    reg = await startRegistry();
    ref = (await pushImage(image, reg, "sample:1")).ref;
    box = await sandbox();
    work = await makeTempDir("export");
    reference = await snapshotTree(await umociRootfs(image, work));
  });
  after(async () => {
    await reg?.stop();
    await box?.cleanup();
    if (work) await removeDir(work);
  });

  for (const compress of ["none", "gzip"] as const) {
    it(`cpio (${compress}): unpacked by GNU cpio, equals umoci unpack entry by entry`, async () => {
      const out = join(work, `image-${compress}.cpio`);
      const pull = await box.kiln(["pull", ref, "--format", "cpio", "--compress", compress, "-o", out]);
      assert.equal(pull.code, 0, pull.stderr);
      const dir = join(work, `x-${compress}`);
      await run("mkdir", [dir]);
      const unpack = compress === "gzip" ? `gzip -dc '${out}'` : `cat '${out}'`;
      await run("sh", ["-c", `${unpack} | (cd '${dir}' && cpio -idmu --no-absolute-filenames --quiet)`]);
      const diff = diffTrees(forCpio(reference), forCpio(await snapshotTree(dir)), ["umoci", "kiln"]);
      assert.deepEqual(diff, []);
      // Whiteouts never reach the output.
      assert.ok(!reference.has("etc/passwd"));
      assert.ok(!reference.has("home/user/old.txt"));
    });
  }

  it("ext4: passes e2fsck, and mounted read-only equals umoci unpack entry by entry (xattrs too)", async () => {
    const out = join(work, "image.ext4");
    const r = await box.kiln(["export", ref, "--format", "ext4", "-o", out]);
    assert.equal(r.code, 0, r.stderr);
    await run("e2fsck", ["-fn", out]);
    const mnt = join(work, "mnt-ext4");
    await run("mkdir", [mnt]);
    await run("mount", ["-o", "loop,ro", out, mnt]);
    try {
      const actual = await snapshotTree(mnt, { ignore: ["lost+found"] });
      const drop = (m: Map<string, EntryFacts>) => new Map([...m].filter(([p]) => p !== ""));
      assert.deepEqual(diffTrees(drop(reference), drop(actual), ["umoci", "kiln"]), []);
      // The sample carries a user.* xattr: it must survive.
      assert.ok(Object.keys(actual.get("etc/tagged")!.xattrs).includes("user.kiln"));
    } finally {
      await run("umount", [mnt]);
    }
  });

  it("erofs: passes fsck.erofs, and mounted read-only equals umoci unpack entry by entry", async () => {
    const out = join(work, "image.erofs");
    const r = await box.kiln(["export", ref, "--format", "erofs", "-o", out]);
    assert.equal(r.code, 0, r.stderr);
    await run("fsck.erofs", [out]);
    const mnt = join(work, "mnt-erofs");
    await run("mkdir", [mnt]);
    await run("mount", ["-t", "erofs", "-o", "loop,ro", out, mnt]);
    try {
      const drop = (m: Map<string, EntryFacts>) => new Map([...m].filter(([p]) => p !== ""));
      assert.deepEqual(diffTrees(drop(reference), drop(await snapshotTree(mnt)), ["umoci", "kiln"]), []);
    } finally {
      await run("umount", [mnt]);
    }
  });

  it("erofs-layers: one image per layer; stacked with overlayfs they equal umoci unpack", async () => {
    const out = join(work, "layers");
    const r = await box.kiln(["export", ref, "--format", "erofs-layers", "-o", out]);
    assert.equal(r.code, 0, r.stderr);
    const list = JSON.parse(await readFile(join(out, "layers.json"), "utf8")) as {
      layers: { file: string }[];
    };
    assert.equal(list.layers.length, 3);
    const mounts: string[] = [];
    const merged = join(work, "merged");
    await run("mkdir", [merged]);
    try {
      for (const [i, l] of list.layers.entries()) {
        await run("fsck.erofs", [join(out, l.file)]);
        const m = join(work, `lower-${i}`);
        await run("mkdir", [m]);
        await run("mount", ["-t", "erofs", "-o", "loop,ro", join(out, l.file), m]);
        mounts.push(m);
      }
      // overlayfs lists lower dirs top first.
      await run("mount", [
        "-t",
        "overlay",
        "overlay",
        "-o",
        `lowerdir=${[...mounts].reverse().join(":")}`,
        merged,
      ]);
      mounts.push(merged);
      const drop = (m: Map<string, EntryFacts>) => new Map([...m].filter(([p]) => p !== ""));
      const stacked = await snapshotTree(merged, { ignoreXattrs: ["trusted.overlay.opaque"] });
      assert.deepEqual(diffTrees(drop(reference), drop(stacked), ["umoci", "kiln"]), []);
    } finally {
      for (const m of mounts.reverse()) await run("umount", [m]).catch(() => {});
    }
  });

  it("ext4 --size: exact size, and TOO_LARGE naming the size needed when too small", async () => {
    const out = join(work, "sized.ext4");
    await box.json(["export", ref, "--format", "ext4", "--size", "64M", "-o", out]);
    assert.equal((await stat(out)).size, 64 * 1024 * 1024);
    await run("e2fsck", ["-fn", out]);
    const small = assertFails(
      await box.kiln(["export", ref, "--format", "ext4", "--size", "64K", "-o", join(work, "small.ext4")]),
      "TOO_LARGE",
    );
    assert.match(small, /\d/);
  });

  it("ext4 --journal: the disk has a clean jbd2 journal; other formats refuse the flag", async () => {
    const out = join(work, "journaled.ext4");
    await box.json(["export", ref, "--format", "ext4", "--journal", "-o", out]);
    await run("e2fsck", ["-fn", out]);
    assert.match(await run("dumpe2fs", ["-h", out]), /has_journal/);
    assertFails(
      await box.kiln(["export", ref, "--format", "erofs", "--journal", "-o", join(work, "j.erofs")]),
      "INVALID_ARGUMENT",
    );
  });

  it("disk create: an empty sparse ext4 that e2fsck accepts", async () => {
    const out = join(work, "vol.ext4");
    await box.json(["disk", "create", "--size", "1G", out]);
    const st = await stat(out);
    assert.equal(st.size, 1024 ** 3);
    assert.ok(st.blocks * 512 < 64 * 1024 * 1024, "sparse");
    await run("e2fsck", ["-fn", out]);
  });

  it("is byte-identical on a second run, and a later export comes from the store's cache", async () => {
    const a = join(work, "a.cpio");
    const b = join(work, "b.cpio");
    type Exported = { cached: boolean; output: string };
    // Fresh here; from the cache where the store could clone the earlier tests' outputs.
    const first = await box.json<Exported>(["export", ref, "--format", "cpio", "-o", a]);
    assert.equal(typeof first.cached, "boolean");
    // Without -o: built again into the store (or, where the store could clone an output, found there).
    const stored = await box.json<Exported>(["export", ref, "--format", "cpio"]);
    await run("cmp", [a, stored.output]);
    const third = await box.json<Exported>(["export", ref, "--format", "cpio", "-o", b]);
    assert.equal(third.cached, true);
    await run("cmp", [a, b]);
  });

  it("kiln rm takes the image's cached artifacts with it", async () => {
    await box.json(["export", ref, "--format", "cpio", "--compress", "gzip"]);
    const artifacts = join(box.root, "artifacts");
    assert.ok((await readdir(artifacts)).length > 0);
    await box.json(["rm", ref]);
    assert.deepEqual(await readdir(artifacts), []);
    // Pulled again for the tests that follow.
    await box.json(["pull", ref]);
  });

  it("refuses an unknown format and a missing image with one line and a code", async () => {
    assertFails(
      await box.kiln(["export", ref, "--format", "zip", "-o", join(work, "z")]),
      "INVALID_ARGUMENT",
    );
    assertFails(await box.kiln(["export", "nope:1", "--format", "cpio", "-o", join(work, "z")]), "NOT_FOUND");
  });

  it("names a missing output directory, and leaves nothing behind", async () => {
    const missing = join(work, "no-such-dir");
    const line = assertFails(
      await box.kiln(["export", ref, "--format", "cpio", "-o", join(missing, "x.cpio")]),
      "NOT_FOUND",
    );
    assert.match(line, /directory .*no-such-dir does not exist/);
    assertFails(await box.kiln(["disk", "create", "--size", "1M", join(missing, "v.ext4")]), "NOT_FOUND");
    const notDir = join(work, "a-file");
    await writeFile(notDir, "");
    assertFails(
      await box.kiln(["export", ref, "--format", "cpio", "-o", join(notDir, "x.cpio")]),
      "INVALID_ARGUMENT",
    );
  });
});
