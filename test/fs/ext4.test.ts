import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdir, open, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { isKilnError, KilnError } from "../../src/errors.js";
import { createEmptyExt4, writeExt4 } from "../../src/fs/ext4/writer.js";
import { type ContentSource, type Inode, MemoryContent, newInode, walk } from "../../src/fs/tree.js";
import { fromText, toText } from "../../src/io/bytestring.js";
import { formatSize } from "../../src/sizes.js";
import { pseudoRandomBytes as bytes } from "../helpers/bytes.js";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { diffTrees, type EntryFacts, snapshotTree } from "../helpers/treecompare.js";

const UUID = Buffer.from("6b696c6e2d657874342d746573742d31", "hex");
const SEED = Buffer.from("0f1e2d3c4b5a69788796a5b4c3d2e1f0", "hex");
const T0 = 1_700_000_000;
const GiB = 2 ** 30;

/** A POSIX ACL in the xattr format getfattr shows (version 2; short entries carry id -1). */
function acl(entries: [tag: number, perm: number, id?: number][]): Buffer {
  const b = Buffer.alloc(4 + entries.length * 8);
  b.writeUInt32LE(2, 0);
  entries.forEach(([tag, perm, id], i) => {
    b.writeUInt16LE(tag, 4 + i * 8);
    b.writeUInt16LE(perm, 6 + i * 8);
    b.writeUInt32LE(id ?? 0xffffffff, 8 + i * 8);
  });
  return b;
}

interface Sample {
  root: Inode;
  content: MemoryContent;
  /** Logical bytes of each file. */
  data: Map<Inode, Buffer>;
}

