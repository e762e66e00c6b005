/**
 * Hostile layers through `kiln export`: each case either fails with INVALID_ARCHIVE (and leaves no
 * artifact behind) or gives a safe result inside the image, and the test says which.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdir, readdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { base256, END, entry, paxRecord } from "../tar/fixtures.js";
import { assertFails, type Sandbox, sandbox } from "./kiln.js";

const sha = (b: Buffer) => `sha256:${createHash("sha256").update(b).digest("hex")}`;

/** A one-layer OCI layout whose layer is exactly `tar` (uncompressed), tagged `t`. */
async function layoutWith(dir: string, tar: Buffer): Promise<string> {
  const blobs = join(dir, "blobs", "sha256");
  await mkdir(blobs, { recursive: true });
  const put = async (bytes: Buffer) => {
    await writeFile(join(blobs, sha(bytes).slice(7)), bytes);
    return { digest: sha(bytes), size: bytes.length };
  };
  const config = Buffer.from(
    JSON.stringify({
      architecture: "amd64",
      os: "linux",
      config: {},
      rootfs: { type: "layers", diff_ids: [sha(tar)] },
    }),
  );
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: { mediaType: "application/vnd.oci.image.config.v1+json", ...(await put(config)) },
      layers: [{ mediaType: "application/vnd.oci.image.layer.v1.tar", ...(await put(tar)) }],
    }),
  );
  const m = await put(manifest);
  await writeFile(join(dir, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  await writeFile(
    join(dir, "index.json"),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [
        {
          mediaType: "application/vnd.oci.image.manifest.v1+json",
          ...m,
          annotations: { "org.opencontainers.image.ref.name": "t" },
        },
      ],
    }),
  );
  return dir;
}

const file = (name: string, text: string) => entry({ name, typeflag: "0" }, Buffer.from(text));

