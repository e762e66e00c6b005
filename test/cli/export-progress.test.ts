/**
 * Export progress: `--verbose` lines off a terminal (each phase named, layer i/n, every phase ending
 * at its total), bars on a terminal (util-linux `script` gives the CLI a pseudo-terminal), and
 * nothing with --json or --quiet.
 */
import assert from "node:assert/strict";
import { stat } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { formatBytes } from "../../src/cli/format.js";
import { makeTempDir, removeDir } from "../helpers/exec.js";
import { sampleImage } from "../helpers/fixtures.js";
import { pushImage } from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import {
  childEnv,
  escapeRegExp,
  type InspectJson,
  runInPty,
  type Sandbox,
  sandbox,
  scriptMissing,
} from "./kiln.js";

describe("kiln export progress", () => {
  let reg: Registry;
  let box: Sandbox;
  let work: string;
  let ref: string;
  /** Compressed bytes of the image's layers: what reading and writing count up to. */
  let layerBytes: string;
  let layers: number;

  before(async () => {
    const image = await sampleImage();
    reg = await startRegistry();
    ref = (await pushImage(image, reg, "sample:1")).ref;
    box = await sandbox();
    work = await makeTempDir("export-progress");
    await box.json(["pull", ref]);
    const info = await box.json<InspectJson>(["inspect", ref]);
    layers = info.layers.length;
    layerBytes = formatBytes(info.layers.reduce((n, l) => n + l.size, 0));
  });
  after(async () => {
    await reg?.stop();
    await box?.cleanup();
    if (work) await removeDir(work);
  });

  /** "PHASE: done X/X in S s" for a phase that reached its total `total`. */
  const doneLine = (phase: string, total: string) =>
    new RegExp(`^${escapeRegExp(phase)}: done ${escapeRegExp(`${total}/${total}`)} in \\d+\\.\\d\\d s`, "m");

  it("--verbose off a terminal: lines name each phase and layer, and each phase reaches its total", async () => {
    const out = join(work, "v.ext4");
    const r = await box.kiln(["--verbose", "export", ref, "--format", "ext4", "-o", out]);
    assert.equal(r.code, 0, r.stderr);
    const size = formatBytes((await stat(out)).size);
    const err = r.stderr;
    assert.match(
      err,
      new RegExp(`^export: ext4 from ${layers} layers \\(${escapeRegExp(layerBytes)}\\)$`, "m"),
    );
    for (let i = 1; i <= layers; i++) {
      assert.match(err, new RegExp(`^reading layers: layer ${i}/${layers} \\(`, "m"), `reading layer ${i}`);
    }
    assert.match(err, new RegExp(`^writing ext4: layer 1/${layers} \\(`, "m"));
    // In order: reading, then writing, straight into -o (nothing to copy out).
    const reading = err.search(doneLine("reading layers", layerBytes));
    const writing = err.search(doneLine("writing ext4", layerBytes));
    assert.ok(reading >= 0 && writing > reading, err);
    assert.doesNotMatch(err, /^copying out/m);
    assert.match(r.stdout, /^Exported .* as ext4 to /m);

    // Once the store has it (an export without -o), the same export comes from the cache: only the copy.
    await box.json(["export", ref, "--format", "ext4"]);
    const again = await box.kiln([
      "--verbose",
      "export",
      ref,
      "--format",
      "ext4",
      "-o",
      join(work, "v2.ext4"),
    ]);
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stderr, /^export: ext4 image found in the store's cache$/m);
    assert.match(again.stderr, doneLine("copying out", size));
    assert.doesNotMatch(again.stderr, /^(reading|writing)/m);
  });

  it("pull --format --verbose: the download, then the conversion's phases", async () => {
    const out = join(work, "p.erofs");
    const r = await box.kiln(["--verbose", "pull", ref, "--format", "erofs", "-o", out]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /^present /m, "the pull's lines come first");
    assert.match(r.stderr, doneLine("reading layers", layerBytes));
    assert.match(r.stderr, doneLine("writing erofs", layerBytes));
    assert.doesNotMatch(r.stderr, /^copying out/m, "written in place");
    assert.ok(r.stderr.indexOf("present ") < r.stderr.indexOf("reading layers"), r.stderr);
  });

  it("erofs-layers: one writing phase over both reads of every layer", async () => {
    const out = join(work, "layers");
    const r = await box.kiln(["--verbose", "export", ref, "--format", "erofs-layers", "-o", out]);
    assert.equal(r.code, 0, r.stderr);
    const twice = formatBytes(
      2 * (await box.json<InspectJson>(["inspect", ref])).layers.reduce((n, l) => n + l.size, 0),
    );
    for (let i = 1; i <= layers; i++) assert.match(r.stderr, new RegExp(`layer ${i}/${layers}`));
    assert.match(r.stderr, doneLine("writing erofs-layers", twice));
  });

  it("prints no progress with --json or --quiet", async () => {
    for (const flag of ["--json", "--quiet"]) {
      const r = await box.kiln([
        flag,
        "--verbose",
        "export",
        ref,
        "--format",
        "cpio",
        "-o",
        join(work, "q.cpio"),
      ]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stderr, "", flag);
    }
  });

  it("shows a bar per phase with bytes of its total on a terminal", { skip: scriptMissing() }, async () => {
    const out = join(work, "tty.erofs");
    const cmd = `bin/kiln --root '${box.root}' export ${ref} --format erofs -o '${out}'`;
    // A fresh export each time: a cached one only copies.
    await box.kiln(["rm", ref]);
    await box.json(["pull", ref]);
    const plain = (t: string) => t.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, "");
    const r = await runInPty(cmd, childEnv({}, box.dockerConfig));
    assert.equal(r.code, 0, r.text);
    const text = plain(r.text);
    const bar = (label: string, total: string) =>
      new RegExp(`${escapeRegExp(label)}\\s+[█░]+ ${escapeRegExp(`${total}/${total}`)}\\s+done`);
    assert.match(text, bar("reading layers", layerBytes));
    assert.match(text, bar("writing erofs", layerBytes));
    assert.doesNotMatch(text, /copying out/, "written in place");
    assert.match(text, /Exported .* as erofs to /);

    // From the store's cache: the copy's bar alone.
    await box.json(["export", ref, "--format", "erofs"]);
    const copied = await runInPty(cmd, childEnv({}, box.dockerConfig));
    assert.equal(copied.code, 0, copied.text);
    const copiedText = plain(copied.text);
    assert.match(copiedText, bar("copying out", formatBytes((await stat(out)).size)));
    assert.doesNotMatch(copiedText, /reading layers|writing erofs/);
  });
});
