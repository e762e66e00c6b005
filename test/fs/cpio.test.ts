import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { gunzipSync } from "node:zlib";
import { isKilnError } from "../../src/errors.js";
import { writeCpio } from "../../src/fs/cpio/writer.js";
import {
  type ContentOptions,
  type ContentSource,
  dataOrder,
  type Inode,
  MemoryContent,
  newInode,
  walk,
} from "../../src/fs/tree.js";
import { fromText, toText } from "../../src/io/bytestring.js";
import { pseudoRandomBytes as bytes } from "../helpers/bytes.js";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { diffTrees, type EntryFacts, snapshotTree } from "../helpers/treecompare.js";

const T = 1_600_000_000;
const LONG_DIR = "d".repeat(150);
const LONG_FILE = `${"f".repeat(200)}.txt`;
const UNICODE = "ünïcødé-名前.txt";

/**
 * A ContentSource that behaves like the real one (one sequential read per layer): it refuses files
 * asked for out of (layer, offset) order, so a writer that reads in walk order fails.
 */
class SequentialContent implements ContentSource {
  readonly memory = new MemoryContent();
  requested: Inode[] = [];
  async *contents(files: readonly Inode[]): AsyncIterable<{ inode: Inode; data: AsyncIterable<Buffer> }> {
    this.requested = [...files];
    for (let i = 1; i < files.length; i++) {
      const a = files[i - 1]!.data!;
      const b = files[i]!.data!;
      if (a.layer > b.layer || (a.layer === b.layer && a.offset >= b.offset)) {
        throw new Error(`files requested out of layer order at index ${i}`);
      }
    }
    yield* this.memory.contents(files);
  }
}

/**
 * Asked for transient chunks, yields every file in 1000-byte chunks through one buffer, which it
 * scribbles over as soon as the writer asks for the next chunk (what a ring of read buffers does).
 */
class ReusingContent implements ContentSource {
  readonly transient: boolean[] = [];
  constructor(private readonly inner: ContentSource) {}
  async *contents(
    files: readonly Inode[],
    opts: ContentOptions = {},
  ): AsyncIterable<{ inode: Inode; data: AsyncIterable<Buffer> }> {
    this.transient.push(opts.transient === true);
    const shared = Buffer.alloc(1000);
    for await (const { inode, data } of this.inner.contents(files)) {
      const chunks: Buffer[] = [];
      for await (const chunk of data) chunks.push(chunk);
      const whole = Buffer.concat(chunks);
      const pieces = async function* () {
        for (let at = 0; at < whole.length; at += shared.length) {
          const n = whole.copy(shared, 0, at);
          yield opts.transient ? shared.subarray(0, n) : Buffer.from(shared.subarray(0, n));
          shared.fill(0xaa);
        }
      };
      yield { inode, data: pieces() };
    }
  }
}

interface Sample {
  root: Inode;
  content: SequentialContent;
  /** Bytes of each file inode with data. */
  data: Map<Inode, Buffer>;
}

/** Adds `inode` at `path` (parents must exist). */
function put(root: Inode, path: string, inode: Inode): Inode {
  const parts = path.split("/");
  let dir = root;
  for (const p of parts.slice(0, -1)) dir = dir.entries!.get(p)!;
  dir.entries!.set(parts.at(-1)!, inode);
  return inode;
}