describe("kiln export of hostile layers", () => {
  let box: Sandbox;
  let work: string;
  before(async () => {
    box = await sandbox();
    work = await makeTempDir("hostile");
  });
  after(async () => {
    await box?.cleanup();
    if (work) await removeDir(work);
  });

  const artifacts = async () => (await readdir(join(box.root, "artifacts")).catch(() => [])).sort();
  let published: string[] = [];

  async function exportLayer(name: string, tar: Buffer) {
    published = await artifacts();
    const dir = await layoutWith(join(work, name), tar);
    const imported = await box.kiln(["import", dir, "--tag", `hostile/${name}:1`]);
    assert.equal(imported.code, 0, imported.stderr);
    const out = join(work, `${name}.ext4`);
    return { out, result: await box.kiln(["export", `hostile/${name}:1`, "--format", "ext4", "-o", out]) };
  }

  /**
   * The failed export left nothing at or beside its output and nothing in tmp/; the same export
   * into the store's cache (no -o) fails with the same code and publishes nothing.
   */
  async function assertNoArtifact(name: string, code: string): Promise<void> {
    assert.deepEqual(
      (await readdir(work)).filter((n) => n.startsWith(".") || n === `${name}.ext4`),
      [],
      "nothing at or beside the output",
    );
    assertFails(await box.kiln(["export", `hostile/${name}:1`, "--format", "ext4"]), code);
    const tmp = await readdir(join(box.root, "tmp"));
    assert.deepEqual({ artifacts: await artifacts(), tmp }, { artifacts: published, tmp: [] });
  }

  it("safe result: `../../etc/evil` and `/abs/file` land inside the image", async () => {
    const tar = Buffer.concat([file("../../etc/evil", "evil\n"), file("/abs/file", "abs\n"), END]);
    const { out, result } = await exportLayer("traversal", tar);
    assert.equal(result.code, 0, result.stderr);
    await run("e2fsck", ["-fn", out]);
    assert.equal(await run("debugfs", ["-R", "cat /etc/evil", out]), "evil\n");
    assert.equal(await run("debugfs", ["-R", "cat /abs/file", out]), "abs\n");
  });

  it("safe result: a file's data is never read as headers (a long name whose field ends in `/`)", async () => {
    // GNU tar's default format: the 150-byte path's first 100 bytes, in the name field, end in "/".
    const src = join(work, "smuggle-src");
    const dir = join(src, "a".repeat(99));
    await mkdir(dir, { recursive: true });
    await writeFile(join(src, "smuggled"), "#!/bin/sh\n");
    await run("tar", [
      "-C",
      src,
      "--owner=0",
      "--group=0",
      "--mode=4755",
      "-cf",
      join(work, "inner.tar"),
      "smuggled",
    ]);
    const inner = await readFile(join(work, "inner.tar"));
    await writeFile(join(dir, "b".repeat(50)), inner);
    const outer = join(work, "smuggle.tar");
    await run("tar", ["-C", src, "-cf", outer, "a".repeat(99)]);
    const { out, result } = await exportLayer("smuggle", await readFile(outer));
    assert.equal(result.code, 0, result.stderr);
    await run("e2fsck", ["-fn", out]);
    const path = `/${"a".repeat(99)}/${"b".repeat(50)}`;
    assert.deepEqual(await run("debugfs", ["-R", `cat ${path}`, out], { binary: true }), inner);
    assert.doesNotMatch(await run("debugfs", ["-R", "ls /", out]), /smuggled/);
  });

  it("UNSUPPORTED_ARCHIVE in every format: ids of 2^32 and above (never wrapped to root)", async () => {
    const pax = (records: Buffer) => entry({ name: "PaxHeaders/x", typeflag: "x" }, records);
    const tar = Buffer.concat([
      pax(paxRecord("uid", String(2 ** 32))),
      entry({ name: "usr/bin/suid", mode: 0o4755 }, Buffer.from("#!/bin/sh\n")),
      pax(paxRecord("gid", String(2 ** 32 + 1000))),
      entry({ name: "usr/bin/sgid", mode: 0o2755 }, Buffer.from("#!/bin/sh\n")),
      END,
    ]);
    await box.kiln(["import", await layoutWith(join(work, "ids"), tar), "--tag", "hostile/ids:1"]);
    for (const format of ["ext4", "erofs", "erofs-layers", "cpio"]) {
      const out = join(work, `ids-${format}`);
      const line = assertFails(
        await box.kiln(["export", "hostile/ids:1", "--format", format, "-o", out]),
        "UNSUPPORTED_ARCHIVE",
      );
      assert.match(
        line,
        /owner (4294967296:0 of \/usr\/bin\/suid|0:4294968296 of \/usr\/bin\/sgid) is out of range/,
        format,
      );
    }
  });

  it("INVALID_ARCHIVE: a symlink to / then a write through it", async () => {
    const tar = Buffer.concat([
      entry({ name: "escape", typeflag: "2", linkname: "/" }),
      file("escape/etc/passwd", "pwned\n"),
      END,
    ]);
    const { result } = await exportLayer("symlink-write", tar);
    assert.match(assertFails(result, "INVALID_ARCHIVE"), /escape/);
    await assertNoArtifact("symlink-write", "INVALID_ARCHIVE");
  });

  it("INVALID_ARCHIVE: a `..` symlink then a write through it", async () => {
    const tar = Buffer.concat([
      entry({ name: "up", typeflag: "2", linkname: "../../.." }),
      file("up/x", "x\n"),
      END,
    ]);
    const { result } = await exportLayer("dotdot-symlink", tar);
    assertFails(result, "INVALID_ARCHIVE");
    await assertNoArtifact("dotdot-symlink", "INVALID_ARCHIVE");
  });

  it("INVALID_ARCHIVE: a header claiming 2^60 bytes", async () => {
    const tar = Buffer.concat([entry({ name: "huge", size: base256(1n << 60n, 12) }), END]);
    const { result } = await exportLayer("huge", tar);
    assertFails(result, "INVALID_ARCHIVE");
    await assertNoArtifact("huge", "INVALID_ARCHIVE");
  });

  it("INVALID_ARCHIVE: data cut short in the middle of a file", async () => {
    const whole = file("big", "y".repeat(4000));
    const { result } = await exportLayer("truncated", whole.subarray(0, 512 + 1000));
    assert.match(assertFails(result, "INVALID_ARCHIVE"), /truncat/i);
    await assertNoArtifact("truncated", "INVALID_ARCHIVE");
  });

  it("INVALID_ARCHIVE: a header with a bad checksum", async () => {
    const tar = Buffer.concat([entry({ name: "bad", checksum: "0000000\0" }, Buffer.from("z")), END]);
    const { result } = await exportLayer("checksum", tar);
    assertFails(result, "INVALID_ARCHIVE");
    await assertNoArtifact("checksum", "INVALID_ARCHIVE");
  });
});
