import assert from "node:assert/strict";
import { readFile, truncate, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { isKilnError } from "../../src/errors.js";
import { type Inode, linkCounts, walk } from "../../src/fs/tree.js";
import { fromText, showBytes } from "../../src/io/bytestring.js";
import {
  buildLayerTree,
  type LayerEntry,
  OVERLAY_OPAQUE_XATTR,
  openLayerTree,
  TreeBuilder,
} from "../../src/layers/merge.js";
import { classifyName, cleanPath } from "../../src/layers/paths.js";
import {
  type EntryType,
  entryDataSize,
  HeaderAssembler,
  isMetaEntry,
  paddedSize,
  parseHeaderBlock,
  type SparseInfo,
  type TarHeader,
} from "../../src/tar/header.js";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { writeLayerTar } from "../helpers/layers.js";

const FIXED = 1_600_000_000;
const T = 1_700_000_000;

interface Spec {
  type?: EntryType;
  typeflag?: string;
  mode?: number;
  uid?: number;
  gid?: number;
  size?: number;
  mtime?: number;
  mtimeNsec?: number;
  link?: string;
  devmajor?: number;
  devminor?: number;
  xattrs?: Record<string, Buffer | string>;
  sparse?: SparseInfo;
  offset?: number;
  stored?: number;
  extents?: { offset: number; size: number }[];
}

const TYPEFLAGS: Partial<Record<EntryType, string>> = {
  file: "0",
  hardlink: "1",
  symlink: "2",
  char: "3",
  block: "4",
  directory: "5",
  fifo: "6",
};

/** A TarHeader as the reader would deliver it; directories by a trailing slash. */
function e(path: string, s: Spec = {}): LayerEntry {
  const type = s.type ?? (path.endsWith("/") ? "directory" : "file");
  const header: TarHeader = {
    // Headers carry names as byte strings (the tar reader's fromText of text).
    path: fromText(path),
    linkpath: fromText(s.link ?? ""),
    typeflag: s.typeflag ?? TYPEFLAGS[type] ?? "?",
    type,
    mode: s.mode ?? (type === "directory" ? 0o755 : 0o644),
    uid: s.uid ?? 0,
    gid: s.gid ?? 0,
    size: s.size ?? 0,
    mtime: s.mtime ?? T,
    mtimeNsec: s.mtimeNsec ?? 0,
    uname: "",
    gname: "",
    devmajor: s.devmajor ?? 0,
    devminor: s.devminor ?? 0,
    xattrs: new Map(Object.entries(s.xattrs ?? {}).map(([k, v]) => [k, Buffer.from(v)])),
    pax: new Map(),
    sparse: s.sparse,
    format: "ustar",
  };
  return { header, offset: s.offset ?? 0, stored: s.stored ?? s.size ?? 0, sparse: s.extents };
}

/** A file entry with a recognizable data offset. */
function f(path: string, offset: number, s: Spec = {}): LayerEntry {
  return e(path, { size: 10, offset, ...s });
}

async function merge(...layers: LayerEntry[][]): Promise<Inode> {
  const b = new TreeBuilder({ fixedTime: FIXED });
  for (const [i, l] of layers.entries()) await b.addLayer(i, l);
  return b.finish();
}

/** The inode at `path` (text: tree names are its UTF-8 bytes as byte strings). */
function at(root: Inode, path: string): Inode | undefined {
  let node: Inode | undefined = root;
  for (const c of fromText(path).split("/").filter(Boolean)) node = node?.entries?.get(c);
  return node;
}

function get(root: Inode, path: string): Inode {
  const n = at(root, path);
  assert.ok(n, `${path} should exist`);
  return n;
}

/** Every path with a short description, for whole-tree comparisons (names shown as text). */
function listing(root: Inode): string[] {
  return [...walk(root)]
    .filter((w) => w.path !== "")
    .map((w) => {
      const n = w.inode;
      const path = showBytes(w.path);
      if (n.type === "file") return `${path} file@${n.data ? `${n.data.layer}:${n.data.offset}` : "-"}`;
      if (n.type === "symlink") return `${path} -> ${showBytes(n.target)}`;
      return `${path} ${n.type}`;
    });
}

async function rejects(p: Promise<unknown>, code: string, ...fragments: string[]): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(isKilnError(err), `expected a KilnError, got ${err}`);
    assert.equal(err.code, code, err.message);
    for (const frag of fragments)
      assert.ok(err.message.includes(frag), `"${err.message}" should name ${frag}`);
    return true;
  });
}