function sample(): Sample {
  const content = new MemoryContent();
  const data = new Map<Inode, Buffer>();
  let layerOffset = 0;
  const file = (bytesOf: Buffer, fields: Partial<Inode> = {}): Inode => {
    const f = newInode("file", { mtime: T0, size: bytesOf.length, ...fields });
    if (bytesOf.length > 0 && !f.data) f.data = { layer: 0, offset: layerOffset, stored: bytesOf.length };
    layerOffset += bytesOf.length + 512;
    content.set(f, bytesOf);
    data.set(f, bytesOf);
    return f;
  };
  const dir = (fields: Partial<Inode> = {}): Inode => newInode("directory", { mtime: T0, ...fields });
  const root = dir({ mtime: T0 - 1, mtimeNsec: 5 });
  const add = (parent: Inode, name: string, child: Inode): Inode => {
    parent.entries!.set(name, child);
    return child;
  };

  const sizes = add(root, "sizes", dir());
  for (const n of [0, 1, 4095, 4096, 4097]) add(sizes, `f${n}`, file(bytes(n, n)));
  add(sizes, "ten-mib", file(bytes(10 << 20, 10)));
  const zeros = Buffer.alloc(16 << 20);
  zeros.write("head", 0);
  zeros.write("middle", 8 << 20);
  zeros.write("tail", zeros.length - 4);
  add(sizes, "mostly-zeros", file(zeros));
  // A sparse tar entry: 8 data regions of one block, 2 MiB apart → 8 extents, a leaf block.
  const sparseBytes = Buffer.alloc(16 << 20);
  const regions = [];
  for (let i = 0; i < 8; i++) {
    const offset = i * (2 << 20) + 4096;
    bytes(4096, 100 + i).copy(sparseBytes, offset);
    regions.push({ offset, size: 4096 });
  }
  add(
    sizes,
    "sparse",
    file(sparseBytes, { data: { layer: 0, offset: 999_999, stored: 8 * 4096, sparse: regions } }),
  );
  add(sizes, "no-data", newInode("file", { size: 12345, mtime: T0 })); // size but no stored bytes: all hole

  const a = add(root, "a", dir({ mode: 0o750, uid: 1000, gid: 1000 }));
  const b = add(a, "b", dir({ mtime: T0 + 1, mtimeNsec: 999_999_999 }));
  const c = add(b, "c", dir());
  add(
    c,
    "deep.txt",
    file(Buffer.from("deep\n"), { mode: 0o600, uid: 70000, gid: 70001, mtimeNsec: 123_456_789 }),
  );
  const shared = file(Buffer.from("shared by three names\n"), { uid: 42, gid: 43 });
  add(root, "hard1", shared);
  add(b, "hard2", shared);
  add(c, "hard3", shared);

  const perms = add(root, "perms", dir());
  add(perms, "setuid", file(Buffer.from("#!/bin/true\n"), { mode: 0o4755 }));
  add(perms, "setgid", file(Buffer.from("x"), { mode: 0o2711 }));
  add(perms, "sticky", dir({ mode: 0o1777 }));
  add(perms, "old", file(Buffer.from("1969"), { mtime: -86400 * 365, mtimeNsec: 1 }));
  add(perms, "future", file(Buffer.from("2100"), { mtime: 4_102_444_800, mtimeNsec: 7 }));

  const links = add(root, "links", dir());
  add(links, "short", newInode("symlink", { target: "../hard1", size: 8, mtime: T0 }));
  add(links, "abs", newInode("symlink", { target: "/etc/passwd", size: 11, mtime: T0 }));
  const long = `/${"long-target/".repeat(20)}end`;
  add(links, "long", newInode("symlink", { target: long, size: Buffer.byteLength(long), mtime: T0 }));
  const limit = "x".repeat(59); // the longest target that still fits in the inode
  add(links, "fast59", newInode("symlink", { target: limit, size: 59, mtime: T0 }));
  add(links, "slow60", newInode("symlink", { target: `${limit}y`, size: 60, mtime: T0 }));
  add(links, "dangling", newInode("symlink", { target: "no/such/file", size: 12, mtime: T0 }));

  const dev = add(root, "dev", dir());
  add(dev, "null", newInode("char", { mode: 0o666, rdevMajor: 1, rdevMinor: 3, mtime: T0 }));
  add(dev, "sda", newInode("block", { mode: 0o660, gid: 6, rdevMajor: 8, rdevMinor: 0, mtime: T0 }));
  add(dev, "big-minor", newInode("block", { rdevMajor: 259, rdevMinor: 70000, mtime: T0 }));
  add(dev, "big-major", newInode("char", { rdevMajor: 511, rdevMinor: 5, mtime: T0 }));
  add(dev, "fifo", newInode("fifo", { mode: 0o620, mtime: T0 }));
  add(dev, "sock", newInode("socket", { mode: 0o755, mtime: T0 }));

  const x = add(root, "xattrs", dir({ xattrs: new Map([["trusted.overlay.opaque", Buffer.from("y")]]) }));
  const cap = Buffer.from("0000000200200000000000000000000000000000", "hex"); // cap_net_bind_service
  add(
    x,
    "small",
    file(Buffer.from("s"), {
      xattrs: new Map([
        ["security.capability", cap],
        ["user.k", Buffer.from("v")],
        ["user.empty", Buffer.alloc(0)],
      ]),
    }),
  );
  const big = () =>
    new Map([
      ["user.big", bytes(1500, 7)],
      ["user.small", Buffer.from("tiny")],
      ["trusted.md5", Buffer.from("d41d8cd98f00b204e9800998ecf8427e")],
      ["security.selinux", Buffer.from("system_u:object_r:bin_t:s0\0")],
    ]);
  add(x, "big1", file(Buffer.from("b1"), { xattrs: big() }));
  add(x, "big2", file(Buffer.from("b2"), { xattrs: big() })); // same block contents: one shared block
  add(
    x,
    "acl",
    file(Buffer.from("acl"), {
      mode: 0o640,
      xattrs: new Map([
        [
          "system.posix_acl_access",
          acl([
            [1, 6],
            [2, 4, 1000],
            [4, 4],
            [8, 4, 70000],
            [0x10, 4],
            [0x20, 0],
          ]),
        ],
      ]),
    }),
  );
  add(
    x,
    "symlink",
    newInode("symlink", {
      target: "small",
      size: 5,
      xattrs: new Map([["trusted.t", Buffer.from("on a link")]]),
    }),
  );

  const names = add(root, "names", dir());
  add(names, "n".repeat(255), file(Buffer.from("255")));
  add(names, fromText("héllo wörld – 名前 ✓"), file(Buffer.from("utf-8")));
  add(names, "with\nnewline", file(Buffer.from("nl")));

  // 5000 entries: an htree with one index level.
  const many = add(root, "many", dir());
  for (let i = 0; i < 5000; i++) add(many, `entry-${i.toString().padStart(5, "0")}`, file(Buffer.alloc(0)));
  // 9000 long names: more leaves than the root can index → two index levels.
  const wide = add(root, "wide", dir());
  for (let i = 0; i < 9000; i++)
    add(wide, `${i.toString().padStart(5, "0")}-${"w".repeat(234)}`, file(Buffer.alloc(0)));

  add(root, "empty-dir", dir({ mode: 0o700 }));
  return { root, content, data };
}

