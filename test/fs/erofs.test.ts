import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { isKilnError } from "../../src/errors.js";
import { pathOf, planLayout } from "../../src/fs/erofs/layout.js";
import { crc32cRaw, SUPER_OFFSET } from "../../src/fs/erofs/superblock.js";
import { writeErofs } from "../../src/fs/erofs/writer.js";
import { type Inode, MemoryContent, newInode, walk } from "../../src/fs/tree.js";
import { fromText, toText } from "../../src/io/bytestring.js";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { diffTrees, type EntryFacts, snapshotTree } from "../helpers/treecompare.js";

const T0 = 1_700_000_000;
const UUID = Buffer.from("00112233445566778899aabbccddeeff", "hex");

/** Deterministic, non-zero, non-repeating-per-block bytes. */
function pattern(size: number, seed: number): Buffer {
  const buf = Buffer.alloc(size);
  let x = seed * 2654435761;
  for (let i = 0; i < size; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    buf[i] = x >>> 24;
  }
  return buf;
}

interface Sample {
  root: Inode;
  content: MemoryContent;
  /** Each regular file's bytes, for the expected snapshot. */
  bytes: Map<Inode, Buffer>;
}

/** A tree with every kind of entry the writer has to get right. */
function sample(): Sample {
  const content = new MemoryContent();
  const bytesOf = new Map<Inode, Buffer>();
  let offset = 0;
  const file = (size: number, fields: Partial<Inode> = {}, bytes = pattern(size, size + 1)): Inode => {
    offset += size + 512;
    const inode = newInode("file", {
      mtime: T0,
      size,
      data: size > 0 ? { layer: 0, offset, stored: size } : undefined,
      ...fields,
    });
    content.set(inode, bytes);
    bytesOf.set(inode, bytes);
    return inode;
  };
  const dir = (fields: Partial<Inode> = {}): Inode => newInode("directory", { mtime: T0, ...fields });
  const root = dir();
  const put = (parent: Inode, name: string, inode: Inode): Inode => {
    parent.entries!.set(name, inode);
    return inode;
  };

  const sizes = put(root, "sizes", dir());
  for (const size of [0, 1, 4095, 4096, 4097, 5 * 1024 * 1024]) put(sizes, `f${size}`, file(size));
  // Zeros in the middle: holes in the output, zeros when read back.
  const zeros = Buffer.alloc(3 * 1024 * 1024);
  zeros[zeros.length - 1] = 7;
  put(sizes, "mostly-zeros", file(zeros.length, {}, zeros));

  const a = put(root, "a", dir({ mode: 0o750, uid: 1000, gid: 1000, mtime: T0 - 10, mtimeNsec: 123456789 }));
  const b = put(a, "b", dir());
  put(b, "c", dir({ mode: 0o1777 }));
  put(b, "deep.txt", file(10, { uid: 70000, gid: 70000 }));

  const many = put(root, "many", dir());
  for (let i = 0; i < 2000; i++)
    put(many, `entry-${String(i).padStart(5, "0")}-${"x".repeat(i % 40)}`, file(i % 3));

  const shared = file(100, { mode: 0o600 });
  put(root, "hard1", shared);
  put(b, "hard2", shared);

  const link = (target: string): Inode =>
    newInode("symlink", { mode: 0o777, mtime: T0, target, size: Buffer.byteLength(target) });
  put(root, "short-link", link("a/b/deep.txt"));
  put(root, "abs-link", link("/etc/passwd"));
  put(root, "long-link", link(`/${"d/".repeat(2046)}e`)); // 4095 bytes: a whole block, not inline
  put(root, "dangling", link("no/such/file"));

  const dev = put(root, "dev", dir());
  put(dev, "null", newInode("char", { mode: 0o666, mtime: T0, rdevMajor: 1, rdevMinor: 3 }));
  put(dev, "nvme", newInode("block", { mode: 0o660, gid: 6, mtime: T0, rdevMajor: 259, rdevMinor: 300000 }));
  put(dev, "fifo", newInode("fifo", { mode: 0o620, mtime: T0 }));

  put(root, "setuid", file(5, { mode: 0o4755 }));
  put(root, "setgid", file(5, { mode: 0o2755, gid: 50 }));
  put(root, "newer", file(7, { mtime: T0 + 86400, mtimeNsec: 999999999 }));
  put(root, "old", file(7, { mtime: 1, mtimeNsec: 5 }));

  const cap = Buffer.from("0100000200200000000000000000000000000000", "hex");
  put(
    root,
    "ping",
    file(16, {
      mode: 0o755,
      xattrs: new Map([
        ["security.capability", cap],
        ["user.binary", Buffer.from([0, 1, 2, 255, 0, 10])],
        ["trusted.overlay.opaque", Buffer.from("y")],
        ["user.long", pattern(3000, 9)],
      ]),
    }),
  );
  put(root, "opaque", dir({ xattrs: new Map([["trusted.overlay.opaque", Buffer.from("y")]]) }));
  // Xattrs that do not fit one block with the inode: the slot spans blocks.
  put(
    root,
    "big-xattrs",
    file(1, {
      xattrs: new Map([
        ["user.a", pattern(5000, 1)],
        ["user.b", pattern(4000, 2)],
      ]),
    }),
  );

  put(root, "n".repeat(255), file(3));
  put(root, fromText("naïve-ünïcödé-名前-😀"), file(4));
  put(root, "-dash", file(1)); // sorts before "."
  // UTF-16 puts a surrogate (U+1F600's first half) before U+E000; UTF-8, the kernel's lookup order, after.
  put(root, fromText("\u{E000}-private"), file(1));
  put(root, fromText("\u{1F600}"), file(1));
  return { root, content, bytes: bytesOf };
}

