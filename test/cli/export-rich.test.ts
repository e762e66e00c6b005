/**
 * kiln export end to end on the rich image (fixtures.ts `richSpec`): a busybox rootfs, devices, a
 * fifo, binary/trusted/user xattrs, big ids, setuid/setgid/sticky, long and non-ASCII names, a
 * 16 MiB mostly-zero file, symlinks of every kind, whiteouts, an opaque dir, replacements and
 * hardlinks whose target an upper layer removes. Pulled from a real registry, exported to every
 * format, checked by each format's own tool and the kernel, compared with `umoci unpack`.
 */
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { CAP_NET_RAW, LONG_DIR, richImage } from "../helpers/fixtures.js";
import { pushImage } from "../helpers/images.js";
import { DEFAULT_MTIME } from "../helpers/layers.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import { diffTrees, type EntryFacts, type SnapshotOptions, snapshotTree } from "../helpers/treecompare.js";
import { type Sandbox, sandbox } from "./kiln.js";

type Facts = Map<string, EntryFacts>;

/** Without the root (its mode and times differ by design); for cpio, no xattrs nor directory mtimes. */
function comparable(facts: Facts, opts: { xattrs?: boolean; dirMtimes?: boolean } = {}): Facts {
  const out: Facts = new Map();
  for (const [path, f] of facts) {
    if (path === "") continue;
    const g = opts.xattrs === false ? { ...f, xattrs: {} } : { ...f };
    if (opts.dirMtimes === false && g.type === "dir") delete g.mtime;
    out.set(path, g);
  }
  return out;
}

/** Loop-mounts `image` read-only on a new dir under `work`, runs `body`, unmounts. */
async function withMount<T>(
  work: string,
  name: string,
  args: string[],
  body: (dir: string) => Promise<T>,
): Promise<T> {
  const dir = join(work, name);
  await run("mkdir", [dir]);
  await run("mount", [...args, dir]);
  try {
    return await body(dir);
  } finally {
    await run("umount", [dir]);
  }
}

/**
 * umoci leaves "now" as the mtime of two directories: `long`, whose tar header says DEFAULT_MTIME
 * (umoci does not restore it after writing below it), and the parent missing from the tar above
 * the 255-byte path, which DESIGN.md makes 0755 root:root at kiln's fixed time (the epoch).
 */
function fixUmociMtimes(facts: Facts): Facts {
  const fixes: [string, number][] = [
    ["long", DEFAULT_MTIME],
    [LONG_DIR.slice(0, LONG_DIR.lastIndexOf("/")), 0],
  ];
  for (const [path, mtime] of fixes) {
    const f = facts.get(path);
    assert.ok(f, `reference lacks /${path}`);
    assert.ok(f.mtime! > DEFAULT_MTIME, `umoci now restores /${path}'s mtime: drop this fix`);
    f.mtime = mtime;
  }
  return facts;
}

const FORMATS = [
  { format: "ext4", out: "rich.ext4" },
  { format: "erofs", out: "rich.erofs" },
  { format: "erofs-layers", out: "rich-layers" },
  { format: "cpio", out: "rich.cpio" },
] as const;