describe("cleanPath", () => {
  test("strips ./ and /, resolves . and .. without leaving the root", () => {
    assert.deepEqual(cleanPath("./a//b/./../c/"), ["a", "c"]);
    assert.deepEqual(cleanPath("/abs/path"), ["abs", "path"]);
    assert.deepEqual(cleanPath("../../etc/x"), ["etc", "x"]);
    assert.deepEqual(cleanPath("a/../../../b"), ["b"]);
    assert.deepEqual(cleanPath("./"), []);
    assert.deepEqual(cleanPath(".."), []);
    assert.deepEqual(cleanPath("..."), ["..."]);
  });

  test("NUL bytes and over-long components are INVALID_ARCHIVE", () => {
    assert.throws(
      () => cleanPath("a\0b"),
      (err) => isKilnError(err, "INVALID_ARCHIVE"),
    );
    assert.throws(
      () => cleanPath(`d/${"x".repeat(256)}`),
      (err) => isKilnError(err, "INVALID_ARCHIVE"),
    );
    assert.deepEqual(cleanPath(fromText(`d/${"é".repeat(127)}`)).length, 2); // 254 bytes
    assert.throws(
      () => cleanPath(fromText(`d/${"é".repeat(128)}`)), // 256 bytes
      (err) => isKilnError(err, "INVALID_ARCHIVE"),
    );
  });

  test("classifyName", () => {
    assert.deepEqual(classifyName(".wh.foo"), { kind: "whiteout", target: "foo" });
    assert.deepEqual(classifyName(".wh..wh..opq"), { kind: "opaque" });
    assert.deepEqual(classifyName(".wh..wh.plnk"), { kind: "meta" });
    assert.deepEqual(classifyName("x.wh.foo"), { kind: "plain" });
  });
});

describe("one layer", () => {
  test("keeps types, modes, owners, times, devices, symlink targets, xattrs as bytes, long names", async () => {
    const cap = Buffer.from([0x01, 0x00, 0x00, 0x02, 0xff, 0x00, 0x20, 0x00]);
    const long = `deep/${"n".repeat(120)}/${"ü".repeat(100)}`;
    const root = await merge([
      e("bin/", { mode: 0o1777, uid: 70000, gid: 4_000_000_000 }),
      f("bin/su", 512, {
        mode: 0o104755,
        size: 10,
        stored: 10,
        mtimeNsec: 123456789,
        xattrs: { "security.capability": cap },
      }),
      e("bin/sgid", { mode: 0o2755, size: 0 }),
      e("bin/abs", { type: "symlink", link: "/usr/bin/env", mode: 0o644 }),
      e("bin/rel", { type: "symlink", link: "../lib/x" }),
      e("bin/dangling", { type: "symlink", link: "nowhere/at/all" }),
      e("dev/null", { type: "char", devmajor: 1, devminor: 3, mode: 0o666 }),
      e("dev/sda", { type: "block", devmajor: 8, devminor: 0, mode: 0o660, gid: 6 }),
      e("run/fifo", { type: "fifo", mode: 0o600 }),
      f(long, 4096),
    ]);
    const bin = get(root, "bin");
    assert.equal(bin.type, "directory");
    assert.deepEqual([bin.mode, bin.uid, bin.gid], [0o1777, 70000, 4_000_000_000]);
    const su = get(root, "bin/su");
    assert.deepEqual([su.type, su.mode, su.size, su.mtime, su.mtimeNsec], ["file", 0o4755, 10, T, 123456789]);
    assert.deepEqual(su.data, { layer: 0, offset: 512, stored: 10, sparse: undefined });
    assert.ok(su.xattrs.get("security.capability")!.equals(cap));
    const sgid = get(root, "bin/sgid");
    assert.deepEqual([sgid.mode, sgid.size, sgid.data], [0o2755, 0, undefined]);
    const abs = get(root, "bin/abs");
    assert.deepEqual([abs.type, abs.target, abs.size, abs.mode], ["symlink", "/usr/bin/env", 12, 0o777]);
    assert.equal(get(root, "bin/rel").target, "../lib/x");
    assert.equal(get(root, "bin/dangling").target, "nowhere/at/all");
    const nul = get(root, "dev/null");
    assert.deepEqual([nul.type, nul.rdevMajor, nul.rdevMinor, nul.mode], ["char", 1, 3, 0o666]);
    const sda = get(root, "dev/sda");
    assert.deepEqual([sda.type, sda.rdevMajor, sda.rdevMinor, sda.gid], ["block", 8, 0, 6]);
    assert.equal(get(root, "run/fifo").type, "fifo");
    assert.equal(get(root, long).data?.offset, 4096);
  });

  test("missing parents are 0755 root:root at the fixed time, the root too", async () => {
    const root = await merge([f("a/b/c/file", 0, { uid: 5, gid: 5, mtime: T })]);
    for (const p of ["", "a", "a/b", "a/b/c"]) {
      const d = get(root, p);
      assert.deepEqual(
        [d.type, d.mode, d.uid, d.gid, d.mtime, d.mtimeNsec],
        ["directory", 0o755, 0, 0, FIXED, 0],
        p,
      );
    }
  });

  test("a directory entry after its children gives the directory its metadata", async () => {
    const root = await merge([f("a/x", 0), e("a/", { mode: 0o700, uid: 9, mtime: 42 })]);
    const a = get(root, "a");
    assert.deepEqual([a.mode, a.uid, a.mtime], [0o700, 9, 42]);
    assert.deepEqual([...a.entries!.keys()], ["x"]);
  });

  test("the same path twice: the later entry wins", async () => {
    const root = await merge([
      f("x", 100),
      f("x", 700, { mode: 0o600 }),
      e("d/", { mode: 0o700 }),
      e("d/", { mode: 0o711 }),
    ]);
    assert.deepEqual([get(root, "x").data?.offset, get(root, "x").mode], [700, 0o600]);
    assert.equal(get(root, "d").mode, 0o711);
  });

  test("entries naming the root are ignored; a root-resolving file is refused", async () => {
    const root = await merge([e("./", { mode: 0o700, uid: 1000 }), e("/", { mode: 0o777 }), f("x", 0)]);
    assert.deepEqual([root.mode, root.uid, root.mtime], [0o755, 0, FIXED]);
    await rejects(merge([f("..", 0)]), "INVALID_ARCHIVE", '".."');
  });

  test("traversal and absolute names land inside the root", async () => {
    const root = await merge([f("../../etc/x", 0), f("/abs/path", 10), f("./a/../b", 20)]);
    assert.deepEqual(listing(root), [
      "abs directory",
      "abs/path file@0:10",
      "b file@0:20",
      "etc directory",
      "etc/x file@0:0",
    ]);
  });

  test("a NUL in a name or a symlink target is INVALID_ARCHIVE", async () => {
    await rejects(merge([f("a\0b", 0)]), "INVALID_ARCHIVE", "NUL");
    await rejects(merge([e("s", { type: "symlink", link: "a\0b" })]), "INVALID_ARCHIVE", '"s"', "NUL");
    await rejects(merge([e("s", { type: "symlink", link: "" })]), "INVALID_ARCHIVE", "empty target");
  });

  test("unknown entry types are UNSUPPORTED_ARCHIVE; meta entries are skipped", async () => {
    await rejects(merge([e("vol", { type: "other", typeflag: "V" })]), "UNSUPPORTED_ARCHIVE", '"vol"', '"V"');
    const root = await merge([e("g", { type: "pax-global", typeflag: "g" }), f("x", 0)]);
    assert.deepEqual(listing(root), ["x file@0:0"]);
  });

  test("accepts async iterables", async () => {
    const b = new TreeBuilder({ fixedTime: FIXED });
    await b.addLayer(
      0,
      (async function* () {
        yield f("x", 1);
        yield f("y/z", 2);
      })(),
    );
    assert.deepEqual(listing(b.finish()), ["x file@0:1", "y directory", "y/z file@0:2"]);
  });
});