/** What snapshotTree should report for the tree. */
function expectedFacts(s: Sample): Map<string, EntryFacts> {
  const facts = new Map<string, EntryFacts>();
  const names = new Map<Inode, string[]>();
  for (const item of walk(s.root)) {
    const i = item.inode;
    const f: EntryFacts = {
      type: i.type === "directory" ? "dir" : i.type,
      mode: i.mode,
      uid: i.uid,
      gid: i.gid,
      xattrs: Object.fromEntries([...i.xattrs].sort().map(([k, v]) => [k, `0x${v.toString("hex")}`])),
    };
    if (i.type !== "symlink") f.mtime = i.mtime;
    if (i.type === "file") {
      f.size = i.size;
      f.sha256 = createHash("sha256").update(s.bytes.get(i)!).digest("hex");
    } else if (i.type === "symlink") {
      f.target = i.target;
    } else if (i.type === "char" || i.type === "block") {
      f.rdev = `${i.rdevMajor}:${i.rdevMinor}`;
    }
    // Tree names are byte strings; the mounted tree's are text.
    const path = toText(item.path)!;
    if (i.type !== "directory") names.set(i, [...(names.get(i) ?? []), path]);
    facts.set(path, f);
  }
  for (const list of names.values()) {
    if (list.length < 2) continue;
    const sorted = [...list].sort();
    for (const n of sorted) facts.get(n)!.links = sorted;
  }
  return facts;
}

async function erofsMountable(): Promise<string | undefined> {
  if (process.getuid?.() !== 0) return "not root: cannot loop-mount";
  await run("modprobe", ["erofs"]).catch(() => undefined);
  const fss = await readFile("/proc/filesystems", "utf8");
  return /\berofs\b/.test(fss)
    ? undefined
    : "this kernel cannot mount erofs (not in /proc/filesystems after modprobe)";
}

/** dump.erofs's description of one path: inode size, layout, access mode, nid. */
async function dumpInode(image: string, path: string): Promise<Record<string, string>> {
  const out = await run("dump.erofs", [`--path=${path}`, image]);
  const get = (re: RegExp): string => re.exec(out)?.[1] ?? "";
  return {
    inodeSize: get(/Inode size: (\d+)/),
    layout: get(/Layout: (\d+)/),
    access: get(/Access: (\d+)/),
    xattrSize: get(/Xattr size: (\d+)/),
    size: get(/Size: (\d+)/),
    nid: get(/NID: (\d+)/),
  };
}

