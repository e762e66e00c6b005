import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import {
  closeSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readlinkSync,
  rmSync,
  symlinkSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { isKilnError } from "../../src/errors.js";
import { toText } from "../../src/io/bytestring.js";
import { materialize, readTar, sparseContent, type TarEntry } from "../../src/tar/reader.js";
import { base256, END, entry, header, pad, paxRecord } from "./fixtures.js";

/** Feeds a buffer in chunks of `size` bytes (odd sizes cross every block boundary). */
async function* chunks(buf: Buffer, size = 4099): AsyncGenerator<Buffer> {
  for (let i = 0; i < buf.length; i += size) yield buf.subarray(i, i + size);
}

interface Seen {
  entry: TarEntry;
  sha256: string;
  length: number;
}

/** Reads every entry, consuming its logical bytes. */
async function readAll(input: AsyncIterable<Buffer>, label?: string): Promise<Seen[]> {
  const out: Seen[] = [];
  for await (const e of readTar(input, { label })) {
    const h = createHash("sha256");
    let length = 0;
    for await (const c of materialize(e)) {
      h.update(c);
      length += c.length;
    }
    out.push({ entry: e, sha256: h.digest("hex"), length });
  }
  return out;
}

const sha256 = (b: Buffer) => createHash("sha256").update(b).digest("hex");

async function rejects(p: Promise<unknown>, code: string, pattern: RegExp): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(isKilnError(err), `not a KilnError: ${err}`);
    assert.equal(err.code, code, err.message);
    assert.match(err.message, pattern);
    return true;
  });
}

let dir: string;
let root: string;
const tars = new Map<string, Buffer>();

function tar(args: string[]): Buffer {
  return execFileSync("tar", ["-c", "-f", "-", "--numeric-owner", "-C", root, ...args], {
    maxBuffer: 256 * 1024 * 1024,
  });
}

/** A 20 MiB file with 6 data regions (more than the 4 an old-GNU header holds) and a trailing hole. */
function makeSparse(path: string): void {
  writeFileSync(path, "");
  truncateSync(path, 20 * 1024 * 1024);
  const fd = openSync(path, "r+");
  for (const i of [0, 1, 3, 5, 7, 9])
    writeSync(fd, randomBytes(5000 + i), 0, 5000 + i, i * 1024 * 1024 + i * 999);
  closeSync(fd);
}

const LONG_DIR = `${"d".repeat(120)}/${"e".repeat(90)}`;
const LONG_NAME = `${LONG_DIR}/${"f".repeat(150)}`;
const XATTR = Buffer.from([0x01, 0x00, 0x00, 0x02, 0xff, 0x0a, 0x00, 0x20]);

before(() => {
  dir = mkdtempSync(join(tmpdir(), "kiln-tar-reader-"));
  root = join(dir, "root");
  mkdirSync(join(root, LONG_DIR), { recursive: true });
  writeFileSync(join(root, "empty"), "");
  writeFileSync(join(root, "one"), "x");
  writeFileSync(join(root, "block"), randomBytes(512));
  writeFileSync(join(root, "block+1"), randomBytes(513));
  writeFileSync(join(root, "big"), randomBytes(3 * 1024 * 1024 + 17));
  writeFileSync(join(root, LONG_NAME), "long name content");
  writeFileSync(join(root, "héllo wörld ☃"), "unicode");
  symlinkSync(`../${"t".repeat(200)}`, join(root, "longlink"));
  execFileSync("ln", [join(root, "big"), join(root, "big-hardlink")]);
  execFileSync("mkfifo", [join(root, "fifo")]);
  writeFileSync(join(root, "xattr"), "has xattrs");
  execFileSync("setfattr", ["-n", "user.bin", "-v", `0x${XATTR.toString("hex")}`, join(root, "xattr")]);
  makeSparse(join(root, "sparse"));
  writeFileSync(join(root, "allhole"), "");
  truncateSync(join(root, "allhole"), 1024 * 1024);
  const all = ["."];
  tars.set("pax", tar(["--format=pax", "--xattrs", "--xattrs-include=*", ...all]));
  tars.set("gnu", tar(["--format=gnu", ...all]));
  tars.set("gnu-sparse", tar(["--format=gnu", "-S", ...all]));
  for (const v of ["0.0", "0.1", "1.0"])
    tars.set(`pax-sparse-${v}`, tar(["--format=pax", "-S", `--sparse-version=${v}`, ...all]));
});