function sampleTree(): Sample {
  const content = new SequentialContent();
  const data = new Map<Inode, Buffer>();
  let nextOffset = 0;
  const root = newInode("directory", { mode: 0o755, mtime: T });
  const dir = (path: string, f: Partial<Inode> = {}) =>
    put(root, path, newInode("directory", { mtime: T, ...f }));
  // Layers are given so that data order (layer, offset) differs from walk order.
  const file = (path: string, body: Buffer, layer: number, f: Partial<Inode> = {}) => {
    nextOffset += 4096;
    const inode = newInode("file", {
      mtime: T + 1,
      size: body.length,
      data: body.length ? { layer, offset: nextOffset, stored: body.length } : undefined,
      ...f,
    });
    if (body.length) {
      content.memory.set(inode, body);
      data.set(inode, body);
    }
    return put(root, path, inode);
  };

  dir("bin");
  file("bin/busybox", bytes(3 * 1024 * 1024 + 3, 7), 1, { mode: 0o755 });
  put(root, "bin/sh", newInode("symlink", { mode: 0o777, target: "busybox", size: 7, mtime: T }));
  dir("dev");
  put(root, "dev/console", newInode("char", { mode: 0o600, rdevMajor: 5, rdevMinor: 1, mtime: T }));
  put(root, "dev/sda", newInode("block", { mode: 0o660, gid: 6, rdevMajor: 8, rdevMinor: 0, mtime: T }));
  put(root, "dev/nvme", newInode("block", { mode: 0o660, rdevMajor: 259, rdevMinor: 70000, mtime: T }));
  put(root, "dev/initctl", newInode("fifo", { mode: 0o600, mtime: T }));
  put(root, "dev/log", newInode("socket", { mode: 0o666, mtime: T }));
  dir("etc");
  const passwd = file("etc/passwd", Buffer.from("root:x:0:0::/root:/bin/sh\n"), 0, {
    xattrs: new Map([["user.ignored", Buffer.from("x")]]),
  });
  put(root, "etc/passwd-", passwd);
  file("etc/hosts", Buffer.from("127.0.0.1 localhost\n"), 2);
  put(
    root,
    "etc/localtime",
    newInode("symlink", { mode: 0o777, target: "/usr/share/zoneinfo/UTC", mtime: T }),
  );
  file("etc/empty", Buffer.alloc(0), 0, { mode: 0o600, uid: 70000, gid: 70000 });
  const e1 = file("etc/empty-a", Buffer.alloc(0), 0);
  put(root, "etc/empty-b", e1);
  dir("home");
  dir("home/user", { uid: 1000, gid: 1000, mode: 0o700 });
  file("home/user/.profile", Buffer.from("export PS1='$ '\n"), 0, { uid: 1000, gid: 1000 });
  dir("tmp", { mode: 0o1777 });
  dir("usr");
  dir("usr/bin");
  file("usr/bin/sudo", Buffer.from("setuid\n"), 0, { mode: 0o4755 });
  file("usr/bin/wall", Buffer.from("setgid\n"), 1, { mode: 0o2755, gid: 5 });
  put(root, "usr/bin/passwd-link", passwd);
  dir("usr/share");
  file(fromText(`usr/share/${UNICODE}`), Buffer.from("ünïcødé\n"), 0, { uid: 70000, gid: 70001 });
  dir(`usr/share/${LONG_DIR}`);
  file(`usr/share/${LONG_DIR}/${LONG_FILE}`, bytes(100_001, 3), 0);
  dir("emptydir", { mode: 0o750 });
  return { root, content, data };
}

/** What extracting the tree must give, in treecompare's terms. */
function expectedFacts(s: Sample): Map<string, EntryFacts> {
  const names = new Map<Inode, string[]>();
  // Tree names are byte strings; the extracted tree's are text.
  for (const item of walk(s.root))
    names.set(item.inode, [...(names.get(item.inode) ?? []), toText(item.path)!]);
  const facts = new Map<string, EntryFacts>();
  for (const item of walk(s.root)) {
    const { inode } = item;
    const path = toText(item.path)!;
    const type = inode.type === "directory" ? "dir" : inode.type;
    const f: EntryFacts = {
      type,
      mode: type === "symlink" ? 0o777 : inode.mode,
      uid: inode.uid,
      gid: inode.gid,
      xattrs: {},
    };
    if (type !== "symlink") f.mtime = inode.mtime;
    if (type === "file") {
      const body = s.data.get(inode) ?? Buffer.alloc(0);
      f.size = body.length;
      f.sha256 = createHash("sha256").update(body).digest("hex");
    } else if (type === "symlink") f.target = inode.target;
    else if (type === "char" || type === "block") f.rdev = `${inode.rdevMajor}:${inode.rdevMinor}`;
    const all = names.get(inode)!;
    if (type !== "dir" && all.length > 1) f.links = [...all].sort();
    facts.set(path, f);
  }
  return facts;
}