describe("EROFS writer", () => {
  let dir: string;
  let s: Sample;
  let expected: Map<string, EntryFacts>;
  let image: string;

  before(async () => {
    dir = await makeTempDir("erofs");
    s = sample();
    expected = expectedFacts(s);
    image = join(dir, "a.erofs");
    const { bytes } = await writeErofs(s.root, s.content, image, { uuid: UUID, volumeName: "kiln-test" });
    assert.equal((await stat(image)).size, bytes);
  });
  after(async () => {
    await removeDir(dir);
  });

  it("passes fsck.erofs, and its extraction equals the tree (xattrs aside: fsck 1.5 does not extract them)", async () => {
    await run("fsck.erofs", [image]);
    const out = join(dir, "extract");
    await run("fsck.erofs", [`--extract=${out}`, image]);
    const actual = await snapshotTree(out, { mtime: true });
    const noXattrs = (m: Map<string, EntryFacts>): Map<string, EntryFacts> =>
      new Map(
        [...m].map(([k, v]) => {
          // fsck.erofs 1.5 extracts each name of a hardlink as its own file, and chowns after
          // chmod, which clears setuid/setgid (the mount test and dump.erofs check those).
          const { links: _links, ...rest } = v;
          return [k, { ...rest, mode: v.type === "file" ? v.mode & ~0o6000 : v.mode, xattrs: {} }];
        }),
      );
    assert.deepEqual(diffTrees(noXattrs(expected), noXattrs(actual)), []);
  });

  it("mounts read-only with the same tree: xattrs, devices, hardlinks, link counts, times", async (t) => {
    const why = await erofsMountable();
    if (why) {
      t.skip(why);
      return;
    }
    const mnt = join(dir, "mnt");
    await mkdir(mnt, { recursive: true });
    await run("mount", ["-t", "erofs", "-o", "loop,ro", image, mnt]);
    try {
      const actual = await snapshotTree(mnt, { mtime: true });
      assert.deepEqual(diffTrees(expected, actual), []);
      const h1 = await stat(join(mnt, "hard1"));
      const h2 = await stat(join(mnt, "a/b/hard2"));
      assert.equal(h1.ino, h2.ino);
      assert.equal(h1.nlink, 2);
      assert.equal((await stat(mnt)).nlink, 2 + 5); // sizes, a, many, dev, opaque
      assert.equal((await stat(join(mnt, "a"))).nlink, 3);
      assert.equal((await stat(join(mnt, "a/b"))).nlink, 3);
      const a = await stat(join(mnt, "a"), { bigint: true });
      assert.equal(a.mtimeNs, BigInt(T0 - 10) * 1_000_000_000n + 123456789n);
      const newer = await stat(join(mnt, "newer"), { bigint: true });
      assert.equal(newer.mtimeNs, BigInt(T0 + 86400) * 1_000_000_000n + 999999999n);
      assert.equal((await run("ls", ["-1", join(mnt, "many")])).trim().split("\n").length, 2000);
      // Lookups go through the kernel's binary search over sorted names.
      assert.ok(existsSync(join(mnt, "many", `entry-01999-${"x".repeat(1999 % 40)}`)));
      assert.ok(existsSync(join(mnt, "-dash")));
    } finally {
      await run("umount", [mnt]);
    }
  });

  it("picks compact inodes where they lose nothing, extended ones otherwise, and inlines tails", async () => {
    const d = (p: string) => dumpInode(image, p);
    // Most common mtime (T0) is the build time: those inodes are compact (32 bytes).
    assert.deepEqual(
      { ...(await d("/sizes/f4097")), nid: "" },
      {
        nid: "",
        inodeSize: "32",
        layout: "2",
        access: "0644",
        xattrSize: "0",
        size: "4097",
      },
    );
    assert.equal((await d("/sizes/f4095")).layout, "0"); // 32 + 4095 > 4096: a block of its own
    assert.equal((await d("/sizes/f4096")).layout, "0");
    assert.equal((await d("/sizes/f1")).layout, "2");
    assert.equal((await d("/newer")).inodeSize, "64"); // its own mtime
    assert.equal((await d("/a")).inodeSize, "64"); // mtime with nsec
    assert.equal((await d("/a/b/deep.txt")).inodeSize, "64"); // uid 70000
    assert.equal((await d("/short-link")).layout, "2");
    assert.equal((await d("/long-link")).layout, "0");
    // dump.erofs prints only the 0777 bits: read i_mode from the image at meta_blkaddr + nid * 32.
    const img = await readFile(image);
    const mode = async (p: string) =>
      img.readUInt16LE(img.readUInt32LE(SUPER_OFFSET + 40) * 4096 + Number((await d(p)).nid) * 32 + 4);
    assert.equal(await mode("/setuid"), 0o104755);
    assert.equal(await mode("/setgid"), 0o102755);
    assert.equal(await mode("/a/b/c"), 0o41777);
    assert.ok(Number((await d("/ping")).xattrSize) > 3000);
  });

  it("places the slots of files with data last, in the order their bytes arrive (one stream with them)", () => {
    const layout = planLayout(s.root);
    const walkOrder = layout.nodes.map((n) => n.inode).filter((i) => i.type === "file" && i.data);
    assert.notDeepEqual(layout.files, walkOrder, "the sample's data order should differ from its walk order");
    const offsets = layout.files.map((i) => layout.byInode.get(i)!.offset);
    assert.equal(offsets[0], layout.filesOffset);
    assert.deepEqual(
      offsets,
      [...offsets].sort((a, b) => a - b),
    );
    const files = new Set(layout.files);
    for (const node of layout.nodes)
      if (!files.has(node.inode))
        assert.ok(node.offset < layout.filesOffset, `/${pathOf(node)} after the files`);
    assert.equal(layout.byInode.get(s.root)!.offset, 32); // nid 1: the root
  });

  it("writes the same bytes twice, and the UUID and volume name where the superblock keeps them", async () => {
    const again = join(dir, "again.erofs");
    const s2 = sample();
    await writeErofs(s2.root, s2.content, again, { uuid: UUID, volumeName: "kiln-test" });
    const [x, y] = [await readFile(image), await readFile(again)];
    assert.ok(x.equals(y), "two writes differ");
    const sb = x.subarray(SUPER_OFFSET, SUPER_OFFSET + 128);
    assert.ok(sb.subarray(48, 64).equals(UUID));
    assert.equal(sb.subarray(64, 80).toString("utf8").replace(/\0+$/, ""), "kiln-test");
    const summary = await run("dump.erofs", [image]);
    assert.match(summary, /UUID:\s+00112233-4455-6677-8899-aabbccddeeff/);
    assert.match(summary, /features:\s+sb_csum/);
  });

  it("computes the superblock checksum as mkfs.erofs does", async () => {
    const src = join(dir, "mkfs-src");
    await mkdir(src, { recursive: true });
    const img = join(dir, "mkfs.erofs");
    await run("mkfs.erofs", ["-T0", "-Uaabbccdd-0000-1111-2222-333344445555", img, src]);
    const block = Buffer.from((await readFile(img)).subarray(0, 4096));
    const stored = block.readUInt32LE(SUPER_OFFSET + 4);
    block.writeUInt32LE(0, SUPER_OFFSET + 4);
    assert.equal(crc32cRaw(0xffffffff, block.subarray(SUPER_OFFSET)), stored);
  });

  it("leaves all-zero blocks as holes of a sparse output", async () => {
    const st = await stat(image);
    // The sample holds a 3 MiB file of zeros but its last byte.
    assert.ok(st.blocks * 512 < st.size - 2 * 1024 * 1024, `allocated ${st.blocks * 512} of ${st.size}`);
  });

  it("writes a valid image without inline file tails too", async () => {
    const s2 = sample();
    const img = join(dir, "noinline.erofs");
    await writeErofs(s2.root, s2.content, img, { uuid: UUID, inlineData: false, buildTime: 5 });
    await run("fsck.erofs", [img]);
    assert.equal((await dumpInode(img, "/sizes/f1")).layout, "0");
    assert.equal((await dumpInode(img, "/sizes/f1")).inodeSize, "64"); // mtime differs from build time 5
    const out = join(dir, "noinline");
    await run("fsck.erofs", [`--extract=${out}`, img]);
    const got = await readFile(join(out, "sizes/f4097"));
    assert.ok(got.equals(s2.bytes.get(s2.root.entries!.get("sizes")!.entries!.get("f4097")!)!));
  });

  it("refuses what EROFS cannot hold, and content that disagrees with the tree", async () => {
    const out = join(dir, "bad.erofs");
    const bad = (root: Inode, content = new MemoryContent(), uuid = UUID) =>
      writeErofs(root, content, out, { uuid });
    const withXattr = newInode("directory");
    const sub = newInode("directory");
    withXattr.entries!.set("d", sub);
    sub.entries!.set("f", newInode("file", { xattrs: new Map([["os2.thing", Buffer.from("x")]]) }));
    await assert.rejects(
      bad(withXattr),
      (e) => isKilnError(e, "UNSUPPORTED_ARCHIVE") && /os2\.thing on \/d\/f\b/.test(e.message),
    );
    const twice = newInode("directory");
    const shared = newInode("directory");
    twice.entries!.set("a", shared);
    twice.entries!.set("b", newInode("directory"));
    twice.entries!.get("b")!.entries!.set("again", shared);
    await assert.rejects(
      bad(twice),
      (e) => isKilnError(e, "INVALID_ARGUMENT") && /directory \/b\/again has a second name/.test(e.message),
    );
    await assert.rejects(bad(newInode("directory"), new MemoryContent(), Buffer.alloc(8)), (e) =>
      isKilnError(e, "INVALID_ARGUMENT"),
    );
    const short = newInode("directory");
    const f = newInode("file", { size: 10, data: { layer: 0, offset: 0, stored: 10 } });
    short.entries!.set("short", f);
    const content = new MemoryContent();
    content.set(f, Buffer.from("abc"));
    await assert.rejects(
      bad(short, content),
      (e) => isKilnError(e, "INVALID_ARCHIVE") && /\/short/.test(e.message),
    );
  });
});
