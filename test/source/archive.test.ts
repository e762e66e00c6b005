import assert from "node:assert/strict";
import {
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { gzipSync } from "node:zlib";
import { isKilnError } from "../../src/errors.js";
import { formatReference } from "../../src/reference/reference.js";
import { openArchive } from "../../src/source/archive.js";
import type { ImageSource } from "../../src/source/types.js";
import { buildBaseImages, collect, packDir, run, sha256, skopeo, unpack } from "./fixtures.js";

function code(c: string, pattern?: RegExp) {
  return (err: unknown) => {
    assert.ok(isKilnError(err, c as never), `expected ${c}, got ${String(err)}`);
    if (pattern) assert.match((err as Error).message, pattern);
    return true;
  };
}

async function closeAll(sources: ImageSource[]): Promise<void> {
  for (const s of sources) await s.close();
}

async function refsOf(sources: ImageSource[]): Promise<(string | undefined)[]> {
  const out: (string | undefined)[] = [];
  for (const s of sources) {
    const { ref } = await s.resolve({});
    out.push(ref && formatReference(ref));
  }
  return out;
}

describe("openArchive", () => {
  let dir: string;
  let layout: string;
  let archive: string;
  /** Two images in one docker archive: example.com/app:1 (amd64) and example.com/app:2 (arm64). */
  let multi: string;
  let n = 0;
  const fresh = (name: string) => join(dir, `${name}-${n++}`);

  before(() => {
    dir = mkdtempSync(join(tmpdir(), "kiln-archive-"));
    layout = buildBaseImages(dir).layout;
    archive = join(dir, "one.tar");
    skopeo("copy", "-q", `oci:${layout}:t`, `docker-archive:${archive}:example.com/app:1`);
    const second = join(dir, "two.tar");
    skopeo("copy", "-q", `oci:${layout}:small`, `docker-archive:${second}:example.com/app:2`);
    const d = unpack(archive, join(dir, "multi"));
    const first = JSON.parse(readFileSync(join(d, "manifest.json"), "utf8"));
    const d2 = unpack(second, join(dir, "multi2"));
    const other = JSON.parse(readFileSync(join(d2, "manifest.json"), "utf8"));
    run("cp", ["-a", `${d2}/.`, d]);
    writeFileSync(
      join(d, "manifest.json"),
      JSON.stringify([...first, ...other, { ...first[0], RepoTags: null }]),
    );
    multi = packDir(d, join(dir, "multi.tar"));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  test("a path that does not exist is NOT_FOUND", async () => {
    await assert.rejects(openArchive(join(dir, "nope.tar")), code("NOT_FOUND", /nope\.tar/));
  });

  test("garbage, an empty file, a plain tar and a plain directory are INVALID_ARCHIVE", async () => {
    const garbage = fresh("garbage");
    const bytes = Buffer.alloc(10_000);
    for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 131 + 7) & 0xff;
    writeFileSync(garbage, bytes);
    await assert.rejects(openArchive(garbage), code("INVALID_ARCHIVE", /not a tar archive/));
    const empty = fresh("empty");
    writeFileSync(empty, "");
    await assert.rejects(openArchive(empty), code("INVALID_ARCHIVE", /not an image archive/));
    const rootfs = fresh("rootfs");
    mkdirSync(rootfs);
    writeFileSync(join(rootfs, "hello"), "hi");
    await assert.rejects(
      openArchive(rootfs),
      code("INVALID_ARCHIVE", /neither manifest\.json .* nor index\.json/),
    );
    await assert.rejects(
      openArchive(packDir(rootfs, `${rootfs}.tar`)),
      code("INVALID_ARCHIVE", /not an image archive/),
    );
  });

  test("gzip-compressed archives: refused without tmpDir, read through one temporary copy with it", async () => {
    const gz = fresh("gz");
    writeFileSync(gz, gzipSync(readFileSync(archive)));
    await assert.rejects(
      openArchive(gz),
      code("INVALID_ARCHIVE", /compressed archive \(gzip\): decompress it first/),
    );

    const tmp = fresh("tmp");
    mkdirSync(tmp);
    const [plain] = await openArchive(archive);
    const want = await plain!.resolve({});
    await plain!.close();
    const sources = await openArchive(gz, { tmpDir: tmp });
    assert.equal(readdirSync(tmp).length, 1, "one temporary directory while open");
    const got = await sources[0]!.resolve({});
    assert.equal(got.manifest.digest, want.manifest.digest);
    const layer = await collect(await sources[0]!.openBlob(got.layers[0]!));
    assert.equal(sha256(layer), got.layers[0]!.digest);
    assert.equal(sources[0]!.origin, `docker-archive:${gz}:example.com/app:1`);
    await closeAll(sources);
    assert.deepEqual(readdirSync(tmp), [], "removed when the last source closes");

    const cut = fresh("cut-gz");
    writeFileSync(cut, readFileSync(gz).subarray(0, 5000));
    await assert.rejects(
      openArchive(cut, { tmpDir: tmp }),
      code("INVALID_ARCHIVE", /corrupt or truncated gzip/),
    );
    assert.deepEqual(readdirSync(tmp), []);
  });

  test("zstd, xz and bzip2 archives are refused", async () => {
    const zst = fresh("zst");
    run("zstd", ["-q", archive, "-o", zst]);
    await assert.rejects(
      openArchive(zst, { tmpDir: dir }),
      code("INVALID_ARCHIVE", /compressed archive \(zstd\)/),
    );
    const xz = fresh("xz");
    writeFileSync(xz, Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 0, 0]));
    await assert.rejects(openArchive(xz), code("INVALID_ARCHIVE", /\(xz\)/));
  });

  test("several images: one source per name, untagged ones too; --tag picks one by name", async () => {
    const all = await openArchive(multi);
    assert.deepEqual(await refsOf(all), ["example.com/app:1", "example.com/app:2"]);
    assert.deepEqual(
      all.map((s) => s.origin),
      [`docker-archive:${multi}:example.com/app:1`, `docker-archive:${multi}:example.com/app:2`],
      "the third entry, the same image as the first without RepoTags, adds nothing",
    );
    await closeAll(all);

    const picked = await openArchive(multi, { tag: "example.com/app:2" });
    assert.equal(picked.length, 1);
    const resolved = await picked[0]!.resolve({});
    assert.equal(resolved.platform.architecture, "arm64");
    assert.equal(formatReference(resolved.ref!), "example.com/app:2");
    await closeAll(picked);

    await assert.rejects(
      openArchive(multi, { tag: "example.com/other:1" }),
      code("INVALID_ARGUMENT", /holds 2 images/),
    );
  });

  test("several images with bare OCI tags: --tag picks the one with that tag", async () => {
    const all = await openArchive(layout);
    assert.deepEqual(await refsOf(all), [undefined, undefined]);
    await closeAll(all);
    const [small, ...rest] = await openArchive(layout, { tag: "example.com/x:small" });
    assert.equal(rest.length, 0);
    assert.equal((await small!.resolve({})).platform.architecture, "arm64");
    await small!.close();
  });

  test("--tag must be a name: a digest or an invalid reference is refused", async () => {
    await assert.rejects(
      openArchive(archive, { tag: `example.com/app@${sha256("x")}` }),
      code("INVALID_ARGUMENT"),
    );
    await assert.rejects(openArchive(archive, { tag: "Not A Name" }), code("INVALID_REFERENCE"));
  });

  test("a blob stream fails clearly if the file shrinks after indexing, and stops on abort", async () => {
    const copy = fresh("shrinks");
    writeFileSync(copy, readFileSync(archive));
    const [s] = await openArchive(copy);
    const { layers } = await s!.resolve({});
    const big = layers.reduce((a, b) => (a.size > b.size ? a : b));

    const abort = new AbortController();
    const stream = await s!.openBlob(big, { signal: abort.signal });
    const reading = collect(stream);
    abort.abort(new Error("stop"));
    await assert.rejects(reading, /stop/);

    truncateSync(copy, statSync(copy).size - Math.floor(big.size / 2));
    await assert.rejects(
      collect(await s!.openBlob(big)),
      code("INVALID_ARCHIVE", /truncated archive: member ".*" of .* ended after/),
    );
    await s!.close();
  });

  test("a closed source refuses use; closing twice is harmless", async () => {
    const [s] = await openArchive(archive);
    await s!.close();
    await s!.close();
    await assert.rejects(s!.resolve({}), code("INTERNAL", /after close/));
  });
});
