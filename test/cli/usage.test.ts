/**
 * Usage errors, sizes and reference schemes through the real CLI (issue 24): every usage error is one
 * `kiln: error [INVALID_ARGUMENT]: --option: …` line (or one JSON object with --json) and exit 2,
 * before any work; sizes print in the binary units they are read in; `docker://` refs pull.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { stat, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { sampleImage } from "../helpers/fixtures.js";
import { pushImage } from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import {
  assertFails,
  childEnv,
  escapeRegExp,
  type KilnResult,
  type PullJson,
  REPO_ROOT,
  runKiln,
  type Sandbox,
  sandbox,
} from "./kiln.js";

/** One JSON error object on stderr, nothing on stdout, exit 2; returns the message. */
function assertJsonUsageError(r: KilnResult): string {
  assert.equal(r.code, 2, `expected exit 2, got ${r.code}; stderr: ${r.stderr}`);
  assert.equal(r.stdout, "");
  const lines = r.stderr.split("\n");
  assert.equal(lines.length, 2, `expected one stderr line, got: ${JSON.stringify(r.stderr)}`);
  const e = JSON.parse(lines[0]!) as { error: { code: string; message: string } };
  assert.deepEqual(Object.keys(e), ["error"]);
  assert.equal(e.error.code, "INVALID_ARGUMENT");
  return e.error.message;
}

describe("usage errors", () => {
  let box: Sandbox;
  let work: string;
  before(async () => {
    box = await sandbox();
    work = await makeTempDir("cli-usage");
  });
  after(async () => {
    await box?.cleanup();
    if (work) await removeDir(work);
  });

  // Port 1 answers nothing: a command that got as far as the network would fail with NETWORK.
  const cases: [string, () => string[], RegExp][] = [
    [
      "--formt",
      () => ["export", "app:1", "--formt", "ext4"],
      /^--formt: unknown option; did you mean --format\?$/,
    ],
    [
      "--format ext5",
      () => ["export", "app:1", "--format", "ext5"],
      /^--format: unknown format "ext5"; expected ext4, erofs, erofs-layers, cpio$/,
    ],
    [
      "pull --format ext5",
      () => ["pull", "127.0.0.1:1/app:1", "--format", "ext5"],
      /^--format: unknown format "ext5"/,
    ],
    [
      "--concurrency 0",
      () => ["pull", "127.0.0.1:1/app:1", "--concurrency", "0"],
      /^--concurrency: expected a positive integer, got "0"$/,
    ],
    [
      "--size 10Q",
      () => ["export", "app:1", "--format", "ext4", "--size", "10Q"],
      /^--size: "10Q" is not a size \(examples: 4096, 512M, 10G\)$/,
    ],
    [
      "pull --size 10Q",
      () => ["pull", "127.0.0.1:1/app:1", "--format", "ext4", "--size", "10Q"],
      /^--size: "10Q" is not a size/,
    ],
    [
      "disk create --size 10Q",
      () => ["disk", "create", join(work, "d.ext4"), "--size", "10Q"],
      /^--size: "10Q" is not a size/,
    ],
    ["initramfs without -o", () => ["initramfs"], /^-o\/--output: required option not given$/],
    ["export without --format", () => ["export", "app:1"], /^--format: required option not given$/],
    ["--format without a value", () => ["export", "app:1", "--format"], /^--format: needs a value$/],
    ["a missing argument", () => ["pull"], /^<ref>: missing argument$/],
    [
      "serve --concurrency x",
      () => ["serve", "--concurrency", "x"],
      /^--concurrency: expected a positive integer/,
    ],
    ["an unknown command", () => ["expot"], /^unknown command 'expot'; did you mean export\?$/],
  ];

  for (const [name, args, message] of cases) {
    it(`${name}: one line naming the option, exit 2, nothing written`, async () => {
      const line = assertFails(await box.kiln(args()), "INVALID_ARGUMENT");
      assert.match(line.replace(/^kiln: error \[INVALID_ARGUMENT\]: /, ""), message);
      assert.ok(!existsSync(box.root), "the store was not touched");
      assert.ok(!existsSync(join(work, "d.ext4")));
    });
    it(`${name} with --json: one JSON error on stderr, exit 2`, async () => {
      assert.match(assertJsonUsageError(await box.kiln(["--json", ...args()])), message);
      assert.ok(!existsSync(box.root), "the store was not touched");
    });
  }

  it("--root that is empty or not a directory: exit 2 before any work", async () => {
    for (const [root, message] of [
      ["", /^--root: empty; give the store directory$/],
      [join(work, "a-file"), /^--root: .*a-file is not a directory$/],
    ] as const) {
      if (root) await writeFile(root, "");
      const r = await runKiln(["--root", root, "images"], childEnv({}, box.dockerConfig));
      const line = assertFails(r, "INVALID_ARGUMENT");
      assert.match(line.replace(/^kiln: error \[INVALID_ARGUMENT\]: /, ""), message);
    }
    assert.ok(!existsSync(join(REPO_ROOT, "catalog.db")), "no store in the working directory");
  });

  // The timeout only turns a hang (Node's recursive mkdir under /proc) into a failure.
  it("--root where no directory can be made: STORE naming it, no hang (a /proc path, a dangling link)", {
    timeout: 120_000,
  }, async () => {
    const dangling = join(work, "dangling");
    await symlink(join(work, "nowhere"), dangling);
    for (const [root, message] of [
      ["/proc/kiln-store", /cannot create the store directory \/proc\/kiln-store: ENOENT/],
      [join(dangling, "store"), /cannot create the store directory .*dangling: a dangling symlink/],
    ] as const) {
      const r = await runKiln(["--root", root, "images"], childEnv({}, box.dockerConfig));
      assert.match(assertFails(r, "STORE"), message);
    }
  });

  it("--help and --version still exit 0 on stdout", async () => {
    for (const args of [["--help"], ["export", "--help"], ["help", "initramfs"], ["--version"]]) {
      const r = await box.kiln(args);
      assert.equal(r.code, 0, `${args.join(" ")}: ${r.stderr}`);
      assert.equal(r.stderr, "");
      assert.match(r.stdout, args[0] === "--version" ? /^\d+\.\d+\.\d+\n$/ : /^Usage: kiln/);
    }
  });
});