describe("symlinks are never followed", () => {
  test("an entry through a symlink of the same layer is INVALID_ARCHIVE, nothing lands in etc", async () => {
    const b = new TreeBuilder({ fixedTime: FIXED });
    await b.addLayer(0, [e("etc/"), f("etc/passwd", 0)]);
    await rejects(
      b.addLayer(1, [e("a", { type: "symlink", link: "/etc" }), f("a/passwd", 99)]),
      "INVALID_ARCHIVE",
      "layer 1",
      '"a/passwd"',
      "symlink",
    );
  });

  test("through a symlink of a lower layer too (also via .. in the symlink target)", async () => {
    const lower = [e("etc/"), f("etc/passwd", 0), e("a", { type: "symlink", link: "../../etc" })];
    await rejects(
      merge(lower, [f("a/passwd", 99)]),
      "INVALID_ARCHIVE",
      "layer 1",
      '"a/passwd"',
      "lower layer",
    );
    await rejects(merge(lower, [e("a/.wh.passwd")]), "INVALID_ARCHIVE", '"a/.wh.passwd"');
  });

  test("below a regular file of the same layer", async () => {
    await rejects(merge([f("f", 0), f("f/x", 10)]), "INVALID_ARCHIVE", '"f/x"', "file");
  });

  test("an explicit directory replacing the lower symlink is fine", async () => {
    const root = await merge(
      [e("etc/"), f("etc/passwd", 0), e("a", { type: "symlink", link: "/etc" })],
      [e("a/"), f("a/passwd", 99)],
    );
    assert.deepEqual(listing(root), [
      "a directory",
      "a/passwd file@1:99",
      "etc directory",
      "etc/passwd file@0:0",
    ]);
  });
});

