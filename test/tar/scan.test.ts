import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { linkSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { isKilnError } from "../../src/errors.js";
import { normalizeMemberName, scanTar } from "../../src/tar/scan.js";
import { base256, END, entry, header, paxRecord } from "./fixtures.js";

describe("scanTar", () => {
  let dir: string;
  let n = 0;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), "kiln-tar-scan-"));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  function file(bytes: Buffer): string {
    const p = join(dir, `a${n++}.tar`);
    writeFileSync(p, bytes);
    return p;
  }

  const rejects = (path: string, pattern: RegExp) =>
    assert.rejects(scanTar(path), (err: unknown) => {
      assert.ok(isKilnError(err, "INVALID_ARCHIVE"), String(err));
      assert.match((err as Error).message, pattern);
      assert.ok((err as Error).message.includes(path), "the message names the archive");
      return true;
    });

  test("indexes a GNU tar archive: offsets point at each member's bytes", async () => {
    const root = join(dir, "root");
    const long = "l".repeat(180);
    mkdirSync(join(root, "sub"), { recursive: true });
    writeFileSync(join(root, "small"), "small file");
    const big = Buffer.alloc(70_000);
    for (let i = 0; i < big.length; i++) big[i] = (i * 7) & 0xff;
    writeFileSync(join(root, "sub", "big"), big);
    writeFileSync(join(root, long), "long name");
    symlinkSync("../small", join(root, "sub", "link"));
    linkSync(join(root, "small"), join(root, "hard"));
    for (const format of ["pax", "gnu", "ustar"]) {
      const tarPath = join(dir, `gnu-${format}.tar`);
      const members = format === "ustar" ? ["./small", "./sub", "./hard"] : ["."];
      execFileSync("tar", [`--format=${format}`, "-cf", tarPath, "-C", root, ...members]);
      const index = await scanTar(tarPath);
      const bytes = readFileSync(tarPath);
      const small = index.get("small");
      assert.ok(small, format);
      assert.equal(bytes.subarray(small.offset, small.offset + small.size).toString(), "small file");
      const b = index.get("sub/big")!;
      assert.equal(b.size, big.length);
      assert.deepEqual(bytes.subarray(b.offset, b.offset + b.size), big);
      assert.equal(index.get("sub")?.type, "directory");
      const hard = index.get("hard") ?? index.get("small");
      assert.ok(hard?.type === "hardlink" || hard?.type === "file");
      if (format !== "ustar") {
        const l = index.get(long)!;
        assert.equal(bytes.subarray(l.offset, l.offset + l.size).toString(), "long name");
        assert.deepEqual(
          [index.get("sub/link")?.type, index.get("sub/link")?.linkname],
          ["symlink", "../small"],
        );
      }
    }
  });

  test("accepts an archive that ends without the zero blocks, at a header boundary", async () => {
    const a = Buffer.concat([
      entry({ name: "a" }, Buffer.from("A")),
      entry({ name: "b" }, Buffer.from("B".repeat(600))),
    ]);
    const index = await scanTar(file(a));
    assert.deepEqual([...index.keys()], ["a", "b"]);
    assert.equal(index.get("b")?.offset, 1536);
    const oneZero = await scanTar(file(Buffer.concat([a, Buffer.alloc(512)])));
    assert.equal(oneZero.size, 2);
  });

  test("stops at the end marker: what follows is not read", async () => {
    const index = await scanTar(file(Buffer.concat([entry({ name: "a" }), END, Buffer.alloc(512, 0x41)])));
    assert.deepEqual([...index.keys()], ["a"]);
  });

  test("an empty file is an empty archive", async () => {
    assert.equal((await scanTar(file(Buffer.alloc(0)))).size, 0);
  });

  test("later members replace earlier ones; names are normalized", async () => {
    const index = await scanTar(
      file(
        Buffer.concat([
          entry({ name: "./x/y" }, Buffer.from("1")),
          entry({ name: "/x//y" }, Buffer.from("22")),
          entry({ name: "./", typeflag: "5" }),
          END,
        ]),
      ),
    );
    assert.equal(index.get("x/y")?.size, 2);
    assert.ok(index.has(""));
    assert.equal(normalizeMemberName("./blobs/sha256/ab/"), "blobs/sha256/ab");
    assert.equal(normalizeMemberName("../../etc/./passwd"), "etc/passwd");
    assert.equal(normalizeMemberName("a/b/../c"), "a/c");
  });

  test("PAX path and size decide the name and the data skipped", async () => {
    const name = `${"p/".repeat(80)}end`;
    const data = Buffer.alloc(1500, 0x61);
    const archive = Buffer.concat([
      entry({ typeflag: "x" }, Buffer.concat([paxRecord("path", name), paxRecord("size", "1500")])),
      header({ name: "short", size: 0 }),
      data,
      Buffer.alloc(36),
      entry({ name: "after" }, Buffer.from("ok")),
      END,
    ]);
    const index = await scanTar(file(archive));
    assert.equal(index.get(name)?.size, 1500);
    assert.equal(index.get("after")?.offset, 512 * 2 + 512 + 1536 + 512);
  });

  test("a member cut short is INVALID_ARCHIVE: truncated", async () => {
    const whole = Buffer.concat([entry({ name: "a" }, Buffer.alloc(5000, 1)), END]);
    await rejects(file(whole.subarray(0, 3000)), /truncated.*member "a"/);
    await rejects(file(whole.subarray(0, 300)), /truncated.*header at offset 0/);
  });

  test("absurd sizes fail at once, never a hang or a huge allocation", async () => {
    await rejects(
      file(Buffer.concat([header({ name: "huge", size: 0o77777777777 }), END])),
      /truncated.*"huge"/,
    );
    await rejects(
      file(Buffer.concat([header({ name: "huger", size: base256(1n << 52n, 12) }), END])),
      /truncated.*"huger"/,
    );
    await rejects(file(Buffer.concat([header({ name: "pax", typeflag: "x", size: 1 << 30 }), END])), /limit/);
    await rejects(
      file(Buffer.concat([header({ name: "n", size: base256(1n << 80n, 12) }), END])),
      /size out of range .*header at offset 0/,
    );
  });

  test("random bytes and bad checksums are INVALID_ARCHIVE", async () => {
    const random = Buffer.alloc(4096);
    for (let i = 0; i < random.length; i++) random[i] = (i * 2654435761) >>> 24;
    await rejects(file(random), /not a tar archive.*offset 0/);
    const second = Buffer.concat([entry({ name: "a" }), header({ name: "b" }), END]);
    second[600] ^= 0xff;
    await rejects(file(second), /checksum at offset 512/);
  });

  test("extended headers with no entry after them are INVALID_ARCHIVE", async () => {
    await rejects(file(Buffer.concat([entry({ typeflag: "x" }, paxRecord("path", "p"))])), /extended header/);
    await rejects(
      file(Buffer.concat([entry({ typeflag: "L" }, Buffer.from("n\0")), END])),
      /extended header/,
    );
  });

  test("GNU sparse files with extension blocks: offsets stay right", async () => {
    const holes = join(dir, "holes");
    writeFileSync(holes, "");
    execFileSync("truncate", ["-s", "4M", holes]);
    // 12 separate data regions: more than the 4 a GNU header holds, so extension blocks follow it.
    for (let i = 0; i < 12; i++) {
      execFileSync(
        "dd",
        ["if=/dev/zero", `of=${holes}`, "bs=4096", "count=1", `seek=${i * 64}`, "conv=notrunc"],
        {
          stdio: "ignore",
        },
      );
      execFileSync("sh", [
        "-c",
        `printf 'R${i}' | dd of=${holes} bs=1 seek=${i * 64 * 4096} conv=notrunc 2>/dev/null`,
      ]);
    }
    writeFileSync(join(dir, "tail"), "tail member");
    for (const flags of [
      ["--format=gnu"],
      ["--format=pax", "--sparse-version=1.0"],
      ["--format=pax", "--sparse-version=0.0"],
    ]) {
      const tarPath = join(dir, "sparse.tar");
      execFileSync("tar", [...flags, "-S", "-cf", tarPath, "-C", dir, "holes", "tail"]);
      const index = await scanTar(tarPath);
      const bytes = readFileSync(tarPath);
      assert.equal(index.get("holes")?.sparse, true, flags.join(" "));
      const t = index.get("tail")!;
      assert.equal(bytes.subarray(t.offset, t.offset + t.size).toString(), "tail member", flags.join(" "));
    }
  });

  test("a missing file is ENOENT (the caller maps it)", async () => {
    await assert.rejects(scanTar(join(dir, "nope.tar")), { code: "ENOENT" });
  });
});
