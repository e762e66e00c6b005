/**
 * newc cpio has no extended attributes: an export that drops file capabilities or labels says so,
 * once, naming the first files and the count (stderr line; `warnings` in --json), and an image
 * without xattrs, or a format that keeps them, gives no warning.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { CAP_NET_RAW } from "../helpers/fixtures.js";
import { buildImage, pushImage } from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import { type Sandbox, sandbox } from "./kiln.js";

const notRoot = process.getuid?.() !== 0 ? "needs root (security.* xattrs on the staged files)" : false;

interface ExportJson {
  format: string;
  cached: boolean;
  warnings: string[];
}

const WARNING =
  "cpio cannot store extended attributes: dropped those of 5 files (/bin/arping, /bin/ping, /etc/labeled, " +
  "and 2 more; security.capability, user.a, user.b, …); use ext4 or erofs to keep them";

describe("cpio export of an image with xattrs", { skip: notRoot }, () => {
  let reg: Registry;
  let box: Sandbox;
  let work: string;
  let withXattrs: string;
  let plain: string;

  before(async () => {
    work = await makeTempDir("cpio-xattrs");
    const caps = { "security.capability": CAP_NET_RAW };
    const image = await buildImage(join(work, "oci"), {
      tag: "caps",
      layers: [
        [
          { path: "bin/", type: "dir" },
          { path: "bin/arping", content: "arping\n", mode: 0o755, xattrs: caps },
          { path: "bin/ping", content: "ping\n", mode: 0o755, xattrs: caps },
          // One inode, two names: counted once.
          { path: "bin/ping6", type: "hardlink", target: "bin/ping" },
          { path: "etc/labeled", content: "x\n", xattrs: { "user.kiln": "1" } },
          { path: "etc/plain", content: "x\n" },
        ],
        [
          { path: "usr/bin/x", content: "x\n", xattrs: { "user.a": "1" } },
          { path: "z", content: "z\n", xattrs: { "user.b": Buffer.from([0, 1, 2]) } },
        ],
      ],
    });
    const bare = await buildImage(join(work, "oci"), {
      tag: "plain",
      layers: [[{ path: "bin/sh", content: "sh\n", mode: 0o755 }]],
    });
    reg = await startRegistry();
    withXattrs = (await pushImage(image, reg, "caps:1")).ref;
    plain = (await pushImage(bare, reg, "plain:1")).ref;
    box = await sandbox();
  });
  after(async () => {
    await reg?.stop();
    await box?.cleanup();
    if (work) await removeDir(work);
  });

  it("pull --format cpio warns once on stderr, naming the first files and the count", async () => {
    const out = join(work, "caps.cpio");
    const r = await box.kiln(["pull", withXattrs, "--format", "cpio", "-o", out]);
    assert.equal(r.code, 0, r.stderr);
    const warnings = r.stderr.split("\n").filter((l) => l.startsWith("kiln: warning:"));
    assert.deepEqual(warnings, [`kiln: warning: ${WARNING}`]);
    // The files themselves are there, without their xattrs.
    const listing = await run("sh", ["-c", `cpio -it --quiet < '${out}'`]);
    for (const p of ["bin/arping", "bin/ping", "bin/ping6", "etc/labeled", "usr/bin/x", "z"])
      assert.ok(listing.split("\n").includes(p), p);
  });

  it("export --json carries the warning in `warnings` (gzip too), and prints none", async () => {
    const r = await box.kiln(["--json", "export", withXattrs, "--format", "cpio", "--compress", "gzip"]);
    assert.equal(r.code, 0, r.stderr);
    const result = JSON.parse(r.stdout) as ExportJson;
    assert.equal(result.cached, false);
    assert.deepEqual(result.warnings, [WARNING]);
    assert.doesNotMatch(r.stderr, /warning/);
  });

  it("--quiet prints only what was asked for", async () => {
    // A fresh build: the image again, without its cached exports.
    await box.json(["rm", withXattrs]);
    await box.json(["pull", withXattrs]);
    const quiet = await box.kiln(["--quiet", "export", withXattrs, "--format", "cpio", "--compress", "gzip"]);
    assert.equal(quiet.code, 0, quiet.stderr);
    assert.equal(quiet.stderr, "");
    assert.match(quiet.stdout, /\.cpio\n$/);
  });

  it("no warning for an image without xattrs, nor for a format that keeps them", async () => {
    await box.json(["pull", plain]);
    const bare = await box.kiln(["export", plain, "--format", "cpio", "-o", join(work, "plain.cpio")]);
    assert.equal(bare.code, 0, bare.stderr);
    assert.doesNotMatch(bare.stderr, /warning/);
    const json = await box.json<ExportJson>(["export", plain, "--format", "cpio", "--compress", "gzip"]);
    assert.deepEqual(json.warnings, []);
    const ext4 = await box.json<ExportJson>(["export", withXattrs, "--format", "ext4"]);
    assert.deepEqual([ext4.cached, ext4.warnings], [false, []]);
  });
});