describe("replacements across layers", () => {
  test("a file replaced by a directory, a directory by a symlink (its subtree goes)", async () => {
    const root = await merge(
      [f("x", 0), e("d/"), f("d/a", 10), e("d/sub/"), f("d/sub/b", 20)],
      [e("x/", { mode: 0o700 }), f("x/in", 30), e("d", { type: "symlink", link: "x" })],
    );
    assert.deepEqual(listing(root), ["d -> x", "x directory", "x/in file@1:30"]);
    assert.equal(get(root, "x").mode, 0o700);
  });

  test("a directory over a directory updates metadata, replaces xattrs, keeps children", async () => {
    const root = await merge(
      [e("d/", { mode: 0o755, xattrs: { "user.old": "1" } }), f("d/a", 0)],
      [e("d/", { mode: 0o750, uid: 3, mtime: 77, xattrs: { "user.new": "2" } }), f("d/b", 5)],
    );
    const d = get(root, "d");
    assert.deepEqual([d.mode, d.uid, d.mtime, [...d.xattrs.keys()]], [0o750, 3, 77, ["user.new"]]);
    assert.deepEqual(listing(root), ["d directory", "d/a file@0:0", "d/b file@1:5"]);
  });

  test("an upper layer's missing parent keeps the lower directory's metadata", async () => {
    const root = await merge([e("d/", { mode: 0o700, uid: 1000, mtime: 5 })], [f("d/new", 0)]);
    const d = get(root, "d");
    assert.deepEqual([d.mode, d.uid, d.mtime], [0o700, 1000, 5]);
  });

  test("layers must come bottom first", async () => {
    const b = new TreeBuilder({ fixedTime: FIXED });
    await b.addLayer(1, []);
    assert.throws(
      () => b.openLayer(0),
      (err) => isKilnError(err, "INTERNAL"),
    );
  });
});

describe("whiteouts", () => {
  const lower = [
    e("etc/"),
    f("etc/a", 0),
    f("etc/b", 10),
    e("d/"),
    e("d/sub/"),
    f("d/sub/x", 20),
    f("d/y", 30),
  ];

  test("a file whiteout removes the file; the whiteout itself never appears", async () => {
    const root = await merge(lower, [e("etc/.wh.a")]);
    assert.deepEqual(
      listing(root).filter((l) => l.startsWith("etc")),
      ["etc directory", "etc/b file@0:10"],
    );
  });

  test("a directory whiteout removes the subtree", async () => {
    const root = await merge(lower, [e(".wh.d")]);
    assert.deepEqual(listing(root), ["etc directory", "etc/a file@0:0", "etc/b file@0:10"]);
  });

  test("a whiteout does not hide entries of its own layer, before or after it", async () => {
    const root = await merge(lower, [f("etc/a", 40), e("etc/.wh.a"), e("etc/.wh.b"), f("etc/b", 50)]);
    assert.deepEqual(
      listing(root).filter((l) => l.startsWith("etc")),
      ["etc directory", "etc/a file@1:40", "etc/b file@1:50"],
    );
  });

  test("a whiteout then a new directory of the same name: lower children are gone", async () => {
    const root = await merge(lower, [e(".wh.d"), f("d/new", 60)]);
    assert.deepEqual(
      listing(root).filter((l) => l.startsWith("d")),
      ["d directory", "d/new file@1:60"],
    );
    assert.equal(get(root, "d").mtime, FIXED); // a new implicit directory, not the lower one
  });

  test("an opaque marker hides lower entries, before or after its siblings in the tar", async () => {
    for (const layer of [
      [e("d/"), e("d/.wh..wh..opq"), f("d/z", 70)],
      [e("d/"), f("d/z", 70), e("d/.wh..wh..opq")],
      [f("d/z", 70), e("d/.wh..wh..opq")],
    ]) {
      const root = await merge(lower, layer);
      assert.deepEqual(
        listing(root).filter((l) => l.startsWith("d")),
        ["d directory", "d/z file@1:70"],
      );
    }
  });

  test("an opaque marker only acts below its directory; its directory is created if missing", async () => {
    const root = await merge(lower, [e("d/sub/.wh..wh..opq"), e("new/.wh..wh..opq")]);
    assert.deepEqual(listing(root), [
      "d directory",
      "d/sub directory",
      "d/y file@0:30",
      "etc directory",
      "etc/a file@0:0",
      "etc/b file@0:10",
      "new directory",
    ]);
  });

  test("aufs metadata is skipped, its files still serve as hardlink targets", async () => {
    const root = await merge([
      e(".wh..wh.plnk/"),
      f(".wh..wh.plnk/1234.5", 80),
      e("x", { type: "hardlink", link: ".wh..wh.plnk/1234.5" }),
      e("d/.wh..wh.aufs"),
    ]);
    assert.deepEqual(listing(root), ["x file@0:80"]);
  });

  test("bad whiteout names are INVALID_ARCHIVE", async () => {
    await rejects(merge([e("d/.wh.")]), "INVALID_ARCHIVE", '"d/.wh."');
    await rejects(merge([e("d/.wh..")]), "INVALID_ARCHIVE", "whiteout");
    await rejects(merge([f(".wh.d/x", 0)]), "INVALID_ARCHIVE", '".wh.d/x"');
  });
});