describe("sizes in binary units, docker:// references", () => {
  let reg: Registry;
  let box: Sandbox;
  let work: string;
  let ref: string;
  before(async () => {
    work = await makeTempDir("cli-sizes");
    box = await sandbox();
    reg = await startRegistry();
    ref = (await pushImage(await sampleImage(), reg, "sizes/app:1")).ref;
  });
  after(async () => {
    await reg?.stop();
    await box?.cleanup();
    if (work) await removeDir(work);
  });

  it("pulls docker://HOST/REPO:TAG as HOST/REPO:TAG", async () => {
    const pulled = await box.json<PullJson>(["pull", `docker://${ref}`]);
    assert.equal(pulled.ref, ref);
    const again = await box.json<PullJson>(["pull", ref]);
    assert.equal(again.digest, pulled.digest);
    assert.equal(again.downloaded, 0, "the same image, already in the store");
  });

  it("refuses https:// and http:// with INVALID_REFERENCE and a hint", async () => {
    for (const scheme of ["https", "http"]) {
      const line = assertFails(await box.kiln(["pull", `${scheme}://${ref}`]), "INVALID_REFERENCE");
      assert.ok(line.endsWith(`: a registry reference has no scheme: use ${ref}`), `no hint in: ${line}`);
    }
  });

  it("export --size 300M prints 300 MiB; --json keeps bytes", async () => {
    const out = join(work, "300m.ext4");
    const r = await box.kiln(["export", ref, "--format", "ext4", "--size", "300M", "-o", out]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`^Exported .* to ${escapeRegExp(out)} \\(300 MiB\\)\\n$`));
    assert.equal((await stat(out)).size, 300 * 2 ** 20);
    const j = await box.json<{ bytes: number }>([
      "export",
      ref,
      "--format",
      "ext4",
      "--size",
      "300M",
      "-o",
      out,
    ]);
    assert.equal(j.bytes, 300 * 2 ** 20);
  });

  it("disk create --size 10G prints 10 GiB", async () => {
    const out = join(work, "vol.ext4");
    const r = await box.kiln(["disk", "create", out, "--size", "10G"]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, `Created ${out} (ext4, 10 GiB, sparse)\n`);
    assert.equal((await stat(out)).size, 10 * 2 ** 30);
  });

  it("TOO_LARGE names both sizes in MiB, and the size it asks for is enough", async () => {
    const out = join(work, "small.ext4");
    const line = assertFails(
      await box.kiln(["export", ref, "--format", "ext4", "--size", "1M", "-o", out]),
      "TOO_LARGE",
    );
    const m = /: --size 1 MiB is too small: the image needs at least (\d+(?:\.\d)?) MiB$/.exec(line);
    assert.ok(m, `not in MiB: ${line}`);
    const r = await box.kiln(["--json", "export", ref, "--format", "ext4", "--size", "1M", "-o", out]);
    assert.equal(r.code, 1);
    const e = JSON.parse(r.stderr) as { error: { code: string; details: { size: number; needed: number } } };
    assert.equal(e.error.code, "TOO_LARGE");
    assert.equal(e.error.details.size, 2 ** 20);
    assert.ok(Number(m[1]) * 2 ** 20 >= e.error.details.needed, "the printed minimum is rounded up");
    await box.json(["export", ref, "--format", "ext4", "--size", `${m[1]}M`, "-o", out]);
    await run("e2fsck", ["-fn", out]);
  });
});