/** What the mounted image must show: facts in treecompare's form. */
function expectedFacts(s: Sample): Map<string, EntryFacts> {
  const facts = new Map<string, EntryFacts>();
  const names = new Map<Inode, string[]>();
  for (const item of walk(s.root)) {
    const i = item.inode;
    const hex: Record<string, string> = {};
    for (const [k, v] of [...i.xattrs].sort((x, y) => (x[0] < y[0] ? -1 : 1)))
      hex[k] = `0x${v.toString("hex")}`;
    const type = i.type === "directory" ? "dir" : i.type;
    const f: EntryFacts = { type, mode: i.mode, uid: i.uid, gid: i.gid, xattrs: hex };
    // As snapshotTree rounds (Node's bigint mtimeMs, then seconds): truncated toward zero.
    const ns = BigInt(i.mtime) * 1_000_000_000n + BigInt(i.mtimeNsec);
    if (i.type !== "symlink") f.mtime = Number(ns / 1_000_000n / 1000n);
    if (i.type === "file") {
      f.size = i.size;
      f.sha256 = createHash("sha256")
        .update(s.data.get(i) ?? Buffer.alloc(i.size))
        .digest("hex");
    }
    if (i.type === "symlink") f.target = i.target;
    if (i.type === "char" || i.type === "block") f.rdev = `${i.rdevMajor}:${i.rdevMinor}`;
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

/** e2fsck -fn: exit status and output (run() would throw on the non-zero codes we assert on). */
function fsck(image: string): { status: number | null; out: string } {
  const r = spawnSync("e2fsck", ["-fn", image], { encoding: "utf8" });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

function assertClean(image: string): void {
  const { status, out } = fsck(image);
  assert.equal(status, 0, out);
  assert.doesNotMatch(out, /\?|Fix|Clear|invalid|wrong/i, out);
}

const debugfs = (image: string, cmd: string): Promise<string> => run("debugfs", ["-R", cmd, image]);

const canMount = process.getuid?.() === 0;

describe("ext4 writer", () => {
  let dir: string;
  let s: Sample;
  let image: string;
  let mnt: string;
  let mounted = false;

  before(async () => {
    dir = await makeTempDir("ext4");
    s = sample();
    image = join(dir, "a.ext4");
    const r = await writeExt4(s.root, s.content, image, {
      uuid: UUID,
      hashSeed: SEED,
      label: "kiln-test",
      buildTime: T0,
    });
    assert.equal((await stat(image)).size, r.bytes);
    mnt = join(dir, "mnt");
    await mkdir(mnt);
    if (canMount) {
      await run("mount", ["-t", "ext4", "-o", "loop,ro", image, mnt]);
      mounted = true;
    }
  });
  after(async () => {
    if (mounted) await run("umount", [mnt]);
    await removeDir(dir);
  });

  it("passes e2fsck -fn with nothing to report", () => {
    assertClean(image);
  });

  it("has the features, label, UUID and times asked for", async () => {
    const h = await run("dumpe2fs", ["-h", image]);
    assert.match(h, /Filesystem UUID:\s+6b696c6e-2d65-7874-342d-746573742d31/);
    assert.match(h, /Filesystem volume name:\s+kiln-test/);
    assert.match(h, /Directory Hash Seed:\s+0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/);
    assert.match(h, /features:.*\bextent\b.*\bflex_bg\b.*\bmetadata_csum\b/);
    assert.doesNotMatch(h, /has_journal/);
    assert.match(h, /Last write time:\s+Tue Nov 14 22:13:20 2023/);
  });

  it("debugfs reads files, links, devices, xattrs and the htree", async () => {
    assert.equal(await debugfs(image, "cat /a/b/c/deep.txt"), "deep\n");
    const deep = await debugfs(image, "stat /a/b/c/deep.txt");
    assert.match(deep, /User: 70000\s+Group: 70001/);
    assert.match(deep, /mtime: 0x6553f100:1d6f3454/); // T0 and 123456789 ns << 2
    assert.match(await debugfs(image, "stat /links/long"), /EXTENTS/);
    assert.match(await debugfs(image, "stat /links/fast59"), /Fast link dest: "x{59}"/);
    assert.match(await debugfs(image, "stat /dev/big-minor"), /Device major\/minor number: 259:70000/);
    const ea = await debugfs(image, "ea_list /xattrs/big1");
    assert.match(ea, /user\.big \(1500\)/);
    assert.match(await debugfs(image, "stat /many"), /Flags: 0x81000/); // extents + htree
    assert.match(await debugfs(image, "htree_dump /wide"), /Indirect levels: 1/);
    // One shared attribute block for big1 and big2.
    const block = (out: string) => /File ACL: (\d+)/.exec(out)?.[1];
    const b1 = block(await debugfs(image, "stat /xattrs/big1"));
    assert.ok(b1 && b1 !== "0");
    assert.equal(block(await debugfs(image, "stat /xattrs/big2")), b1);
    // A file over 8 extents has a leaf block: depth 1.
    assert.match(await debugfs(image, "ex /sizes/sparse"), /Level Entries.*\n\s*0\/ 1\s+1\/\s*1/);
  });

  it("leaves zero blocks as holes of the image file", async () => {
    const st = await stat(image);
    // 42 MiB of file content, of which 10 MiB random and a few blocks of the 16 MiB zero files
    // are not zero; with ~6 MiB of metadata, anything under 20 MiB means the zeros were skipped.
    assert.ok(st.blocks * 512 < 20 << 20, `image allocates ${st.blocks * 512} bytes`);
  });

  it("mounts read-only with the same tree: types, modes, owners, sizes, content, links, devices, xattrs", async (t) => {
    if (!mounted) return t.skip("not root: cannot loop-mount");
    const actual = await snapshotTree(mnt, { mtime: true, ignore: ["lost+found"] });
    for (const f of actual.values()) f.xattrs = Object.fromEntries(Object.entries(f.xattrs).sort());
    assert.deepEqual(diffTrees(expectedFacts(s), actual), []);
  });

  it("keeps nanosecond times, link counts, and hardlinks as one inode", async (t) => {
    if (!mounted) return t.skip("not root: cannot loop-mount");
    for (const item of walk(s.root)) {
      if (item.inode.type === "symlink") continue;
      const st = await stat(join(mnt, item.path), { bigint: true }).catch(() => undefined);
      if (!st) continue;
      assert.equal(
        st.mtimeNs,
        BigInt(item.inode.mtime) * 1_000_000_000n + BigInt(item.inode.mtimeNsec),
        item.path,
      );
    }
    const h1 = await stat(join(mnt, "hard1"));
    assert.equal(h1.nlink, 3);
    assert.equal((await stat(join(mnt, "a/b/hard2"))).ino, h1.ino);
    assert.equal((await stat(join(mnt, "a/b/c/hard3"))).ino, h1.ino);
    assert.equal((await stat(mnt)).nlink, 2 + 11); // 10 directories of the tree + lost+found
    assert.equal((await stat(join(mnt, "a"))).nlink, 3);
    assert.equal((await stat(join(mnt, "sizes/sparse"))).blocks, 8 * 8 + 8); // data + one leaf block
    assert.equal((await stat(join(mnt, "sizes/no-data"))).blocks, 0);
    const lf = await stat(join(mnt, "lost+found"));
    assert.equal(lf.mode & 0o7777, 0o700);
    assert.equal(lf.size, 16384);
  });

  it("writes byte-identical images for the same tree and options", async () => {
    const again = join(dir, "b.ext4");
    await writeExt4(s.root, s.content, again, {
      uuid: UUID,
      hashSeed: SEED,
      label: "kiln-test",
      buildTime: T0,
    });
    const digest = async (p: string) =>
      createHash("sha256")
        .update(await readFile(p))
        .digest("hex");
    assert.equal(await digest(again), await digest(image));
  });
});

describe("ext4 sizes", () => {
  let dir: string;
  before(async () => {
    dir = await makeTempDir("ext4-size");
  });
  after(async () => {
    await removeDir(dir);
  });

  const small = (): Sample => {
    const content = new MemoryContent();
    const root = newInode("directory");
    const f = newInode("file", { size: 3 << 20, data: { layer: 0, offset: 0, stored: 3 << 20 } });
    content.set(f, bytes(3 << 20, 3));
    root.entries!.set("f", f);
    return { root, content, data: new Map([[f, bytes(3 << 20, 3)]]) };
  };

  it("refuses an exact size too small with TOO_LARGE naming the size needed, and that size works", async () => {
    const s = small();
    const out = join(dir, "exact.ext4");
    let needed = 0;
    await assert.rejects(
      writeExt4(s.root, s.content, out, { uuid: UUID, hashSeed: SEED, size: 2 << 20 }),
      (err: unknown) => {
        assert.ok(isKilnError(err, "TOO_LARGE"));
        needed = (err.details as { needed: number }).needed;
        assert.ok(err.message.endsWith(`needs at least ${formatSize(needed, "up")}`), err.message);
        assert.match(err.message, /^--size 2 MiB is too small/);
        return true;
      },
    );
    assert.ok(needed > 3 << 20 && needed < 4 << 20, `needed ${needed}`);
    const r = await writeExt4(s.root, s.content, out, { uuid: UUID, hashSeed: SEED, size: needed });
    assert.equal(r.bytes, needed);
    assert.equal((await stat(out)).size, needed);
    assertClean(out);
  });

  it("an exact size gives exactly that many bytes, and free/freeInodes add headroom", async () => {
    const s = small();
    const exact = join(dir, "exact2.ext4");
    const r = await writeExt4(s.root, s.content, exact, { uuid: UUID, hashSeed: SEED, size: 300 << 20 });
    assert.deepEqual([r.bytes, r.blocks], [300 << 20, (300 << 20) / 4096]);
    assertClean(exact);
    const plain = await writeExt4(s.root, s.content, join(dir, "p.ext4"), { uuid: UUID, hashSeed: SEED });
    const roomy = await writeExt4(s.root, s.content, join(dir, "r.ext4"), {
      uuid: UUID,
      hashSeed: SEED,
      free: 64 << 20,
      freeInodes: 5000,
    });
    assert.ok(roomy.bytes >= plain.bytes + (64 << 20));
    assert.ok(roomy.inodes >= plain.inodes + 5000);
    assertClean(join(dir, "r.ext4"));
  });

  it("createEmptyExt4 makes a sparse filesystem that mounts read-write and stays clean", async (t) => {
    const out = join(dir, "empty.ext4");
    const r = await createEmptyExt4(out, 1 << 30, { uuid: UUID, hashSeed: SEED, label: "vol" });
    assert.equal(r.bytes, 1 << 30);
    assert.equal(r.inodes, (1 << 30) / 16384);
    assert.ok((await stat(out)).blocks * 512 < 1 << 20);
    assertClean(out);
    if (!canMount) return t.skip("not root: cannot loop-mount");
    const mnt = join(dir, "mnt");
    await mkdir(mnt, { recursive: true });
    await run("mount", ["-t", "ext4", "-o", "loop", out, mnt]);
    try {
      await writeFile(join(mnt, "hello"), "written in the guest\n");
      await mkdir(join(mnt, "d/e"), { recursive: true });
      await writeFile(join(mnt, "d/e/big"), bytes(5 << 20, 9));
    } finally {
      await run("umount", [mnt]);
    }
    assertClean(out);
    assert.equal(await debugfs(out, "cat /hello"), "written in the guest\n");
  });
});

describe("ext4 writable images", () => {
  let dir: string;
  before(async () => {
    dir = await makeTempDir("ext4-rw");
  });
  after(async () => {
    await removeDir(dir);
  });

  it("a written tree with free space takes new files, htree inserts and xattr changes, and stays clean", async (t) => {
    const root = newInode("directory");
    const content = new MemoryContent();
    const many = newInode("directory");
    root.entries!.set("many", many);
    for (let i = 0; i < 5000; i++) many.entries!.set(`n${i}`, newInode("file"));
    const shared = () => new Map([["user.blob", bytes(1000, 1)]]);
    for (const name of ["x1", "x2"]) {
      const f = newInode("file", { size: 2, data: { layer: 0, offset: 0, stored: 2 }, xattrs: shared() });
      content.set(f, Buffer.from(name));
      root.entries!.set(name, f);
    }
    const out = join(dir, "rw.ext4");
    await writeExt4(root, content, out, { uuid: UUID, hashSeed: SEED, free: 32 << 20, freeInodes: 4000 });
    assertClean(out);
    if (!canMount) return t.skip("not root: cannot loop-mount");
    const mnt = join(dir, "mnt");
    await mkdir(mnt, { recursive: true });
    await run("mount", ["-t", "ext4", "-o", "loop", out, mnt]);
    try {
      for (let i = 0; i < 3000; i++) await writeFile(join(mnt, "many", `added-${i}`), "");
      await run("rm", ["-f", ...Array.from({ length: 100 }, (_, i) => join(mnt, "many", `n${i * 7}`))]);
      await run("setfattr", ["-n", "user.blob", "-v", "0x00", join(mnt, "x1")]); // shared block: copy on write
      await writeFile(join(mnt, "x2"), bytes(3 << 20, 2));
    } finally {
      await run("umount", [mnt]);
    }
    assertClean(out);
    assert.match(await debugfs(out, "ea_list /x2"), /user\.blob \(1000\)/);
    assert.match(await debugfs(out, "ls /many"), /added-2999/);
  });
});

/** Zeros, lazily: a 5 GiB file without 5 GiB in memory, with a marker near the end. */
class BigZeros implements ContentSource {
  constructor(
    readonly marker: Buffer,
    readonly markerAt: number,
  ) {}
  async *contents(files: readonly Inode[]): AsyncIterable<{ inode: Inode; data: AsyncIterable<Buffer> }> {
    const { marker, markerAt } = this;
    for (const inode of files) {
      yield {
        inode,
        data: (async function* () {
          const chunk = Buffer.alloc(4 << 20);
          for (let pos = 0; pos < inode.size; pos += chunk.length) {
            const n = Math.min(chunk.length, inode.size - pos);
            if (markerAt >= pos && markerAt < pos + n) {
              const c = Buffer.alloc(n);
              marker.copy(c, markerAt - pos);
              yield c;
            } else yield chunk.subarray(0, n);
          }
        })(),
      };
    }
  }
}

describe("ext4 large files", () => {
  let dir: string;
  before(async () => {
    dir = await makeTempDir("ext4-large");
  });
  after(async () => {
    await removeDir(dir);
  });

  it("stores a 5 GiB file (64-bit size, 40 extents: a leaf block)", async (t) => {
    const size = 5 * GiB + 123;
    const markerAt = 4 * GiB + 4096 * 3 + 1;
    const marker = Buffer.from("beyond 4 GiB");
    const root = newInode("directory");
    const f = newInode("file", { size, uid: 70000, data: { layer: 0, offset: 0, stored: size } });
    root.entries!.set("big", f);
    const out = join(dir, "big.ext4");
    await writeExt4(root, new BigZeros(marker, markerAt), out, { uuid: UUID, hashSeed: SEED });
    assertClean(out);
    assert.match(await debugfs(out, "stat /big"), new RegExp(`Size: ${size}\\b`));
    if (!canMount) return t.skip("not root: cannot loop-mount");
    const mnt = join(dir, "mnt");
    await mkdir(mnt, { recursive: true });
    await run("mount", ["-t", "ext4", "-o", "loop,ro", out, mnt]);
    try {
      const st = await stat(join(mnt, "big"));
      assert.equal(st.size, size);
      const fh = await open(join(mnt, "big"));
      try {
        const buf = Buffer.alloc(marker.length);
        await fh.read(buf, 0, buf.length, markerAt);
        assert.deepEqual(buf, marker);
      } finally {
        await fh.close();
      }
    } finally {
      await run("umount", [mnt]);
    }
  });
});

describe("ext4 journal", () => {
  let dir: string;
  before(async () => {
    dir = await makeTempDir("ext4-journal");
  });
  after(async () => {
    await removeDir(dir);
  });

  const tree = (): { root: Inode; content: MemoryContent } => {
    const content = new MemoryContent();
    const root = newInode("directory", { mtime: T0 });
    const f = newInode("file", { size: 1 << 20, mtime: T0, data: { layer: 0, offset: 0, stored: 1 << 20 } });
    content.set(f, bytes(1 << 20, 5));
    root.entries!.set("f", f);
    return { root, content };
  };
  const opts = { uuid: UUID, hashSeed: SEED, buildTime: T0 };

  it("a journaled image is clean, shows its journal, and two writes are byte-identical", async () => {
    const { root, content } = tree();
    const a = join(dir, "j1.ext4");
    const r = await writeExt4(root, content, a, { ...opts, journal: true });
    assertClean(a);
    const h = await run("dumpe2fs", ["-h", a]);
    assert.match(h, /features:.*\bhas_journal\b/);
    assert.match(h, /Journal inode:\s+8\b/);
    assert.match(h, /Journal size:\s+4096k/i); // mke2fs's default below 128 MiB: 1024 blocks
    assert.match(h, /Journal start:\s+0\b/);
    assert.match(h, /Journal features:.*journal_checksum_v3/);
    assert.match(await debugfs(a, "logdump"), /Journal starts at block 0, transaction 1/); // clean: nothing to replay
    assert.match(await debugfs(a, "stat <8>"), /Type: regular\s+Mode:\s+0600[\s\S]*Size: 4194304\b/);
    // The journal's blocks count: a journaled image is 4 MiB bigger than a plain one.
    const plain = await writeExt4(root, content, join(dir, "plain.ext4"), opts);
    assert.equal(r.blocks - plain.blocks, 1024);
    // Its zero blocks are holes.
    assert.ok((await stat(a)).blocks * 512 < 2 << 20);
    const b = join(dir, "j2.ext4");
    await writeExt4(root, content, b, { ...opts, journal: true });
    assert.ok((await readFile(a)).equals(await readFile(b)));
  });

  it("sizes the journal for the filesystem, or as asked; it counts in an exact size", async () => {
    const { root, content } = tree();
    const big = join(dir, "big.ext4");
    await writeExt4(root, content, big, { ...opts, size: 2 * GiB, journal: true });
    assertClean(big);
    assert.match(await run("dumpe2fs", ["-h", big]), /Total journal blocks:\s+16384\b/); // 2 GiB: 64 MiB
    // 600 MiB: 5 extents, so an extent leaf block.
    const asked = join(dir, "asked.ext4");
    await writeExt4(root, content, asked, { ...opts, journal: { size: 600 << 20 } });
    assertClean(asked);
    assert.match(await run("dumpe2fs", ["-h", asked]), /Total journal blocks:\s+153600\b/);
    assert.match(await debugfs(asked, "ex <8>"), /Level Entries.*\n\s*0\/ 1\s+1\/\s*1/);
    let needed = 0;
    await assert.rejects(
      writeExt4(root, content, join(dir, "small.ext4"), { ...opts, size: 4 << 20, journal: true }),
      (err: unknown) => {
        assert.ok(isKilnError(err, "TOO_LARGE"));
        needed = (err.details as { needed: number }).needed;
        return true;
      },
    );
    assert.ok(needed > 5 << 20, `needed ${needed}`); // 1 MiB of data and 4 MiB of journal
    const exact = join(dir, "exact.ext4");
    await writeExt4(root, content, exact, { ...opts, size: needed, journal: true });
    assertClean(exact);
    await assert.rejects(
      writeExt4(root, content, join(dir, "tiny.ext4"), { ...opts, journal: { size: 1 << 20 } }),
      (err: unknown) => isKilnError(err, "INVALID_ARGUMENT"),
    );
  });

  it("mounts read-write, takes writes through the journal, and e2fsck is clean after", async (t) => {
    const { root, content } = tree();
    const out = join(dir, "rw.ext4");
    await writeExt4(root, content, out, { ...opts, free: 16 << 20, journal: true });
    if (!canMount) return t.skip("not root: cannot loop-mount");
    const mnt = join(dir, "mnt");
    await mkdir(mnt, { recursive: true });
    await run("mount", ["-t", "ext4", "-o", "loop", out, mnt]);
    try {
      await writeFile(join(mnt, "new"), "journaled\n");
      await mkdir(join(mnt, "d/e"), { recursive: true });
      await writeFile(join(mnt, "d/e/big"), bytes(5 << 20, 11));
      await run("rm", [join(mnt, "f")]);
    } finally {
      await run("umount", [mnt]);
    }
    assertClean(out);
    assert.equal(await debugfs(out, "cat /new"), "journaled\n");
    assert.match(await debugfs(out, "logdump"), /Journal starts at block \d+, transaction \d+/);
  });
});

describe("ext4 content failures", () => {
  let dir: string;
  before(async () => {
    dir = await makeTempDir("ext4-fail");
  });
  after(async () => {
    await removeDir(dir);
  });

  it("refuses a file with more hard links than ext4 counts (65000), naming it", async () => {
    const root = newInode("directory");
    const f = newInode("file", { size: 0 });
    for (let i = 0; i <= 65000; i++) root.entries!.set(`l${i}`, f);
    await assert.rejects(
      writeExt4(root, new MemoryContent(), join(dir, "links.ext4"), { uuid: UUID, hashSeed: SEED }),
      (err: unknown) =>
        isKilnError(err, "UNSUPPORTED_ARCHIVE") && /\/l\d+: more than 65000 hard links/.test(err.message),
    );
  });

  it("a content source that fails mid-file fails the write with its own error, metadata written beside or not", async () => {
    // Thousands of directories: their metadata is being encoded while the file data is written.
    const root = newInode("directory");
    const files: Inode[] = [];
    for (let i = 0; i < 4000; i++) {
      const d = newInode("directory");
      const f = newInode("file", { size: 8192, data: { layer: 0, offset: i, stored: 8192 } });
      d.entries!.set("f", f);
      root.entries!.set(`d${i}`, d);
      files.push(f);
    }
    const broken = files[files.length >> 1]!;
    const content: ContentSource = {
      async *contents(wanted) {
        for (const inode of wanted) {
          yield {
            inode,
            data: (async function* () {
              yield bytes(4096, 1);
              if (inode === broken) throw new KilnError("INVALID_ARCHIVE", "layer 1 is corrupt");
              yield bytes(4096, 2);
            })(),
          };
        }
      },
    };
    await assert.rejects(
      writeExt4(root, content, join(dir, "broken.ext4"), { uuid: UUID, hashSeed: SEED }),
      (err: unknown) => isKilnError(err, "INVALID_ARCHIVE") && /layer 1 is corrupt/.test(err.message),
    );
  });
});
