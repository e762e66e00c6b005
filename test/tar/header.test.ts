import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { isKilnError } from "../../src/errors.js";
import { fromText } from "../../src/io/bytestring.js";
import {
  checksumMatches,
  entryDataSize,
  HeaderAssembler,
  isMetaEntry,
  MAX_META_SIZE,
  paddedSize,
  parseHeaderBlock,
  parseNumeric,
  parsePax,
  parsePaxTime,
  parseSparseExtension,
  type TarHeader,
} from "../../src/tar/header.js";
import { base256, END, entry, header, paxRecord } from "./fixtures.js";

/** Reads every entry of an in-memory archive the way the streaming reader will. */
function readAll(archive: Buffer): TarHeader[] {
  const out: TarHeader[] = [];
  const asm = new HeaderAssembler();
  let pos = 0;
  while (pos + 512 <= archive.length) {
    const block = parseHeaderBlock(archive.subarray(pos, pos + 512), `offset ${pos}`);
    if (block === null) break;
    if (isMetaEntry(block)) {
      HeaderAssembler.checkMetaSize(block);
      asm.absorb(block, archive.subarray(pos + 512, pos + 512 + block.size));
      pos += 512 + paddedSize(block.size);
      continue;
    }
    const h = asm.finish(block);
    out.push(h);
    pos += 512 + paddedSize(entryDataSize(h));
  }
  return out;
}

const invalidArchive = (err: unknown) => isKilnError(err, "INVALID_ARCHIVE");