after(() => rmSync(dir, { recursive: true, force: true }));

/** Checks every entry against the file it came from: type, size, content sha256, link target, xattrs. */
function checkAgainstSource(
  seen: Seen[],
  archive: Buffer,
  opts: { xattrs?: boolean; expect?: string[] } = {},
): void {
  const paths = new Set<string>();
  for (const { entry: e, sha256: digest, length } of seen) {
    // Header names are byte strings; the source tree's names are text.
    const rel = toText(e.header.path.replace(/^\.\/?/, "").replace(/\/$/, ""))!;
    paths.add(rel);
    const source = join(root, rel);
    const st = lstatSync(source);
    const t = e.header.type;
    if (st.isDirectory()) assert.equal(t, "directory", rel);
    else if (st.isSymbolicLink()) {
      assert.equal(t, "symlink", rel);
      assert.equal(toText(e.header.linkpath), readlinkSync(source));
    } else if (st.isFIFO()) assert.equal(t, "fifo", rel);
    else if (t === "hardlink") {
      assert.equal(e.stored, 0);
      assert.equal(e.header.linkpath.replace(/^\.\//, ""), rel === "big" ? "big-hardlink" : "big");
    } else {
      assert.equal(t, "file", rel);
      assert.equal(e.size, st.size, rel);
      assert.equal(length, st.size, rel);
      assert.equal(digest, sha256(readFileSync(source)), `${rel} content`);
      if (!e.sparse) {
        // The offset points at the stored bytes in the stream.
        assert.ok(
          archive.subarray(e.offset, e.offset + e.stored).equals(readFileSync(source)),
          `${rel} offset`,
        );
      }
    }
    if (opts.xattrs && rel === "xattr") assert.deepEqual(e.header.xattrs.get("user.bin"), XATTR);
  }
  const expect = opts.expect ?? [
    "empty",
    "one",
    "block",
    "block+1",
    "big",
    LONG_NAME,
    "héllo wörld ☃",
    "longlink",
    "fifo",
    "sparse",
  ];
  for (const name of expect) {
    assert.ok(paths.has(name), `${name} missing`);
  }
}

describe("readTar on GNU tar output", () => {
  for (const kind of ["pax", "gnu", "gnu-sparse", "pax-sparse-0.0", "pax-sparse-0.1", "pax-sparse-1.0"]) {
    test(`${kind}: every entry equals its source file`, async () => {
      const archive = tars.get(kind)!;
      const seen = await readAll(chunks(archive));
      checkAgainstSource(seen, archive, { xattrs: kind === "pax" });
      const sparse = seen.find((s) => s.entry.header.path.endsWith("sparse"))!.entry;
      if (kind.includes("sparse")) {
        assert.ok(sparse.sparse, "sparse map exposed");
        assert.ok(sparse.sparse.map.length >= 6, "all regions, extension blocks included");
        assert.ok(sparse.stored < 64 * 1024 && sparse.size === 20 * 1024 * 1024);
        // The stored regions are at `offset` in the stream, in map order.
        const stored = archive.subarray(sparse.offset, sparse.offset + sparse.stored);
        const content = readFileSync(join(root, "sparse"));
        let at = 0;
        for (const r of sparse.sparse.map) {
          assert.ok(stored.subarray(at, at + r.size).equals(content.subarray(r.offset, r.offset + r.size)));
          at += r.size;
        }
        const allhole = seen.find((s) => s.entry.header.path.endsWith("allhole"))!.entry;
        assert.equal(allhole.stored, 0);
        assert.equal(allhole.size, 1024 * 1024);
      } else {
        assert.equal(sparse.sparse, undefined);
      }
    });
  }

  test("one-byte chunks give the same entries as big ones", async () => {
    const small = tar([
      "--format=pax",
      "--xattrs",
      "--xattrs-include=*",
      "./one",
      "./xattr",
      "./longlink",
      "./block+1",
    ]);
    const a = await readAll(chunks(small, 1));
    const b = await readAll(chunks(small, small.length));
    assert.deepEqual(
      a.map((s) => [s.entry.header.path, s.entry.offset, s.sha256]),
      b.map((s) => [s.entry.header.path, s.entry.offset, s.sha256]),
    );
    checkAgainstSource(a, small, { xattrs: true, expect: ["one", "xattr", "longlink", "block+1"] });
  });

  test("an archive without the end blocks ends at the header boundary; data after the end marker is ignored", async () => {
    const archive = tars.get("pax")!;
    const seen = await readAll(chunks(archive));
    const last = seen.at(-1)!.entry;
    const end = last.offset + Math.ceil(last.stored / 512) * 512;
    assert.ok(
      archive.subarray(end).every((b) => b === 0),
      "only end blocks after the last entry",
    );
    const noEof = await readAll(chunks(archive.subarray(0, end)));
    assert.deepEqual(
      noEof.map((s) => s.sha256),
      seen.map((s) => s.sha256),
    );
    const garbage = await readAll(chunks(Buffer.concat([archive, randomBytes(5000)])));
    assert.equal(garbage.length, seen.length);
  });

  test("truncated archives are INVALID_ARCHIVE: inside a header, data or extended header", async () => {
    const archive = tars.get("gnu-sparse")!;
    const seen = await readAll(chunks(archive));
    const big = seen.find((s) => s.entry.stored > 3 * 1024 * 1024)!.entry;
    const sparse = seen.find((s) => s.entry.header.path === "./sparse")!.entry;
    for (const cut of [
      100, // inside the first header
      big.offset - 200, // inside big's header
      big.offset + 1000, // inside big's data
      sparse.offset - 600, // inside the sparse extension blocks
      sparse.offset + 10, // inside the sparse regions
    ]) {
      await rejects(
        readAll(chunks(archive.subarray(0, cut)), "layer 3"),
        "INVALID_ARCHIVE",
        /^layer 3: truncated archive/,
      );
    }
    // Ending inside the padding after complete data is how umoci insert 0.4.7 ends its layers: the
    // stream ends there, with every entry up to it whole.
    const upToBig = await readAll(chunks(archive.subarray(0, big.offset + big.stored + 3)));
    assert.equal(upToBig.at(-1)!.entry.offset, big.offset);
    assert.equal(upToBig.at(-1)!.sha256, seen.find((s) => s.entry.offset === big.offset)!.sha256);
    const pax = tars.get("pax")!;
    const firstPax = (await readAll(chunks(pax)))[0]!.entry;
    // Cut after a complete PAX header and its data, before the entry it describes.
    assert.ok(firstPax.offset > 1024);
    await rejects(
      readAll(chunks(pax.subarray(0, 1024))),
      "INVALID_ARCHIVE",
      /extended header, without its entry/,
    );
  });
});

describe("readTar on hand-made and hostile input", () => {
  test("random bytes are INVALID_ARCHIVE", async () => {
    for (let i = 0; i < 20; i++) {
      await rejects(readAll(chunks(randomBytes(4096 + i))), "INVALID_ARCHIVE", /checksum/);
    }
  });

  test("a size of 2^60 (base-256) is refused; 2^40 with little data is truncated, without buffering", async () => {
    const huge = Buffer.concat([
      header({ name: "huge", size: base256(2n ** 60n, 12) }),
      Buffer.alloc(4096),
      END,
    ]);
    await rejects(readAll(chunks(huge)), "INVALID_ARCHIVE", /out of range/);
    const big = Buffer.concat([
      header({ name: "big", size: base256(2n ** 40n, 12) }),
      Buffer.alloc(4096),
      END,
    ]);
    await rejects(readAll(chunks(big)), "INVALID_ARCHIVE", /truncated archive: entry "big"/);
    // Skipped without reading it: still truncated, not a hang or an allocation.
    await assert.rejects(
      (async () => {
        for await (const _ of readTar(chunks(big))) {
        }
      })(),
      /truncated/,
    );
    const paxHuge = Buffer.concat([header({ name: "p", typeflag: "x", size: base256(2n ** 40n, 12) }), END]);
    await rejects(readAll(chunks(paxHuge)), "INVALID_ARCHIVE", /limit/);
  });

  test("a NUL byte in a PAX path or linkpath is INVALID_ARCHIVE", async () => {
    for (const key of ["path", "linkpath"]) {
      const pax = paxRecord(key, Buffer.from("a\0b"));
      const archive = Buffer.concat([
        entry({ name: "p", typeflag: "x" }, pax),
        entry({ name: "x", typeflag: "2" }),
        END,
      ]);
      await rejects(readAll(chunks(archive)), "INVALID_ARCHIVE", /NUL byte/);
    }
  });

  test("base-256 ids, global PAX headers, GNU long names, meta entries split across chunks", async () => {
    const longName = `${"n/".repeat(150)}leaf`;
    const archive = Buffer.concat([
      entry(
        { name: "g", typeflag: "g" },
        Buffer.concat([paxRecord("mtime", "1234.5"), paxRecord("uname", "global")]),
      ),
      entry({ name: "a", uid: base256(70000n, 8), gid: base256(1n << 40n, 8) }, Buffer.from("A")),
      entry({ name: "././@LongLink", typeflag: "L", format: "gnu" }, Buffer.from(`${longName}\0`)),
      entry({ name: "short", format: "gnu" }, Buffer.from("BB")),
      END,
    ]);
    const seen = await readAll(chunks(archive, 7));
    assert.deepEqual(
      seen.map((s) => [s.entry.header.path, s.entry.header.uid, s.entry.header.mtime, s.entry.header.uname]),
      [
        ["a", 70000, 1234, "global"],
        [longName, 0, 1234, "global"],
      ],
    );
    assert.equal(seen[0]!.entry.header.gid, 2 ** 40);
    assert.equal(seen[0]!.entry.offset, 1024 + 512);
    assert.equal(seen[1]!.sha256, sha256(Buffer.from("BB")));
  });

  test("unread or partly read data is skipped; data() after moving on is refused", async () => {
    const archive = Buffer.concat([
      entry({ name: "a" }, randomBytes(100_000)),
      entry({ name: "b" }, Buffer.from("bee")),
      END,
    ]);
    const kept: TarEntry[] = [];
    const contents: string[] = [];
    for await (const e of readTar(chunks(archive, 1000))) {
      kept.push(e);
      if (e.header.path === "a") {
        for await (const c of e.data()) {
          assert.ok(c.length > 0);
          break; // read one chunk only
        }
      } else {
        for await (const c of e.data()) contents.push(c.toString());
      }
    }
    assert.deepEqual(contents, ["bee"]);
    assert.throws(() => kept[0]!.data(), /data\(\) called twice or after the reader moved on/);
  });

  test("the input is read to its end (a digest check sees it) and closed when the caller stops early", async () => {
    const archive = Buffer.concat([
      entry({ name: "a" }, Buffer.from("a")),
      entry({ name: "b" }),
      END,
      Buffer.alloc(8192),
    ]);
    let finished = false;
    async function* tracked(): AsyncGenerator<Buffer> {
      yield* chunks(archive, 512);
      finished = true;
    }
    assert.equal((await readAll(tracked())).length, 2);
    assert.ok(finished, "read past the end marker to the end of the input");
    let closed = false;
    async function* watched(): AsyncGenerator<Buffer> {
      try {
        yield* chunks(archive, 512);
      } finally {
        closed = true;
      }
    }
    for await (const _ of readTar(watched())) break;
    assert.ok(closed);
    // An error at the end of the input (a digest mismatch) comes out of the reader.
    async function* failing(): AsyncGenerator<Buffer> {
      yield* chunks(archive, 512);
      throw new Error("digest mismatch at the end");
    }
    await assert.rejects(readAll(failing()), /digest mismatch at the end/);
  });
});

/** A PAX 0.1 sparse entry with the given map, stored bytes and real size. */
function pax01(map: number[], stored: Buffer, realSize: number): Buffer {
  const records = Buffer.concat([
    paxRecord("GNU.sparse.size", String(realSize)),
    paxRecord("GNU.sparse.numblocks", String(map.length / 2)),
    paxRecord("GNU.sparse.map", map.join(",")),
    paxRecord("GNU.sparse.name", "s"),
  ]);
  return Buffer.concat([
    entry({ name: "x", typeflag: "x" }, records),
    entry({ name: "GNUSparseFile.0/s" }, stored),
    END,
  ]);
}

describe("sparse maps", () => {
  test("a consistent hand-made map materializes with zeros in the holes", async () => {
    const [s] = await readAll(chunks(pax01([2, 3, 10, 2], Buffer.from("abcde"), 16), 3));
    const expected = Buffer.from("\0\0abc\0\0\0\0\0de\0\0\0\0");
    assert.equal(s!.sha256, sha256(expected));
    assert.equal(s!.entry.header.path, "s");
  });

  test("overlapping, out-of-range or mis-summed maps are INVALID_ARCHIVE, not corrupt files", async () => {
    const cases: [number[], number, number, RegExp][] = [
      [[0, 4, 2, 4], 8, 16, /overlaps/],
      [[8, 4, 0, 4], 8, 16, /overlaps or precedes/],
      [[0, 4, 14, 4], 8, 16, /beyond the size/],
      [[0, 4, 8, 4], 9, 16, /hold 8 bytes but 9 are stored/],
    ];
    for (const [map, stored, realSize, pattern] of cases) {
      await rejects(readAll(chunks(pax01(map, randomBytes(stored), realSize))), "INVALID_ARCHIVE", pattern);
    }
  });

  test("a garbled pax-1.0 map is INVALID_ARCHIVE", async () => {
    const records = (realSize: number) =>
      Buffer.concat([
        paxRecord("GNU.sparse.major", "1"),
        paxRecord("GNU.sparse.minor", "0"),
        paxRecord("GNU.sparse.realsize", String(realSize)),
        paxRecord("GNU.sparse.name", "s"),
      ]);
    const make = (mapText: string, data: Buffer) =>
      Buffer.concat([
        entry({ name: "x", typeflag: "x" }, records(100)),
        entry({ name: "s" }, Buffer.concat([pad(Buffer.from(mapText)), data])),
        END,
      ]);
    const [ok] = await readAll(chunks(make("1\n10\n3\n", Buffer.from("xyz"))));
    assert.equal(ok!.entry.stored, 3);
    assert.equal(ok!.entry.offset, 512 * 4);
    assert.equal(ok!.sha256, sha256(Buffer.concat([Buffer.alloc(10), Buffer.from("xyz"), Buffer.alloc(87)])));
    await rejects(readAll(chunks(make("1\n1x\n3\n", Buffer.from("xyz")))), "INVALID_ARCHIVE", /bad byte/);
    await rejects(
      readAll(chunks(make(`200\n${"1\n".repeat(254)}`, Buffer.alloc(0)))),
      "INVALID_ARCHIVE",
      /runs past/,
    );
    await rejects(readAll(chunks(make("99999999\n", Buffer.alloc(0)))), "INVALID_ARCHIVE", /regions/);
  });

  test("sparseContent refuses stored data shorter or longer than the map", async () => {
    const consume = async (stored: Buffer) => {
      for await (const _ of sparseContent([{ offset: 4, size: 4 }], 10, chunks(stored, 2))) {
      }
    };
    await consume(Buffer.from("abcd"));
    await rejects(consume(Buffer.from("abc")), "INVALID_ARCHIVE", /shorter/);
    await rejects(consume(Buffer.from("abcde")), "INVALID_ARCHIVE", /longer/);
  });
});

describe("readTar on layers written by umoci insert 0.4.7", () => {
  test("a stream that ends right after the last entry's data (no padding, no end blocks) is whole", async () => {
    const layer = Buffer.concat([
      entry({ name: "a" }, Buffer.from("first\n")),
      header({ name: "x", size: 3 }),
      Buffer.from("abc"),
    ]);
    const seen = await readAll(
      (async function* () {
        yield layer;
      })(),
    );
    assert.deepEqual(
      seen.map((s) => [s.entry.header.path, s.sha256]),
      [
        ["a", sha256(Buffer.from("first\n"))],
        ["x", sha256(Buffer.from("abc"))],
      ],
    );
  });
});
