/**
 * An output path is the user's (issue 24): `-o` onto a device node, a FIFO, a symlink, a directory
 * or a file, and `disk create` over a disk with data. Device nodes are made with mknod in a temp
 * dir; the block device is a loop device over a sparse file.
 */
import assert from "node:assert/strict";
import { lstat, mkdir, open, readdir, readFile, readlink, stat, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { buildImage, pushImage } from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import { assertFails, type Sandbox, sandbox } from "./kiln.js";

const notRoot = process.getuid?.() !== 0 ? "needs root (mknod, losetup)" : false;

/** Linux's dev_t split (glibc's gnu_dev_major/minor), for mknod of the loop device's numbers. */
function majorMinor(rdev: number): [number, number] {
  return [
    ((rdev >> 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff),
    (rdev & 0xff) | ((rdev >> 12) & ~0xff),
  ];
}

/** No temp file of an export (`.…kiln-tmp`) is left in `dir`. */
async function assertNoTemp(dir: string): Promise<void> {
  assert.deepEqual(
    (await readdir(dir)).filter((n) => n.endsWith(".kiln-tmp")),
    [],
  );
}

describe("-o: an output path is the user's", { skip: notRoot }, () => {
  let box: Sandbox;
  let work: string;
  let reg: Registry;
  let remote: string;
  const ref = "outpath/img:1";
  /** The same export to a fresh regular file: what every other output must hold. */
  let ext4Bytes: Buffer;
  let cpioBytes: Buffer;

  before(async () => {
    box = await sandbox();
    work = await makeTempDir("outpath");
    const layout = await buildImage(join(work, "layout"), {
      layers: [
        [
          { path: "etc/", type: "dir" },
          { path: "etc/hostname", content: "outpath\n" },
          { path: "data", size: 300_000 },
        ],
        [{ path: "etc/motd", content: "second layer\n" }],
      ],
    });
    reg = await startRegistry();
    remote = (await pushImage(layout, reg, "outpath:1")).ref;
    const imported = await box.kiln(["import", layout.dir, "--tag", ref]);
    assert.equal(imported.code, 0, imported.stderr);
    const plain = join(work, "plain");
    await mkdir(plain);
    for (const f of ["ext4", "cpio"]) {
      const r = await box.kiln(["export", ref, "--format", f, "-o", join(plain, `a.${f}`)]);
      assert.equal(r.code, 0, r.stderr);
    }
    ext4Bytes = await readFile(join(plain, "a.ext4"));
    cpioBytes = await readFile(join(plain, "a.cpio"));
  });
  after(async () => {
    await reg?.stop();
    await box?.cleanup();
    if (work) await removeDir(work);
  });

  it("refuses a character device node and keeps it (was: replaced by a regular file)", async () => {
    const dir = join(work, "chr");
    await mkdir(dir);
    const node = join(dir, "full");
    await run("mknod", [node, "c", "1", "7"]);
    const line = assertFails(
      await box.kiln(["export", ref, "--format", "ext4", "-o", node]),
      "INVALID_ARGUMENT",
    );
    assert.match(line, /character device/);
    const st = await lstat(node);
    assert.ok(st.isCharacterDevice());
    assert.deepEqual(majorMinor(st.rdev), [1, 7]);
    await assertNoTemp(dir);
  });

  it("refuses a FIFO and keeps it", async () => {
    const dir = join(work, "fifo");
    await mkdir(dir);
    const fifo = join(dir, "pipe");
    await run("mkfifo", [fifo]);
    assertFails(await box.kiln(["export", ref, "--format", "cpio", "-o", fifo]), "INVALID_ARGUMENT");
    assert.ok((await lstat(fifo)).isFIFO());
    await assertNoTemp(dir);
  });

  it("writes a block device node in place: the image lands on the device, the node stays", async () => {
    const dir = join(work, "blk");
    await mkdir(dir);
    const backing = join(dir, "backing.img");
    // Old content on the device: the image's zero blocks must be written over it, not skipped.
    const fh = await open(backing, "w");
    await fh.write(Buffer.alloc(8 << 20, 0xaa), 0);
    await fh.truncate(64 << 20);
    await fh.close();
    const loop = (await run("losetup", ["-f", "--show", backing])).trim();
    try {
      const node = join(dir, "disk");
      const [major, minor] = majorMinor((await stat(loop)).rdev);
      await run("mknod", [node, "b", String(major), String(minor)]);
      const r = await box.kiln(["export", ref, "--format", "ext4", "-o", node]);
      assert.equal(r.code, 0, r.stderr);
      const st = await lstat(node);
      assert.ok(st.isBlockDevice(), "the node is still a block device");
      assert.deepEqual(majorMinor(st.rdev), [major, minor]);
      const onDevice = Buffer.alloc(ext4Bytes.length);
      const dev = await open(node, "r");
      await dev.read(onDevice, 0, onDevice.length, 0);
      await dev.close();
      assert.ok(onDevice.equals(ext4Bytes), "the device holds the image byte for byte");
      await run("e2fsck", ["-fn", node]);

      // A mounted device is refused: writing under a live filesystem would corrupt it.
      const mnt = join(dir, "mnt");
      await mkdir(mnt);
      await run("mount", ["-o", "ro", node, mnt]);
      try {
        const busy = assertFails(
          await box.kiln(["export", ref, "--format", "ext4", "-o", node]),
          "INVALID_ARGUMENT",
        );
        assert.match(busy, /in use/);
      } finally {
        await run("umount", [mnt]);
      }

      const big = assertFails(
        await box.kiln(["export", "no-such:1", "--format", "ext4", "--size", "128M", "-o", node]),
        "TOO_LARGE",
      );
      assert.match(big, /larger than the device/);
      assertFails(
        await box.kiln(["export", ref, "--format", "erofs-layers", "-o", node]),
        "INVALID_ARGUMENT",
      );
      assert.ok((await lstat(node)).isBlockDevice());
      await assertNoTemp(dir);
    } finally {
      await run("losetup", ["-d", loop]);
    }
  });

  it("follows a symlink to its target: the link stays, the target gets the image", async () => {
    const dir = join(work, "link");
    await mkdir(join(dir, "vm"), { recursive: true });
    const target = join(dir, "vm", "rootfs.cpio");
    await writeFile(target, "the VM's old disk");
    const link = join(dir, "link");
    await symlink("vm/rootfs.cpio", link);
    const r = await box.kiln(["export", ref, "--format", "cpio", "-o", link]);
    assert.equal(r.code, 0, r.stderr);
    assert.ok((await lstat(link)).isSymbolicLink());
    assert.equal(await readlink(link), "vm/rootfs.cpio");
    assert.ok((await readFile(target)).equals(cpioBytes));
    await assertNoTemp(dir);
    await assertNoTemp(join(dir, "vm"));
  });

  it("follows a dangling symlink: the file it names is created, the link stays", async () => {
    const dir = join(work, "dangling");
    await mkdir(join(dir, "vm"), { recursive: true });
    const link = join(dir, "link");
    await symlink(join(dir, "vm", "new.ext4"), link);
    const r = await box.kiln(["export", ref, "--format", "ext4", "-o", link]);
    assert.equal(r.code, 0, r.stderr);
    assert.ok((await lstat(link)).isSymbolicLink());
    assert.ok((await readFile(join(dir, "vm", "new.ext4"))).equals(ext4Bytes));
  });

  it("refuses an existing directory for a single-file format before any work; --force replaces it", async () => {
    const dir = join(work, "isdir");
    const out = join(dir, "out");
    await mkdir(out, { recursive: true });
    await writeFile(join(out, "keep.txt"), "mine");
    // Checked before the image is even looked up: a missing image is not what fails.
    const early = assertFails(
      await box.kiln(["export", "no-such:1", "--format", "ext4", "-o", out]),
      "INVALID_ARGUMENT",
    );
    assert.match(early, /is a directory/);
    for (const format of ["ext4", "erofs", "cpio"]) {
      assertFails(await box.kiln(["export", ref, "--format", format, "-o", out]), "INVALID_ARGUMENT");
    }
    assert.equal(await readFile(join(out, "keep.txt"), "utf8"), "mine");
    await assertNoTemp(dir);
    const forced = await box.kiln(["export", ref, "--format", "ext4", "--force", "-o", out]);
    assert.equal(forced.code, 0, forced.stderr);
    assert.ok((await readFile(out)).equals(ext4Bytes));

    // Never the filesystem root, even with --force.
    assertFails(
      await box.kiln(["export", "no-such:1", "--format", "erofs-layers", "--force", "-o", "/"]),
      "INVALID_ARGUMENT",
    );
  });

  it("erofs-layers: refuses a non-empty directory and a file, keeps them; takes an empty one", async () => {
    const dir = join(work, "layers");
    const full = join(dir, "full");
    await mkdir(join(full, "sub"), { recursive: true });
    await writeFile(join(full, "keep.txt"), "mine");
    await writeFile(join(full, "sub", "x"), "x");
    const line = assertFails(
      await box.kiln(["export", ref, "--format", "erofs-layers", "-o", full]),
      "INVALID_ARGUMENT",
    );
    assert.match(line, /not empty/);
    assert.deepEqual((await readdir(full)).sort(), ["keep.txt", "sub"]);
    assert.equal(await readFile(join(full, "sub", "x"), "utf8"), "x");

    const file = join(dir, "file");
    await writeFile(file, "a file");
    assertFails(await box.kiln(["export", ref, "--format", "erofs-layers", "-o", file]), "INVALID_ARGUMENT");
    assert.equal(await readFile(file, "utf8"), "a file");
    await assertNoTemp(dir);

    const empty = join(dir, "empty");
    await mkdir(empty);
    const ok = await box.kiln(["export", ref, "--format", "erofs-layers", "-o", empty]);
    assert.equal(ok.code, 0, ok.stderr);
    assert.deepEqual((await readdir(empty)).sort(), ["layer-000.erofs", "layer-001.erofs", "layers.json"]);

    const forced = await box.kiln(["export", ref, "--format", "erofs-layers", "--force", "-o", full]);
    assert.equal(forced.code, 0, forced.stderr);
    assert.deepEqual((await readdir(full)).sort(), ["layer-000.erofs", "layer-001.erofs", "layers.json"]);
  });

  it("pull --format: refused before the pull; a symlink's target gets the image", async () => {
    const dir = join(work, "pull");
    await mkdir(join(dir, "out"), { recursive: true });
    const fresh = await sandbox();
    try {
      assertFails(
        await fresh.kiln(["pull", remote, "--format", "cpio", "-o", join(dir, "out")]),
        "INVALID_ARGUMENT",
      );
      assert.deepEqual(await fresh.json(["images"]), [], "nothing was pulled");
      const link = join(dir, "link");
      await symlink("target.cpio", link);
      const r = await fresh.kiln(["pull", remote, "--format", "cpio", "-o", link]);
      assert.equal(r.code, 0, r.stderr);
      assert.ok((await lstat(link)).isSymbolicLink());
      assert.ok((await readFile(join(dir, "target.cpio"))).equals(cpioBytes));
    } finally {
      await fresh.cleanup();
    }
  });

  it("-o DIR/x with DIR missing names the directory", async () => {
    const missing = join(work, "missing-dir");
    const line = assertFails(
      await box.kiln(["export", ref, "--format", "ext4", "-o", join(missing, "x.ext4")]),
      "NOT_FOUND",
    );
    assert.match(line, /directory .*missing-dir does not exist/);
  });

  it("disk create refuses a non-empty file and keeps its data; --force replaces it", async () => {
    const dir = join(work, "disk");
    await mkdir(dir);
    const lab = join(dir, "lab.ext4");
    await writeFile(lab, "data that matters");
    const line = assertFails(await box.kiln(["disk", "create", "--size", "1M", lab]), "INVALID_ARGUMENT");
    assert.match(line, /not empty.*--force/);
    assert.equal(await readFile(lab, "utf8"), "data that matters");
    await assertNoTemp(dir);

    const forced = await box.kiln(["disk", "create", "--size", "1M", "--force", lab]);
    assert.equal(forced.code, 0, forced.stderr);
    assert.equal((await stat(lab)).size, 1 << 20);
    await run("e2fsck", ["-fn", lab]);

    // An empty file holds nothing to lose.
    const empty = join(dir, "empty.ext4");
    await writeFile(empty, "");
    const r = await box.kiln(["disk", "create", "--size", "1M", empty]);
    assert.equal(r.code, 0, r.stderr);
  });
});