describe("tar header blocks", () => {
  test("ustar fields decode", () => {
    const h = parseHeaderBlock(
      header({
        name: "etc/passwd",
        mode: 0o4755,
        uid: 1000,
        gid: 100,
        size: 1234,
        mtime: 1_600_000_000,
        uname: "alice",
        gname: "users",
      }),
    );
    assert.ok(h);
    assert.equal(h.name, "etc/passwd");
    assert.equal(h.mode, 0o4755);
    assert.equal(h.uid, 1000);
    assert.equal(h.gid, 100);
    assert.equal(h.size, 1234);
    assert.equal(h.mtime, 1_600_000_000);
    assert.equal(h.type, "file");
    assert.equal(h.uname, "alice");
    assert.equal(h.gname, "users");
    assert.equal(h.format, "ustar");
  });

  test("a 100-byte name without NUL and the ustar prefix join", () => {
    const name = "n".repeat(100);
    assert.equal(parseHeaderBlock(header({ name }))?.name, name);
    assert.equal(parseHeaderBlock(header({ name: "leaf", prefix: "a/b/c" }))?.name, "a/b/c/leaf");
    // GNU format has no prefix field: bytes there are atime/ctime, not a name.
    assert.equal(parseHeaderBlock(header({ name: "leaf", format: "gnu" }))?.format, "gnu");
  });

  test("types, devices and header-only data sizes", () => {
    const dev = parseHeaderBlock(header({ name: "dev/null", typeflag: "3", devmajor: 1, devminor: 3 }))!;
    assert.equal(dev.type, "char");
    assert.deepEqual([dev.devmajor, dev.devminor], [1, 3]);
    const link = parseHeaderBlock(header({ name: "b", typeflag: "1", linkname: "a", size: 99 }))!;
    assert.equal(link.type, "hardlink");
    assert.equal(link.linkname, "a");
    assert.equal(entryDataSize(link), 0, "hardlinks carry no data even with a size field");
    // v7's trailing-slash directories are told from the final path, once long names are folded in.
    const old = parseHeaderBlock(header({ name: "old/", typeflag: "\0", format: "v7", size: 5 }))!;
    assert.equal(new HeaderAssembler().finish(old).type, "directory");
    assert.equal(entryDataSize(old), 5, "an old-style file's data is skipped even when it names a directory");
    const file = parseHeaderBlock(header({ name: "file/", typeflag: "0" }))!;
    assert.equal(
      new HeaderAssembler().finish(file).type,
      "file",
      "a trailing slash makes only a v7 file a directory",
    );
    assert.equal(parseHeaderBlock(header({ typeflag: "7" }))?.type, "file");
    assert.equal(parseHeaderBlock(header({ typeflag: "V" }))?.type, "other");
    assert.throws(() => parseHeaderBlock(header({ typeflag: "S", format: "ustar" })), invalidArchive);
  });

  test("an all-zero block is the end marker", () => {
    assert.equal(parseHeaderBlock(Buffer.alloc(512)), null);
  });

  test("a bad checksum is INVALID_ARCHIVE", () => {
    const block = header({ name: "x" });
    block[0] = "y".charCodeAt(0);
    assert.equal(checksumMatches(block), false);
    assert.throws(
      () => parseHeaderBlock(block, "offset 0"),
      (err: unknown) => {
        assert.ok(invalidArchive(err));
        assert.match((err as Error).message, /checksum at offset 0/);
        return true;
      },
    );
    assert.throws(() => parseHeaderBlock(header({ checksum: "abcdefg\0" })), invalidArchive);
    assert.throws(() => parseHeaderBlock(Buffer.alloc(512, 0x41)), invalidArchive);
  });

  test("a signed checksum (old tars) is accepted", () => {
    const block = header({ name: "\u00e9t\u00e9" }); // non-ASCII bytes make signed and unsigned sums differ
    let signed = 0;
    for (let i = 0; i < 512; i++) {
      const b = i >= 148 && i < 156 ? 0x20 : block[i]!;
      signed += b > 127 ? b - 256 : b;
    }
    block.write(`${signed.toString(8).padStart(6, "0")}\0 `, 148, "latin1");
    assert.equal(parseHeaderBlock(block)?.name, fromText("\u00e9t\u00e9"), "names are byte strings");
  });

  test("numeric fields: octal padding, base-256, garbage", () => {
    assert.equal(parseNumeric(Buffer.from("  1750 \0")), 0o1750);
    assert.equal(parseNumeric(Buffer.from("\0\0\0\0")), 0);
    assert.equal(parseNumeric(base256(5_000_000_000n, 8)), 5_000_000_000);
    assert.equal(parseNumeric(base256(-1n, 12)), -1);
    assert.equal(parseNumeric(base256(-1_000_000_000_000n, 12)), -1_000_000_000_000);
    assert.throws(() => parseNumeric(Buffer.from("12a4")), invalidArchive);
    assert.throws(() => parseNumeric(base256(1n << 70n, 12)), invalidArchive);
  });

  test("base-256 uid, gid, size and a negative mtime in a header", () => {
    const h = parseHeaderBlock(
      header({
        format: "gnu",
        uid: base256(3_000_000_000n, 8),
        gid: base256(70_000n, 8),
        size: base256(10_000_000_000n, 12),
        mtime: base256(-86_400n, 12),
      }),
    )!;
    assert.equal(h.uid, 3_000_000_000);
    assert.equal(h.gid, 70_000);
    assert.equal(h.size, 10_000_000_000);
    assert.equal(h.mtime, -86_400);
    assert.throws(() => parseHeaderBlock(header({ uid: base256(-5n, 8) })), invalidArchive);
    assert.throws(() => parseHeaderBlock(header({ size: base256(-5n, 12) })), invalidArchive);
  });

  test("GNU sparse extension blocks", () => {
    const block = Buffer.alloc(512);
    block.write("00000001000\0", 0, "latin1");
    block.write("00000000010\0", 12, "latin1");
    block[504] = 1;
    assert.deepEqual(parseSparseExtension(block), {
      map: [{ offset: 0o1000, size: 0o10 }],
      isExtended: true,
    });
  });
});