interface RawEntry {
  ino: number;
  mode: number;
  uid: number;
  gid: number;
  nlink: number;
  mtime: number;
  size: number;
  rdevMajor: number;
  rdevMinor: number;
  name: string;
  data: Buffer;
}

/** Parses a newc archive field by field: the format checks GNU cpio is lenient about. */
function parseNewc(buf: Buffer): { entries: RawEntry[]; end: number } {
  const entries: RawEntry[] = [];
  let pos = 0;
  for (;;) {
    assert.equal(pos % 4, 0);
    assert.equal(buf.toString("latin1", pos, pos + 6), "070701", `magic at ${pos}`);
    const field = (i: number) => {
      const text = buf.toString("latin1", pos + 6 + i * 8, pos + 14 + i * 8);
      assert.match(text, /^[0-9a-f]{8}$/);
      return Number.parseInt(text, 16);
    };
    const namesize = field(11);
    assert.equal(field(7), 0, "devmajor");
    assert.equal(field(8), 0, "devminor");
    assert.equal(field(12), 0, "check");
    assert.equal(buf[pos + 110 + namesize - 1], 0, "name NUL");
    // A byte string, as the tree's names.
    const name = buf.toString("latin1", pos + 110, pos + 110 + namesize - 1);
    const dataStart = pos + 110 + namesize + ((4 - ((110 + namesize) % 4)) % 4);
    const size = field(6);
    const e: RawEntry = {
      ino: field(0),
      mode: field(1),
      uid: field(2),
      gid: field(3),
      nlink: field(4),
      mtime: field(5),
      size,
      rdevMajor: field(9),
      rdevMinor: field(10),
      name,
      data: buf.subarray(dataStart, dataStart + size),
    };
    pos = dataStart + size + ((4 - (size % 4)) % 4);
    if (name === "TRAILER!!!") return { entries, end: pos };
    entries.push(e);
  }
}