describe("hardlinks", () => {
  test("all names share one inode with the target's metadata, not the link header's", async () => {
    const root = await merge([
      f("bin/busybox", 512, { mode: 0o4755, uid: 7, xattrs: { "user.k": "v" }, mtime: 11 }),
      e("bin/sh", { type: "hardlink", link: "./bin/busybox", mode: 0o600, uid: 99, mtime: 22 }),
      e("usr/ls", { type: "hardlink", link: "/bin/busybox", mode: 0o600 }),
    ]);
    const bb = get(root, "bin/busybox");
    assert.equal(get(root, "bin/sh"), bb);
    assert.equal(get(root, "usr/ls"), bb);
    assert.deepEqual([bb.mode, bb.uid, bb.mtime, bb.data?.offset], [0o4755, 7, 11, 512]);
    assert.equal(linkCounts(root).get(bb), 3);
  });

  test("a hardlink to a file of a lower layer (containerd allows it)", async () => {
    const root = await merge([f("a", 0)], [e("b", { type: "hardlink", link: "a" })]);
    assert.equal(get(root, "a"), get(root, "b"));
  });

  test("a hardlink keeps the lower content when an upper layer replaces or whites out its target", async () => {
    const root = await merge(
      [
        f("a", 100),
        e("b", { type: "hardlink", link: "a" }),
        f("c", 200),
        e("d", { type: "hardlink", link: "c" }),
      ],
      [f("a", 300), e(".wh.c")],
    );
    assert.deepEqual(listing(root), ["a file@1:300", "b file@0:100", "d file@0:200"]);
  });

  test("in one layer, replacing the target after the link keeps the link on the old inode", async () => {
    const root = await merge([f("a", 100), e("b", { type: "hardlink", link: "a" }), f("a", 300)]);
    assert.deepEqual(listing(root), ["a file@0:300", "b file@0:100"]);
  });

  test("a hardlink to a lower file this layer has whited out or replaced is missing", async () => {
    await rejects(
      merge([f("a", 0)], [e(".wh.a"), e("b", { type: "hardlink", link: "a" })]),
      "INVALID_ARCHIVE",
      '"b"',
      '"a"',
    );
    await rejects(
      merge(
        [e("d/"), f("d/a", 0)],
        [e("d", { type: "symlink", link: "x" }), e("b", { type: "hardlink", link: "d/a" })],
      ),
      "INVALID_ARCHIVE",
      '"d/a"',
    );
    // Before the whiteout in the tar, the lower file is still there.
    const root = await merge([f("a", 0)], [e("b", { type: "hardlink", link: "a" }), e(".wh.a")]);
    assert.deepEqual(listing(root), ["b file@0:0"]);
  });

  test("a hardlink to a symlink or device shares it; to a directory or nothing is INVALID_ARCHIVE", async () => {
    const root = await merge([
      e("s", { type: "symlink", link: "/t" }),
      e("s2", { type: "hardlink", link: "s" }),
      e("c", { type: "char", devmajor: 5, devminor: 1 }),
      e("c2", { type: "hardlink", link: "c" }),
    ]);
    assert.equal(get(root, "s2"), get(root, "s"));
    assert.equal(get(root, "c2").rdevMajor, 5);
    await rejects(
      merge([e("d/"), e("l", { type: "hardlink", link: "d" })]),
      "INVALID_ARCHIVE",
      '"l"',
      "directory",
    );
    await rejects(merge([e("l", { type: "hardlink", link: "/" })]), "INVALID_ARCHIVE", '"l"');
    await rejects(
      merge([e("l", { type: "hardlink", link: "nope" }), f("nope", 0)]),
      "INVALID_ARCHIVE",
      '"l"',
      '"nope"',
    );
  });
});