describe("PAX extended headers", () => {
  test("records keep binary values byte for byte", () => {
    const value = Buffer.from([0x00, 0xff, 0x0a, 0x3d, 0x20, 0x01, 0x00]);
    const records = parsePax(
      Buffer.concat([paxRecord("SCHILY.xattr.user.bin", value), paxRecord("path", "x")]),
    );
    assert.deepEqual(
      records.map((r) => r.key),
      ["SCHILY.xattr.user.bin", "path"],
    );
    assert.deepEqual(records[0]!.value, value);
  });

  test("malformed records are INVALID_ARCHIVE", () => {
    assert.throws(() => parsePax(Buffer.from("99 path=x\n")), invalidArchive);
    assert.throws(() => parsePax(Buffer.from("11 path=xy!")), invalidArchive);
    assert.throws(() => parsePax(Buffer.from("x path=y\n")), invalidArchive);
    assert.throws(() => parsePax(Buffer.from("9 pathxy\n")), invalidArchive);
    assert.deepEqual(parsePax(Buffer.concat([paxRecord("a", "b"), Buffer.alloc(20)])).length, 1);
    assert.throws(
      () => parsePax(Buffer.concat([paxRecord("a", "b"), Buffer.alloc(3), Buffer.from("7 a=b\n")])),
      invalidArchive,
    );
  });

  test("path, linkpath, size, ids, names and fractional mtime override the block", () => {
    const longPath = `${"dir/".repeat(40)}file`;
    const pax = Buffer.concat([
      paxRecord("path", longPath),
      paxRecord("linkpath", "t\u00e4rget"),
      paxRecord("size", "5"),
      paxRecord("uid", "4294967294"),
      paxRecord("gid", "70000"),
      paxRecord("uname", "\u00fcser"),
      paxRecord("gname", "grp"),
      paxRecord("mtime", "1700000000.123456789"),
      paxRecord("atime", "1700000001.5"),
    ]);
    const archive = Buffer.concat([
      entry({ name: "PaxHeaders/x", typeflag: "x" }, pax),
      entry({ name: "short", size: 99 }, Buffer.from("hello")).subarray(0, 1024),
      END,
    ]);
    const [h] = readAll(archive);
    assert.ok(h);
    assert.equal(h.path, longPath);
    assert.equal(h.linkpath, fromText("t\u00e4rget"));
    assert.equal(h.size, 5);
    assert.equal(h.uid, 4294967294);
    assert.equal(h.gid, 70000);
    assert.equal(h.uname, fromText("\u00fcser"));
    assert.equal(h.gname, "grp");
    assert.equal(h.mtime, 1_700_000_000);
    assert.equal(h.mtimeNsec, 123_456_789);
    assert.equal(h.pax.get("atime"), "1700000001.5");
    assert.equal(h.pax.has("path"), false);
  });

  test("PAX times with fractions, negative and short", () => {
    assert.deepEqual(parsePaxTime("12"), { sec: 12, nsec: 0 });
    assert.deepEqual(parsePaxTime("12.5"), { sec: 12, nsec: 500_000_000 });
    assert.deepEqual(parsePaxTime("12.1234567891234"), { sec: 12, nsec: 123_456_789 });
    assert.deepEqual(parsePaxTime("-1.25"), { sec: -2, nsec: 750_000_000 });
    assert.deepEqual(parsePaxTime("-3"), { sec: -3, nsec: 0 });
    assert.throws(() => parsePaxTime("1e9"), invalidArchive);
  });

  test("bad numbers in PAX records are INVALID_ARCHIVE", () => {
    for (const [key, value] of [
      ["size", "-1"],
      ["uid", "12x"],
      ["size", "99999999999999999999"],
      ["mtime", "soon"],
    ] as const) {
      const archive = Buffer.concat([
        entry({ typeflag: "x" }, paxRecord(key, value)),
        entry({ name: "f" }),
        END,
      ]);
      assert.throws(() => readAll(archive), invalidArchive, `${key}=${value}`);
    }
  });

  test("SCHILY.xattr values are raw bytes: NUL, 0xff, newline", () => {
    const cap = Buffer.from("0100000200200000000000000000000000000000", "hex");
    const odd = Buffer.from([0xff, 0x00, 0x0a, 0xfe, 0x00]);
    const pax = Buffer.concat([
      paxRecord("SCHILY.xattr.security.capability", cap),
      paxRecord("SCHILY.xattr.user.odd", odd),
      paxRecord("SCHILY.xattr.user.empty", ""),
    ]);
    const [h] = readAll(Buffer.concat([entry({ typeflag: "x" }, pax), entry({ name: "bin/ping" }), END]));
    assert.ok(h);
    assert.deepEqual(h.xattrs.get("security.capability"), cap);
    assert.deepEqual(h.xattrs.get("user.odd"), odd);
    assert.deepEqual(h.xattrs.get("user.empty"), Buffer.alloc(0), "an empty xattr is still an xattr");
    assert.equal(h.pax.size, 0);
  });

  test("LIBARCHIVE.xattr: %-encoded names, base64 values", () => {
    const value = Buffer.from([0x00, 0xff, 0x80, 0x0a]);
    const pax = paxRecord("LIBARCHIVE.xattr.user.a%3Db%20c", value.toString("base64"));
    const [h] = readAll(Buffer.concat([entry({ typeflag: "x" }, pax), entry({ name: "f" }), END]));
    assert.deepEqual(h?.xattrs.get("user.a=b c"), value);
    const bad = paxRecord("LIBARCHIVE.xattr.user.x", "not base64!");
    assert.throws(
      () => readAll(Buffer.concat([entry({ typeflag: "x" }, bad), entry({ name: "f" }), END])),
      invalidArchive,
    );
  });

  test("local headers apply once; global headers to every later entry; empty values unset", () => {
    const archive = Buffer.concat([
      entry({ typeflag: "g" }, Buffer.concat([paxRecord("uname", "global"), paxRecord("comment", "c")])),
      entry({ typeflag: "x" }, Buffer.concat([paxRecord("path", "first"), paxRecord("uname", "")])),
      entry({ name: "one", uname: "blockname" }),
      entry({ name: "two" }),
      END,
    ]);
    const [one, two] = readAll(archive);
    assert.equal(one?.path, "first");
    assert.equal(one?.uname, "blockname", "an empty local value restores the block's field");
    assert.equal(two?.path, "two");
    assert.equal(two?.uname, "global");
    assert.equal(two?.pax.get("comment"), "c");
  });

  test("meta entries larger than the limit are refused before reading", () => {
    const block = parseHeaderBlock(header({ typeflag: "x", size: MAX_META_SIZE + 1 }))!;
    assert.throws(() => HeaderAssembler.checkMetaSize(block), invalidArchive);
  });
});