describe("kiln export of the rich image", () => {
  let reg: Registry;
  let box: Sandbox;
  let work: string;
  let reference: Facts;
  let ref: string;

  before(async () => {
    const image = await richImage();
    reg = await startRegistry();
    ref = (await pushImage(image, reg, "rich:1")).ref;
    box = await sandbox();
    work = await makeTempDir("export-rich");
    await run("umoci", ["unpack", "--image", `${image.dir}:${image.tag}`, join(work, "bundle")]);
    reference = fixUmociMtimes(await snapshotTree(join(work, "bundle", "rootfs"), { mtime: true }));
    await box.json(["pull", ref]);
    for (const f of FORMATS) await box.json(["export", ref, "--format", f.format, "-o", join(work, f.out)]);
  });
  after(async () => {
    await reg?.stop();
    await box?.cleanup();
    if (work) await removeDir(work);
  });

  it("the reference holds every case the image was built for", () => {
    const get = (p: string) => {
      const f = reference.get(p);
      assert.ok(f, `reference lacks /${p}`);
      return f;
    };
    assert.equal(get("dev/big").rdev, "300:70000");
    assert.equal(get("dev/loop0").type, "block");
    assert.equal(get("dev/initctl").type, "fifo");
    assert.equal(get("usr/bin/ping").xattrs["security.capability"], `0x${CAP_NET_RAW.toString("hex")}`);
    assert.equal(get("etc/tagged").xattrs["trusted.foo"], "0x626172");
    assert.equal(get("etc/tagged").xattrs["user.bin"], "0x0001feff");
    assert.equal(get("home/big/id").uid, 70000);
    assert.equal(get("srv/shared").mode, 0o3775);
    assert.equal(get("data/sparse.img").size, 16 << 20);
    assert.equal(get("data/empty").size, 0);
    assert.equal(get("bin/busybox").type, "file");
    // Layer 3's changes, as umoci applies them.
    for (const gone of [
      "wh/file-gone",
      "wh/dir-gone",
      "opq/old",
      "opq/sub",
      "hl/a",
      "replace/dir-to-link/child",
    ])
      assert.ok(!reference.has(gone), `/${gone} should be gone`);
    assert.ok(reference.has("opq/new"));
    assert.equal(get("replace/file-to-dir").type, "dir");
    assert.equal(get("replace/dir-to-link").target, "../data");
    assert.equal(get("hl/a-link").size, "lower a\n".length);
    assert.deepEqual(get("hl/b-link").links, ["hl/b-link", "hl/b-link2"]);
    assert.equal(get("hl/b").links, undefined);
  });

  it("ext4: passes e2fsck -fn; mounted read-only it equals umoci unpack entry by entry", async () => {
    const out = join(work, "rich.ext4");
    await run("e2fsck", ["-fn", out]);
    const actual = await withMount(work, "mnt-ext4", ["-o", "loop,ro", out], (dir) =>
      snapshotTree(dir, { ignore: ["lost+found"], mtime: true }),
    );
    assert.deepEqual(diffTrees(comparable(reference), comparable(actual), ["umoci", "kiln"]), []);
  });

  it("erofs: passes fsck.erofs; mounted read-only it equals umoci unpack entry by entry", async () => {
    const out = join(work, "rich.erofs");
    await run("fsck.erofs", [out]);
    const actual = await withMount(work, "mnt-erofs", ["-t", "erofs", "-o", "loop,ro", out], (dir) =>
      snapshotTree(dir, { mtime: true }),
    );
    assert.deepEqual(diffTrees(comparable(reference), comparable(actual), ["umoci", "kiln"]), []);
  });

  it("erofs-layers: each layer passes fsck.erofs; stacked with overlayfs they equal umoci unpack", async () => {
    const out = join(work, "rich-layers");
    const list = JSON.parse(await readFile(join(out, "layers.json"), "utf8")) as {
      layers: { file: string }[];
    };
    assert.equal(list.layers.length, 3);
    const mounts: string[] = [];
    try {
      for (const [i, l] of list.layers.entries()) {
        await run("fsck.erofs", [join(out, l.file)]);
        const m = join(work, `lower-${i}`);
        await run("mkdir", [m]);
        await run("mount", ["-t", "erofs", "-o", "loop,ro", join(out, l.file), m]);
        mounts.push(m);
      }
      const merged = join(work, "merged");
      await run("mkdir", [merged]);
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
      const overlayXattrs: SnapshotOptions = {
        ignoreXattrs: ["trusted.overlay.opaque", "trusted.overlay.origin"],
      };
      const stacked = await snapshotTree(merged, { ...overlayXattrs, mtime: true });
      const leaked = [...stacked].filter(([, f]) =>
        Object.keys(f.xattrs).some((k) => k.startsWith("trusted.overlay.")),
      );
      assert.deepEqual(leaked, []);
      // overlayfs reports a lower inode's own link count: hl/a-link still counts hl/a, which the
      // top layer whites out, so it shows nlink 2 with one visible name. One name is no group.
      const hidden = [...stacked].filter(([, f]) => f.links?.length === 1).map(([p]) => p);
      assert.deepEqual(hidden, ["hl/a-link"]);
      for (const p of hidden) delete stacked.get(p)!.links;
      assert.deepEqual(diffTrees(comparable(reference), comparable(stacked), ["umoci", "kiln"]), []);
    } finally {
      for (const m of mounts.reverse()) await run("umount", [m]).catch(() => {});
    }
  });

  it("cpio: cpio -it lists it; extracted by GNU cpio it equals umoci unpack (xattrs aside)", async () => {
    const out = join(work, "rich.cpio");
    await run("sh", ["-c", `cpio -it --quiet < '${out}' > /dev/null`]);
    const dir = join(work, "x-cpio");
    await run("mkdir", [dir]);
    await run("sh", ["-c", `cd '${dir}' && cpio -idmu --no-absolute-filenames --quiet < '${out}'`]);
    const actual = await snapshotTree(dir, { mtime: true });
    // GNU cpio -m sets a directory's mtime before writing into it: only non-directories keep theirs.
    const noX = { xattrs: false, dirMtimes: false };
    assert.deepEqual(diffTrees(comparable(reference, noX), comparable(actual, noX), ["umoci", "kiln"]), []);
  });

  it("a second store exports byte-identical outputs", async () => {
    const other = await sandbox();
    try {
      await other.json(["pull", ref]);
      for (const f of FORMATS) {
        const again = join(work, `again-${f.out}`);
        const r = await other.json<{ cached: boolean }>(["export", ref, "--format", f.format, "-o", again]);
        assert.equal(r.cached, false);
        if (f.format !== "erofs-layers") {
          await run("cmp", [join(work, f.out), again]);
          continue;
        }
        const a = await readFile(join(work, f.out, "layers.json"), "utf8");
        assert.equal(await readFile(join(again, "layers.json"), "utf8"), a);
        for (const l of (JSON.parse(a) as { layers: { file: string }[] }).layers)
          await run("cmp", [join(work, f.out, l.file), join(again, l.file)]);
      }
    } finally {
      await other.cleanup();
    }
  });
});