describe("sparse files", () => {
  test("DataRef carries the reader's extents and the logical size", async () => {
    const sparse: SparseInfo = { format: "pax-1.0", realSize: 16 << 20, map: [], isExtended: false };
    const extents = [
      { offset: 0, size: 4096 },
      { offset: 8 << 20, size: 512 },
      { offset: 16 << 20, size: 0 },
    ];
    const root = await merge([e("big", { sparse, size: 5120, offset: 2048, stored: 4608, extents })]);
    const big = get(root, "big");
    assert.equal(big.size, 16 << 20);
    assert.deepEqual(big.data, { layer: 0, offset: 2048, stored: 4608, sparse: extents });
  });

  test("the header's map when the reader gives none; maps that do not fit are refused", async () => {
    const map = [{ offset: 100, size: 10 }];
    const sparse: SparseInfo = { format: "pax-0.1", realSize: 1000, map, isExtended: false };
    const root = await merge([e("s", { sparse, stored: 10, offset: 512 })]);
    assert.deepEqual(get(root, "s").data, { layer: 0, offset: 512, stored: 10, sparse: map });
    const readerMap = { realSize: 1000, map }; // src/tar/reader.ts's SparseMap
    const asMap = await merge([{ ...e("s", { sparse, stored: 10 }), sparse: readerMap }]);
    assert.deepEqual(get(asMap, "s").data?.sparse, map);
    const beyond: SparseInfo = { ...sparse, map: [{ offset: 995, size: 10 }] };
    await rejects(merge([e("s", { sparse: beyond, stored: 10 })]), "INVALID_ARCHIVE", '"s"', "beyond");
    await rejects(merge([e("s", { sparse, stored: 11 })]), "INVALID_ARCHIVE", '"s"');
    // Writers place regions in one forward pass: out of order or overlapping is refused.
    const twoMaps = [
      [
        { offset: 500, size: 5 },
        { offset: 100, size: 5 },
      ],
      [
        { offset: 100, size: 10 },
        { offset: 105, size: 10 },
      ],
    ];
    for (const m of twoMaps) {
      const bad: SparseInfo = { ...sparse, map: m };
      const stored = m[0]!.size + m[1]!.size;
      await rejects(merge([e("s", { sparse: bad, stored })]), "INVALID_ARCHIVE", '"s"', "before the end");
    }
  });
});