describe("GNU long names", () => {
  test("L and K entries name the next entry", () => {
    const longName = `${"a".repeat(150)}/${"b".repeat(150)}`;
    const longLink = `/${"c".repeat(300)}`;
    const archive = Buffer.concat([
      entry({ name: "././@LongLink", typeflag: "L", format: "gnu" }, Buffer.from(`${longName}\0`)),
      entry({ name: "././@LongLink", typeflag: "K", format: "gnu" }, Buffer.from(`${longLink}\0`)),
      entry({ name: longName.slice(0, 99), typeflag: "2", linkname: "c".repeat(99), format: "gnu" }),
      entry({ name: "next", format: "gnu" }),
      END,
    ]);
    const [link, next] = readAll(archive);
    assert.equal(link?.path, longName);
    assert.equal(link?.linkpath, longLink);
    assert.equal(link?.type, "symlink");
    assert.equal(next?.path, "next");
    assert.equal(next?.linkpath, "");
  });

  test("a GNU long name wins over a PAX path (as Go's archive/tar)", () => {
    const archive = Buffer.concat([
      entry({ typeflag: "x" }, paxRecord("path", "pax-name")),
      entry({ typeflag: "L", format: "gnu" }, Buffer.from("gnu-name\0")),
      entry({ name: "block-name" }),
      END,
    ]);
    assert.equal(readAll(archive)[0]?.path, "gnu-name");
  });

  test("finish refuses a meta entry and absorb a plain one", () => {
    const asm = new HeaderAssembler();
    assert.throws(() => asm.finish(parseHeaderBlock(header({ typeflag: "L" }))!));
    assert.throws(() => asm.absorb(parseHeaderBlock(header({ typeflag: "0" }))!, Buffer.alloc(0)));
    asm.absorb(parseHeaderBlock(header({ typeflag: "L", size: 2 }))!, Buffer.from("a\0"));
    assert.equal(asm.pending, true);
  });
});