describe("cpio newc writer", () => {
  let dir: string;
  let s: Sample;
  let plain: string;
  let gz: string;
  before(async () => {
    dir = await makeTempDir("cpio");
    s = sampleTree();
    plain = join(dir, "a.cpio");
    gz = join(dir, "a.cpio.gz");
    const r1 = await writeCpio(s.root, s.content, plain);
    assert.equal(r1.bytes, readFileSync(plain).length);
    const r2 = await writeCpio(s.root, s.content, gz, { compress: "gzip" });
    assert.equal(r2.bytes, readFileSync(gz).length);
  });
  after(() => removeDir(dir));

  test("reads file data in data order, not walk order", () => {
    assert.deepEqual(s.content.requested, dataOrder(s.root));
    const walkFiles = [...walk(s.root)].filter((i) => i.first && i.inode.data).map((i) => i.inode);
    assert.notDeepEqual(walkFiles, s.content.requested, "the sample must make the two orders differ");
  });

  test("layout: directories, then entries without data, then files in data order", () => {
    const { entries, end } = parseNewc(readFileSync(plain));
    const types = entries.map((e) => e.mode & 0o170000);
    const firstNonDir = types.findIndex((t) => t !== 0o040000);
    assert.ok(
      types.slice(firstNonDir).every((t) => t !== 0o040000),
      "all directories come first",
    );
    assert.equal(entries[0]!.name, ".");
    const withData = entries.filter((e) => (e.mode & 0o170000) === 0o100000 && e.size > 0);
    const dataNames = withData.map((e) => e.name);
    const lastName = new Map<Inode, string>();
    for (const i of walk(s.root)) lastName.set(i.inode, i.path);
    assert.deepEqual(
      dataNames,
      dataOrder(s.root).map((i) => lastName.get(i)),
    );
    assert.deepEqual(entries.slice(-withData.length), withData, "data-carrying files come last");
    // Each name appears once; the archive ends padded to 512 like GNU cpio's.
    assert.equal(new Set(entries.map((e) => e.name)).size, entries.length);
    assert.equal(entries.length, [...walk(s.root)].length);
    const total = readFileSync(plain).length;
    assert.equal(total % 512, 0);
    assert.ok(
      readFileSync(plain)
        .subarray(end)
        .every((b) => b === 0),
    );
  });

  test("headers: deterministic inode numbers, hardlinks share ino with data on the last name", () => {
    const { entries } = parseNewc(readFileSync(plain));
    const byName = new Map(entries.map((e) => [e.name, e]));
    // Inode numbers follow walk order from 1.
    const order = new Map<Inode, number>();
    for (const i of walk(s.root)) if (!order.has(i.inode)) order.set(i.inode, order.size + 1);
    for (const i of walk(s.root)) assert.equal(byName.get(i.path || ".")!.ino, order.get(i.inode), i.path);
    const links = ["etc/passwd", "etc/passwd-", "usr/bin/passwd-link"].map((n) => byName.get(n)!);
    assert.equal(new Set(links.map((e) => e.ino)).size, 1);
    assert.deepEqual(
      links.map((e) => [e.nlink, e.size]),
      [
        [3, 0],
        [3, 0],
        [3, 26],
      ],
    );
    assert.equal(links[2]!.data.toString(), "root:x:0:0::/root:/bin/sh\n");
    assert.equal(byName.get("etc/empty-a")!.ino, byName.get("etc/empty-b")!.ino);
    assert.equal(byName.get(".")!.nlink, 2 + 7);
    assert.equal(byName.get("dev/nvme")!.mode, 0o060660);
    assert.deepEqual([byName.get("dev/nvme")!.rdevMajor, byName.get("dev/nvme")!.rdevMinor], [259, 70000]);
    assert.equal(byName.get("usr/bin/sudo")!.mode, 0o104755);
    assert.equal(byName.get("tmp")!.mode, 0o041777);
    assert.equal(byName.get("dev/log")!.mode, 0o140666);
    assert.equal(byName.get("bin/sh")!.data.toString(), "busybox");
    assert.equal(byName.get("etc/localtime")!.size, "/usr/share/zoneinfo/UTC".length);
    assert.equal(byName.get("bin/busybox")!.mtime, T + 1);
  });

  test("cpio -itv lists names, modes, owners, sizes and link targets", async () => {
    const listing = await run("sh", ["-c", 'cpio -itvn --quiet < "$1"', "sh", plain]);
    const lines = listing.trimEnd().split("\n");
    const { entries } = parseNewc(readFileSync(plain));
    assert.equal(lines.length, entries.length);
    const rows = new Map<string, string[]>();
    for (const line of lines) {
      const f = line.split(/\s+/);
      const isDev = line.startsWith("c") || line.startsWith("b");
      // perms nlink uid gid size|maj, min  month day year  name [-> target]
      const nameAt = isDev ? 9 : 8;
      rows.set(f.slice(nameAt).join(" ").split(" -> ")[0]!, f);
    }
    const row = (name: string) => {
      const r = rows.get(name);
      assert.ok(r, `${name} listed`);
      return r;
    };
    assert.deepEqual(row("usr/bin/sudo").slice(0, 5), ["-rwsr-xr-x", "1", "0", "0", "7"]);
    assert.deepEqual(row("usr/bin/wall").slice(0, 5), ["-rwxr-sr-x", "1", "0", "5", "7"]);
    assert.deepEqual(row("tmp").slice(0, 4), ["drwxrwxrwt", "2", "0", "0"]);
    assert.deepEqual(row("home/user").slice(0, 4), ["drwx------", "2", "1000", "1000"]);
    assert.deepEqual(row("etc/empty").slice(0, 5), ["-rw-------", "1", "70000", "70000", "0"]);
    assert.deepEqual(row(`usr/share/${UNICODE}`).slice(2, 5), [
      "70000",
      "70001",
      String(Buffer.byteLength("ünïcødé\n")),
    ]);
    assert.deepEqual(row("bin/busybox").slice(0, 5), [
      "-rwxr-xr-x",
      "1",
      "0",
      "0",
      String(3 * 1024 * 1024 + 3),
    ]);
    assert.deepEqual(row("dev/console").slice(0, 6), ["crw-------", "1", "0", "0", "5,", "1"]);
    assert.deepEqual(row("dev/nvme").slice(0, 6), ["brw-rw----", "1", "0", "0", "259,", "70000"]);
    assert.equal(row("dev/initctl")[0], "prw-------");
    assert.equal(row("dev/log")[0], "srw-rw-rw-");
    assert.ok(listing.includes("bin/sh -> busybox\n"));
    assert.ok(listing.includes("etc/localtime -> /usr/share/zoneinfo/UTC\n"));
    assert.ok(rows.has(`usr/share/${LONG_DIR}/${LONG_FILE}`));
    assert.deepEqual(row("usr/bin/passwd-link").slice(0, 5), ["-rw-r--r--", "3", "0", "0", "26"]);
  });

  test("extracted with cpio -idmu it equals the tree: content, modes, owners, devices, hardlinks", async () => {
    const out = join(dir, "x");
    await mkdir(out);
    await run("sh", ["-c", 'cpio -idmu --no-absolute-filenames --quiet < "$1"', "sh", plain], { cwd: out });
    const actual = await snapshotTree(out, { mtime: true });
    const expected = expectedFacts(s);
    // GNU cpio sets a directory's time when it creates it, so the files created in it afterwards
    // change it (the kernel sets directory times after the last entry); compare the rest.
    for (const [path, f] of expected) if (f.type === "dir") delete actual.get(path)?.mtime;
    for (const f of expected.values()) if (f.type === "dir") delete f.mtime;
    assert.deepEqual(diffTrees(expected, actual, ["tree", "cpio -i"]), []);
  });

  test("busybox cpio, a second unpacker, extracts the same tree", async () => {
    const out = join(dir, "bb");
    await mkdir(out);
    await run("sh", ["-c", 'busybox cpio -idmu < "$1"', "sh", plain], { cwd: out });
    const actual = await snapshotTree(out, { mtime: true });
    const expected = expectedFacts(s);
    for (const [path, f] of expected) if (f.type === "dir") delete actual.get(path)?.mtime;
    for (const f of expected.values()) if (f.type === "dir") delete f.mtime;
    assert.deepEqual(diffTrees(expected, actual, ["tree", "busybox cpio"]), []);
  });

  test("gzip: one member around the same archive, no name, mtime 0", async () => {
    const raw = readFileSync(gz);
    assert.deepEqual([...raw.subarray(0, 4)], [0x1f, 0x8b, 8, 0], "deflate, no FNAME/FEXTRA flags");
    assert.equal(raw.readUInt32LE(4), 0, "gzip mtime");
    assert.ok(gunzipSync(raw).equals(readFileSync(plain)));
    const listing = await run("sh", ["-c", 'gzip -dc < "$1" | cpio -it --quiet', "sh", gz]);
    const plainListing = await run("sh", ["-c", 'cpio -it --quiet < "$1"', "sh", plain]);
    assert.equal(listing, plainListing);
    assert.ok(listing.includes(`usr/share/${UNICODE}\n`));
  });

  test("two runs give byte-identical output, plain and gzip", async () => {
    const again = sampleTree();
    await writeCpio(again.root, again.content, join(dir, "b.cpio"));
    await writeCpio(again.root, again.content, join(dir, "b.cpio.gz"), { compress: "gzip" });
    assert.ok(readFileSync(join(dir, "b.cpio")).equals(readFileSync(plain)));
    assert.ok(readFileSync(join(dir, "b.cpio.gz")).equals(readFileSync(gz)));
  });

  test("copies what it is given: a source that reuses its buffer (transient) gives the same bytes", async () => {
    const again = sampleTree();
    const reusing = new ReusingContent(again.content);
    await writeCpio(again.root, reusing, join(dir, "r.cpio"));
    await writeCpio(again.root, reusing, join(dir, "r.cpio.gz"), { compress: "gzip" });
    assert.deepEqual(reusing.transient, [true, true]);
    assert.ok(readFileSync(join(dir, "r.cpio")).equals(readFileSync(plain)));
    assert.ok(readFileSync(join(dir, "r.cpio.gz")).equals(readFileSync(gz)));
  });

  test("mtimeOverride sets every entry's time", async () => {
    const f = join(dir, "m.cpio");
    await writeCpio(s.root, s.content, f, { mtimeOverride: 1234 });
    const { entries } = parseNewc(readFileSync(f));
    assert.deepEqual(new Set(entries.map((e) => e.mtime)), new Set([1234]));
    await assert.rejects(writeCpio(s.root, s.content, f, { mtimeOverride: -1 }), (e) =>
      isKilnError(e, "INVALID_ARGUMENT"),
    );
  });

  test("times outside 1970..2106 are clamped", async () => {
    const root = newInode("directory", { mtime: -5 });
    root.entries!.set("late", newInode("fifo", { mtime: 2 ** 33 }));
    const f = join(dir, "clamp.cpio");
    await writeCpio(root, new MemoryContent(), f);
    const { entries } = parseNewc(readFileSync(f));
    assert.deepEqual(
      entries.map((e) => e.mtime),
      [0, 0xffffffff],
    );
  });

  test("a file of 4 GiB is TOO_LARGE, naming it, and no output is left", async () => {
    const root = newInode("directory");
    root.entries!.set("var", newInode("directory"));
    root
      .entries!.get("var")!
      .entries!.set(
        "huge.img",
        newInode("file", { size: 2 ** 32, data: { layer: 0, offset: 512, stored: 2 ** 32 } }),
      );
    const f = join(dir, "huge.cpio");
    await assert.rejects(
      writeCpio(root, new MemoryContent(), f),
      (e) => isKilnError(e, "TOO_LARGE") && e.message.includes("/var/huge.img"),
    );
    assert.equal(existsSync(f), false);
  });

  test("a path longer than the kernel's PATH_MAX is TOO_LARGE", async () => {
    const root = newInode("directory");
    let d = root;
    for (let i = 0; i < 17; i++) {
      const sub = newInode("directory");
      d.entries!.set(`${i}`.padStart(250, "x"), sub);
      d = sub;
    }
    await assert.rejects(writeCpio(root, new MemoryContent(), join(dir, "deep.cpio")), (e) =>
      isKilnError(e, "TOO_LARGE"),
    );
  });

  test("content shorter than the file's size is SIZE_MISMATCH and removes the output", async () => {
    const root = newInode("directory");
    const file = newInode("file", { size: 10, data: { layer: 0, offset: 0, stored: 10 } });
    root.entries!.set("short", file);
    const content = new MemoryContent();
    content.set(file, Buffer.from("12345"));
    const f = join(dir, "short.cpio");
    await assert.rejects(
      writeCpio(root, content, f),
      (e) => isKilnError(e, "SIZE_MISMATCH") && e.message.includes("/short"),
    );
    assert.equal(existsSync(f), false);
  });
});
