/**
 * Names are bytes on Linux: kiln export keeps each name and link target exactly as the tar holds
 * it, in every format. Before, names were decoded as UTF-8: invalid bytes became U+FFFD, two names
 * differing only there collapsed into one, and a 204-byte name grew past 255 bytes.
 */
import assert from "node:assert/strict";
import { mkdirSync, readdirSync, readFileSync, readlinkSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { buildImage } from "../helpers/images.js";
import { type Sandbox, sandbox } from "./kiln.js";

const b = (...parts: (string | number[])[]) =>
  Buffer.concat(parts.map((p) => (typeof p === "string" ? Buffer.from(p) : Buffer.from(p))));

/** Files (name → content) and one symlink, in one directory; none of these names is UTF-8 but café. */
const FILES: [Buffer, string][] = [
  [b("bad-", [0xff, 0xfe]), "one\n"],
  [b("bad-", [0xfe, 0xff]), "two\n"],
  [Buffer.alloc(204, 0xff), "204 bytes\n"],
  [b("caf", [0xc3, 0xa9]), "utf-8\n"],
  [b("latin1-", [0xe9, 0x74, 0xe9]), "latin-1\n"],
];
const LINK = b("link-", [0xe9]);
const LINK_TARGET = b([0xe9, 0x74, 0xe9], "/", [0x80]);

/** What a directory holds: hex name → content, or → "-> " + hex target for a symlink. */
function listing(dir: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const name of readdirSync(dir, { encoding: "buffer" })) {
    const path = Buffer.concat([Buffer.from(`${dir}/`), name]);
    const hex = name.toString("hex");
    try {
      out.set(hex, `-> ${readlinkSync(path, { encoding: "buffer" }).toString("hex")}`);
    } catch {
      out.set(hex, readFileSync(path, "utf8"));
    }
  }
  return out;
}

function expected(): Map<string, string> {
  const out = new Map(FILES.map(([n, c]) => [n.toString("hex"), c]));
  out.set(LINK.toString("hex"), `-> ${LINK_TARGET.toString("hex")}`);
  return out;
}

describe("kiln export keeps names as bytes", () => {
  let box: Sandbox;
  let work: string;
  before(async () => {
    box = await sandbox();
    work = await makeTempDir("names");
    // Layer 0: GNU tar's gnu format (raw bytes in the header); layer 1: posix (PAX path records).
    const layers = [];
    for (const [i, format] of ["gnu", "posix"].entries()) {
      const src = join(work, `src-${i}`);
      const dir = join(src, `d${i}`);
      mkdirSync(dir, { recursive: true });
      for (const [name, content] of FILES)
        writeFileSync(Buffer.concat([Buffer.from(`${dir}/`), name]), content);
      symlinkSync(LINK_TARGET, Buffer.concat([Buffer.from(`${dir}/`), LINK]));
      const tarFile = join(work, `layer-${i}.tar`);
      await run("tar", ["-C", src, `--format=${format}`, "--sort=name", "-cf", tarFile, `d${i}`]);
      layers.push({ tarFile });
    }
    const image = await buildImage(join(work, "image"), { tag: "t", layers });
    const r = await box.kiln(["import", image.dir, "--tag", "names:1"]);
    assert.equal(r.code, 0, r.stderr);
  });
  after(async () => {
    await box?.cleanup();
    if (work) await removeDir(work);
  });

  /** Exports `format` and unpacks it with the format's own tool into a new directory. */
  async function exported(format: string, unpack: (out: string, dir: string) => Promise<void>) {
    const out = join(work, `out.${format}`);
    const r = await box.kiln(["export", "names:1", "--format", format, "-o", out]);
    assert.equal(r.code, 0, r.stderr);
    const dir = join(work, `unpacked-${format}`);
    mkdirSync(dir);
    await unpack(out, dir);
    return dir;
  }

  it("ext4 (e2fsck, debugfs rdump)", async () => {
    const dir = await exported("ext4", async (out, to) => {
      await run("e2fsck", ["-fn", out]);
      await run("debugfs", ["-R", `rdump / ${to}`, out]);
    });
    assert.deepEqual(listing(join(dir, "d0")), expected());
    assert.deepEqual(listing(join(dir, "d1")), expected());
  });

  it("erofs (fsck.erofs --extract)", async () => {
    const dir = await exported("erofs", async (out, to) => {
      await run("fsck.erofs", [`--extract=${to}/x`, out]);
    });
    assert.deepEqual(listing(join(dir, "x", "d0")), expected());
    assert.deepEqual(listing(join(dir, "x", "d1")), expected());
  });

  it("erofs-layers (fsck.erofs --extract of each layer)", async () => {
    const dir = await exported("erofs-layers", async (out, to) => {
      for (const [i, file] of ["layer-000.erofs", "layer-001.erofs"].entries()) {
        await run("fsck.erofs", [`--extract=${to}/${i}`, join(out, file)]);
      }
    });
    assert.deepEqual(listing(join(dir, "0", "d0")), expected());
    assert.deepEqual(listing(join(dir, "1", "d1")), expected());
  });

  it("cpio (cpio -i)", async () => {
    const dir = await exported("cpio", async (out, to) => {
      await run("sh", ["-c", `cd '${to}' && cpio -id --quiet < '${out}'`]);
    });
    assert.deepEqual(listing(join(dir, "d0")), expected());
    assert.deepEqual(listing(join(dir, "d1")), expected());
  });
});