describe("per-layer mode (overlayfs)", () => {
  test("whiteouts become char 0:0, opaque markers trusted.overlay.opaque=y", async () => {
    const root = await buildLayerTree(
      3,
      [
        e("etc/"),
        e("etc/.wh.old"),
        f("etc/new", 10),
        e("d/.wh..wh..opq"),
        e("d/", { mode: 0o700, xattrs: { "user.x": "1" } }),
        f("d/z", 20),
        e("e/"),
        f("e/z", 30),
        e("e/.wh..wh..opq"),
        e(".wh.gone"),
      ],
      { fixedTime: FIXED },
    );
    assert.deepEqual(listing(root), [
      "d directory",
      "d/z file@3:20",
      "e directory",
      "e/z file@3:30",
      "etc directory",
      "etc/new file@3:10",
      "etc/old char",
      "gone char",
    ]);
    const wh = get(root, "etc/old");
    assert.deepEqual([wh.rdevMajor, wh.rdevMinor, wh.mode, wh.uid, wh.gid], [0, 0, 0, 0, 0]);
    const d = get(root, "d");
    assert.deepEqual(
      [d.mode, d.xattrs.get(OVERLAY_OPAQUE_XATTR)?.toString(), d.xattrs.get("user.x")?.toString()],
      [0o700, "y", "1"],
    );
    assert.equal(get(root, "e").xattrs.get(OVERLAY_OPAQUE_XATTR)?.toString(), "y");
    assert.equal(get(root, "etc").xattrs.has(OVERLAY_OPAQUE_XATTR), false);
  });

  test("an opaque marker creates its directory; a whiteout plus a directory of that name is opaque", async () => {
    const root = await buildLayerTree(
      0,
      [e("a/b/.wh..wh..opq"), e(".wh.x"), f("x/y", 5), e(".wh.f"), f("f", 6)],
      {
        fixedTime: FIXED,
      },
    );
    assert.deepEqual(listing(root), [
      "a directory",
      "a/b directory",
      "f file@0:6",
      "x directory",
      "x/y file@0:5",
    ]);
    for (const p of ["a/b", "x"]) {
      const dir = get(root, p);
      assert.deepEqual(
        [dir.mode, dir.mtime, dir.xattrs.get(OVERLAY_OPAQUE_XATTR)?.toString()],
        [0o755, FIXED, "y"],
        p,
      );
    }
    assert.equal(get(root, "a").xattrs.size, 0);
  });

  test("an opaque root becomes whiteouts of the lower root's names (overlayfs ignores a root's xattr)", async () => {
    const lower = [
      e("etc/", { mode: 0o700, uid: 7 }),
      f("etc/a", 1),
      f("bin", 2),
      e("usr/", { mode: 0o711 }),
      f("usr/x", 3),
      e("keep/", { mode: 0o700 }),
      f("keep/k", 4),
      e("opt/", { mode: 0o700 }),
      e("opt/sub/", { mode: 0o700 }),
    ];
    const upper = [
      f("etc/b", 10),
      e("./.wh..wh..opq"),
      e("usr/", { mode: 0o750 }),
      f("usr/y", 11),
      f("bin", 12),
      f("new/n", 13),
    ];
    const root = await buildLayerTree(1, upper, { fixedTime: FIXED, parentsFrom: await merge(lower) });
    // As src/build/export.ts does: each entry to this layer's tree and to the flattened one below
    // (which empties its root at the marker), in either order.
    for (const ownFirst of [true, false]) {
      const merged = new TreeBuilder({ fixedTime: FIXED });
      await merged.addLayer(0, lower);
      const own = openLayerTree(1, { fixedTime: FIXED, parentsFrom: merged.current });
      const below = merged.openLayer(1);
      for (const entry of upper) {
        if (ownFirst) own.add(entry);
        below.add(entry);
        if (!ownFirst) own.add(entry);
      }
      assert.deepEqual(listing(own.close()), listing(root), ownFirst ? "own first" : "below first");
    }
    assert.deepEqual(listing(root), [
      "bin file@1:12",
      "etc directory",
      "etc/b file@1:10",
      "keep char",
      "new directory",
      "new/n file@1:13",
      "opt char",
      "usr directory",
      "usr/y file@1:11",
    ]);
    assert.equal(root.xattrs.has(OVERLAY_OPAQUE_XATTR), false);
    const opaque = (p: string) => get(root, p).xattrs.get(OVERLAY_OPAQUE_XATTR)?.toString();
    assert.deepEqual([opaque("etc"), opaque("usr"), opaque("new")], ["y", "y", undefined]);
    // Nothing below shows through: a parent the layer made up is new (as when flattened), not the lower one.
    const etc = get(root, "etc");
    assert.deepEqual([etc.mode, etc.uid, etc.mtime], [0o755, 0, FIXED]);
    assert.equal(get(root, "usr").mode, 0o750);
    const flat = await merge(lower, upper);
    assert.deepEqual([get(flat, "etc").mode, get(flat, "etc").uid], [0o755, 0]);

    // The bottom layer has nothing to hide: no whiteout, no xattr on the root.
    const bottom = await buildLayerTree(0, [e(".wh..wh..opq"), f("a", 1)], { fixedTime: FIXED });
    assert.deepEqual(listing(bottom), ["a file@0:1"]);
    assert.equal(bottom.xattrs.has(OVERLAY_OPAQUE_XATTR), false);
  });

  test("below an opaque or whited-out directory, made-up parents do not take lower metadata", async () => {
    const lower = await merge([
      e("d/", { mode: 0o700 }),
      e("d/s/", { mode: 0o700, uid: 3 }),
      e("w/", { mode: 0o700 }),
      e("k/", { mode: 0o711, uid: 4 }),
    ]);
    const root = await buildLayerTree(
      1,
      [e("d/.wh..wh..opq"), f("d/s/f", 1), e(".wh.w"), f("w/f", 2), f("k/f", 3)],
      { fixedTime: FIXED, parentsFrom: lower },
    );
    const meta = (p: string) => [get(root, p).mode, get(root, p).uid];
    // d keeps its lower metadata (the layer only empties it); d/s and w are new; k shows the lower k.
    assert.deepEqual(
      [meta("d"), meta("d/s"), meta("w"), meta("k")],
      [
        [0o700, 0],
        [0o755, 0],
        [0o755, 0],
        [0o711, 4],
      ],
    );
  });

  test("trusted.overlay.* xattrs from the tar are dropped, others kept", async () => {
    const root = await buildLayerTree(
      0,
      [e("d/", { xattrs: { "trusted.overlay.redirect": "/etc", "trusted.other": "1", "user.a": "2" } })],
      { fixedTime: FIXED },
    );
    assert.deepEqual([...get(root, "d").xattrs.keys()].sort(), ["trusted.other", "user.a"]);
  });

  test("hardlinks, traversal and symlinks behave as in flattened mode", async () => {
    const root = await buildLayerTree(0, [f("../a", 1), e("b", { type: "hardlink", link: "a" })], {
      fixedTime: FIXED,
    });
    assert.equal(get(root, "a"), get(root, "b"));
    await rejects(
      buildLayerTree(0, [e("l", { type: "hardlink", link: "lower-file" })], { fixedTime: FIXED }),
      "INVALID_ARCHIVE",
      '"lower-file"',
    );
    await rejects(
      buildLayerTree(0, [e("s", { type: "symlink", link: "/etc" }), f("s/passwd", 0)], { fixedTime: FIXED }),
      "INVALID_ARCHIVE",
      '"s/passwd"',
    );
  });
});