describe("archives written by GNU tar", () => {
  let dir: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), "kiln-tar-header-"));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  function tarOf(args: string[], cwd: string): Buffer {
    const out = join(dir, "out.tar");
    execFileSync("tar", ["-cf", out, ...args], { cwd });
    return readFileSync(out);
  }

  test("binary xattrs, long names (gnu and pax), base-256 ids, sparse maps", () => {
    const root = join(dir, "root");
    const deep = join(root, "d".repeat(60), "e".repeat(60));
    mkdirSync(deep, { recursive: true });
    const longFile = join(deep, "f".repeat(120));
    writeFileSync(longFile, "long");
    const xfile = join(root, "x");
    writeFileSync(xfile, "x");
    execFileSync("setfattr", ["-n", "user.bin", "-v", "0x00ff0a41", xfile]);

    const pax = readAll(tarOf(["--format=pax", "--xattrs", "--xattrs-include=*", "x"], root));
    assert.deepEqual(pax[0]?.xattrs.get("user.bin"), Buffer.from([0x00, 0xff, 0x0a, 0x41]));

    const rel = longFile.slice(root.length + 1);
    for (const format of ["gnu", "pax"]) {
      const entries = readAll(tarOf([`--format=${format}`, rel], root));
      assert.equal(entries[0]?.path, rel, format);
      assert.equal(entries[0]?.size, 4);
    }

    const ids = readAll(tarOf(["--format=gnu", "--owner=:3000000000", "--group=:2500000", "x"], root));
    assert.equal(ids[0]?.uid, 3_000_000_000);
    assert.equal(ids[0]?.gid, 2_500_000);

    const holes = join(root, "holes");
    writeFileSync(holes, "head");
    execFileSync("truncate", ["-s", "1M", holes]);
    execFileSync("dd", ["if=/dev/urandom", `of=${holes}`, "bs=4096", "count=1", "seek=100", "conv=notrunc"], {
      stdio: "ignore",
    });
    const gnu = readAll(tarOf(["--format=gnu", "-S", "holes"], root))[0]!;
    assert.equal(gnu.sparse?.format, "gnu-old");
    assert.equal(gnu.sparse?.realSize, 1024 * 1024);
    const pax1 = readAll(tarOf(["--format=pax", "--sparse-version=1.0", "-S", "holes"], root))[0]!;
    assert.equal(pax1.sparse?.format, "pax-1.0");
    assert.equal(pax1.path, "holes", "GNU.sparse.name replaces the GNUSparseFile.N name");
    const pax01 = readAll(tarOf(["--format=pax", "--sparse-version=0.1", "-S", "holes"], root))[0]!;
    assert.equal(pax01.sparse?.format, "pax-0.1");
    assert.ok(pax01.sparse!.map.some((r) => r.offset === 100 * 4096 && r.size === 4096));
    const pax00 = readAll(tarOf(["--format=pax", "--sparse-version=0.0", "-S", "holes"], root))[0]!;
    assert.equal(pax00.sparse?.format, "pax-0.0");
    assert.deepEqual(pax00.sparse?.map, pax01.sparse?.map);
  });
});
