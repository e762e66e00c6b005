/**
 * A layer whose tar opens with `./.wh..wh..opq` hides every lower layer. overlayfs ignores
 * trusted.overlay.opaque on a lower layer's root, so erofs-layers must say it with whiteouts: the
 * stacked layers, the flattened ext4 and EROFS images and `umoci unpack` must show the same tree.
 */
import assert from "node:assert/strict";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { buildImage, pushImage } from "../helpers/images.js";
import { DEFAULT_MTIME } from "../helpers/layers.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import { diffTrees, type EntryFacts, type SnapshotOptions, snapshotTree } from "../helpers/treecompare.js";
import { type Sandbox, sandbox } from "./kiln.js";

type Facts = Map<string, EntryFacts>;

const notRoot = process.getuid?.() !== 0 ? "needs root (loop and overlay mounts)" : false;

/** Without the root directory, whose mode and time differ by design. */
const dropRoot = (facts: Facts): Facts => new Map([...facts].filter(([p]) => p !== ""));

/** The middle layer as docker writes them: GNU tar of `.` (so `./` names), opaque marker at the top. */
async function opaqueRootLayer(work: string): Promise<string> {
  const stage = join(work, "stage");
  await mkdir(join(stage, "etc"), { recursive: true });
  await mkdir(join(stage, "data"));
  await writeFile(join(stage, ".wh..wh..opq"), "");
  await writeFile(join(stage, "etc", "hostname"), "middle\n");
  await writeFile(join(stage, "data", "m"), "from the middle layer\n");
  const tar = join(work, "middle.tar");
  await run("tar", [
    "--create",
    "-f",
    tar,
    "--format=pax",
    "--sort=name",
    "--numeric-owner",
    "--owner=0",
    "--group=0",
    `--mtime=@${DEFAULT_MTIME}`,
    "-C",
    stage,
    ".",
  ]);
  return tar;
}

async function mounted(work: string, name: string, args: string[], mounts: string[]): Promise<string> {
  const dir = join(work, name);
  await mkdir(dir);
  await run("mount", [...args, dir]);
  mounts.push(dir);
  return dir;
}

describe("an opaque marker at a layer's root", { skip: notRoot }, () => {
  let reg: Registry;
  let box: Sandbox;
  let work: string;
  let reference: Facts;
  let ref: string;
  const mounts: string[] = [];

  before(async () => {
    work = await makeTempDir("opaque-root");
    const middle = await opaqueRootLayer(work);
    const image = await buildImage(join(work, "oci"), {
      layers: [
        [
          { path: "etc/", type: "dir", mode: 0o700 },
          { path: "etc/passwd", content: "root:x:0:0::/root:/bin/sh\n" },
          { path: "bin/", type: "dir" },
          { path: "bin/sh", content: "#!\n", mode: 0o755 },
          { path: "keep/", type: "dir" },
          { path: "keep/k", content: "lower\n" },
        ],
        { tarFile: middle },
        [
          { path: "etc/extra", content: "top\n" },
          { path: "top/t", content: "top\n", uid: 1000, gid: 1000 },
        ],
      ],
    });
    reg = await startRegistry();
    ref = (await pushImage(image, reg, "opaque-root:1")).ref;
    box = await sandbox();
    await run("umoci", ["unpack", "--image", `${image.dir}:${image.tag}`, join(work, "bundle")]);
    reference = dropRoot(await snapshotTree(join(work, "bundle", "rootfs")));
    await box.json(["pull", ref]);
  });
  after(async () => {
    for (const m of mounts.reverse()) await run("umount", [m]).catch(() => {});
    await reg?.stop();
    await box?.cleanup();
    if (work) await removeDir(work);
  });

  it("the reference shows only the middle and top layers", () => {
    assert.deepEqual([...reference.keys()].sort(), [
      "data",
      "data/m",
      "etc",
      "etc/extra",
      "etc/hostname",
      "top",
      "top/t",
    ]);
  });

  const flattened: { format: string; args: string[]; snap: SnapshotOptions }[] = [
    { format: "ext4", args: ["-o", "loop,ro"], snap: { ignore: ["lost+found"] } },
    { format: "erofs", args: ["-t", "erofs", "-o", "loop,ro"], snap: {} },
  ];
  for (const f of flattened) {
    it(`${f.format}: mounted, equals umoci unpack`, async () => {
      const out = join(work, `image.${f.format}`);
      await box.json(["export", ref, "--format", f.format, "-o", out]);
      const dir = await mounted(work, `mnt-${f.format}`, [...f.args, out], mounts);
      assert.deepEqual(
        diffTrees(reference, dropRoot(await snapshotTree(dir, f.snap)), ["umoci", "kiln"]),
        [],
      );
    });
  }

  it("erofs-layers: stacked with overlayfs, the lower layer stays hidden and equals umoci unpack", async () => {
    const out = join(work, "layers");
    await box.json(["export", ref, "--format", "erofs-layers", "-o", out]);
    const list = JSON.parse(await readFile(join(out, "layers.json"), "utf8")) as {
      layers: { file: string }[];
    };
    assert.equal(list.layers.length, 3);
    const lowers: string[] = [];
    for (const [i, l] of list.layers.entries()) {
      await run("fsck.erofs", [join(out, l.file)]);
      lowers.push(
        await mounted(work, `lower-${i}`, ["-t", "erofs", "-o", "loop,ro", join(out, l.file)], mounts),
      );
    }
    // The middle layer's root carries no opaque xattr (overlayfs would ignore it) but whiteouts.
    const middle = await snapshotTree(lowers[1]!);
    assert.equal(middle.get("")!.xattrs["trusted.overlay.opaque"], undefined);
    for (const name of ["bin", "keep"]) assert.equal(middle.get(name)?.rdev, "0:0", `${name} whiteout`);
    assert.equal(middle.get("etc")!.xattrs["trusted.overlay.opaque"], "0x79");
    // overlayfs lists lower dirs top first.
    const merged = await mounted(
      work,
      "merged",
      ["-t", "overlay", "overlay", "-o", `lowerdir=${[...lowers].reverse().join(":")}`],
      mounts,
    );
    const stacked = await snapshotTree(merged, { ignoreXattrs: ["trusted.overlay.opaque"] });
    assert.deepEqual(diffTrees(reference, dropRoot(stacked), ["umoci", "kiln"]), []);
  });
});