/** Reads a whole (small) tar the way the streaming reader will: headers, data offsets, sizes. */
function readTar(buf: Buffer): LayerEntry[] {
  const asm = new HeaderAssembler();
  const out: LayerEntry[] = [];
  let pos = 0;
  while (pos + 512 <= buf.length) {
    const block = parseHeaderBlock(buf.subarray(pos, pos + 512));
    if (block === null) break;
    const data = pos + 512;
    if (isMetaEntry(block)) {
      asm.absorb(block, Buffer.from(buf.subarray(data, data + block.size)));
      pos = data + paddedSize(block.size);
      continue;
    }
    const header = asm.finish(block);
    const size = entryDataSize(header);
    out.push({ header, offset: data, stored: size });
    pos = data + paddedSize(size);
  }
  return out;
}

describe("real GNU tar layers", () => {
  let dir: string;
  before(async () => {
    dir = await makeTempDir("merge");
  });
  after(async () => {
    await removeDir(dir);
  });

  test("two layers: whiteouts, opaque dir, hardlinks, long names; DataRefs point at the bytes", async () => {
    const long = `dir/${"long-name-".repeat(15)}ä`;
    const l0 = join(dir, "l0.tar");
    const l1 = join(dir, "l1.tar");
    await writeLayerTar(l0, [
      { path: "dir/", type: "dir", mode: 0o750 },
      { path: "dir/keep", content: "keep me" },
      { path: "dir/gone", content: "gone" },
      { path: long, content: "long" },
      { path: "opq/", type: "dir" },
      { path: "opq/old", content: "old" },
      { path: "orig", content: "original bytes", mode: 0o4711, uid: 70000, gid: 70000 },
      { path: "link", type: "hardlink", target: "orig" },
      { path: "sym", type: "symlink", target: "/dir/keep" },
    ]);
    await writeLayerTar(l1, [
      { path: "dir/", type: "dir", mode: 0o755 },
      { path: "dir/.wh.gone", content: "" },
      { path: "opq/", type: "dir" },
      { path: "opq/.wh..wh..opq", content: "" },
      { path: "opq/new", content: "new" },
      { path: "orig", content: "replaced" },
      { path: "empty", content: "" },
    ]);
    const bufs = [await readFile(l0), await readFile(l1)];
    const b = new TreeBuilder({ fixedTime: FIXED });
    for (const [i, buf] of bufs.entries()) await b.addLayer(i, readTar(buf));
    const root = b.finish();
    assert.deepEqual(
      listing(root).map((l) => l.replace(/@.*/, "")),
      [
        "dir directory",
        "dir/keep file",
        `${long} file`,
        "empty file",
        "link file",
        "opq directory",
        "opq/new file",
        "orig file",
        "sym -> /dir/keep",
      ],
    );
    const content = (p: string) => {
      const n = get(root, p);
      return bufs[n.data!.layer]!.subarray(n.data!.offset, n.data!.offset + n.data!.stored).toString();
    };
    assert.equal(content("dir/keep"), "keep me");
    assert.equal(content(long), "long");
    assert.equal(content("opq/new"), "new");
    assert.equal(content("orig"), "replaced");
    assert.equal(content("link"), "original bytes");
    const link = get(root, "link");
    assert.deepEqual([link.mode, link.uid, link.gid], [0o4711, 70000, 70000]);
    assert.equal(get(root, "dir").mode, 0o755);
    assert.equal(get(root, "empty").data, undefined);
  });

  test("a GNU sparse (PAX 0.1) file: size and regions from the archive", async () => {
    const src = join(dir, "src");
    await run("mkdir", ["-p", src]);
    const file = join(src, "holes");
    await writeFile(file, "");
    await truncate(file, 16 << 20);
    await run("sh", [
      "-c",
      `printf head | dd of=${file} conv=notrunc status=none && printf tail | dd of=${file} bs=1 seek=${(8 << 20) + 1} conv=notrunc status=none`,
    ]);
    const tar = join(dir, "sparse.tar");
    await run("tar", ["--format=pax", "--sparse", "--sparse-version=0.1", "-cf", tar, "-C", src, "holes"]);
    const buf = await readFile(tar);
    const root = await merge(readTar(buf));
    const holes = get(root, "holes");
    assert.equal(holes.size, 16 << 20);
    const data = holes.data!;
    assert.ok(data.sparse && data.sparse.length >= 2, JSON.stringify(data));
    const stored = buf.subarray(data.offset, data.offset + data.stored).toString("latin1");
    assert.ok(stored.startsWith("head") && stored.includes("tail"), JSON.stringify(stored.slice(0, 40)));
  });
});
