/**
 * readTar against the archives real tar writers make, names at every length boundary of the
 * formats: each archive must list, entry for entry, what GNU tar lists, and each file must carry its
 * own bytes. A reader that decides an entry's type before its long name is folded in reads a file's
 * data as headers (issue 23's smuggled setuid file): the file here whose data is a tar catches that.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { linkSync, mkdirSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import { readTar } from "../../src/tar/reader.js";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";

const execFileP = promisify(execFile);

/** Path lengths either side of ustar's 100-byte name, 155-byte prefix and 255-byte name limits. */
const LENGTHS = [99, 100, 101, 155, 156, 157, 255, 256, 257];
/** Where the one slash of a two-component path sits (its byte index). */
const SPLITS = [98, 99, 100, 101, 154, 155, 156];
const ALPHABET = "abcdefghijklmnopqrstuvwxyz";

/** The relative paths of the sample tree's regular files: every length with every split that fits. */
function samplePaths(): string[] {
  const paths: string[] = [];
  for (const [i, length] of LENGTHS.entries()) {
    if (length <= 255) paths.push(ALPHABET[i]!.repeat(length));
    for (const [j, at] of SPLITS.entries()) {
      const rest = length - at - 1;
      if (rest < 1 || rest > 255) continue;
      paths.push(`${ALPHABET[j]!.toUpperCase().repeat(at)}/${ALPHABET[i]!.repeat(rest)}`);
    }
    // Three components, slashes at 50 and at the prefix boundary.
    if (length > 157) paths.push(`${"p".repeat(50)}/${"q".repeat(104)}/${ALPHABET[i]!.repeat(length - 156)}`);
  }
  return paths;
}

interface Listed {
  path: string;
  /** GNU tar's type letter: `-` file, `d` directory, `l` symlink, `h` hardlink. */
  type: string;
  size: number;
  link: string;
}

const clean = (p: string) => p.replace(/^\.\//, "").replace(/\/+$/, "");

/** What `tar -tv` says: type, size and link target of each entry (names here have no spaces). */
async function gnuList(archive: string): Promise<Listed[]> {
  const out = await run("tar", ["-tvf", archive, "--numeric-owner", "--quoting-style=literal"]);
  return out
    .split("\n")
    .filter((l) => l !== "")
    .map((line) => {
      const f = line.split(/\s+/);
      const rest = f.slice(5);
      const type = line[0] === "-" && rest[1] === "link" ? "h" : line[0]!;
      const link = rest[1] === "->" ? rest[2]! : rest[1] === "link" ? clean(rest[3]!) : "";
      return { path: clean(rest[0]!), type, size: type === "-" ? Number(f[2]) : 0, link };
    });
}

const LETTERS: Record<string, string> = { file: "-", directory: "d", symlink: "l", hardlink: "h" };

/** What kiln's reader says of the same archive, with each file's bytes checked against the tree. */
async function kilnList(archive: string, tree: string): Promise<Listed[]> {
  async function* input() {
    yield readFileSync(archive);
  }
  const listed: Listed[] = [];
  for await (const e of readTar(input())) {
    const h = e.header;
    const type = LETTERS[h.type] ?? h.type;
    if (type === "-") {
      const chunks: Buffer[] = [];
      for await (const c of e.data()) chunks.push(c);
      assert.deepEqual(Buffer.concat(chunks), readFileSync(join(tree, clean(h.path))), `bytes of ${h.path}`);
    }
    const link = type === "l" ? h.linkpath : type === "h" ? clean(h.linkpath) : "";
    listed.push({ path: clean(h.path), type, size: type === "-" ? e.size : 0, link });
  }
  return listed;
}

describe("readTar lists what GNU tar lists, for archives of every common writer", () => {
  let work: string;
  let tree: string;
  let top: string[];
  const archives: { writer: string; file: string }[] = [];

  before(async () => {
    work = await makeTempDir("tar-writers");
    tree = join(work, "tree");
    mkdirSync(tree);
    for (const p of samplePaths()) {
      mkdirSync(join(tree, p, ".."), { recursive: true });
      writeFileSync(join(tree, p), `${p}\n`);
    }
    // The smuggling case: a file below a 99-byte directory (its name field's 100 bytes end in "/")
    // whose data is a tar holding a setuid "smuggled".
    const inner = join(work, "inner");
    mkdirSync(inner);
    writeFileSync(join(inner, "smuggled"), "#!/bin/sh\n");
    await run("tar", [
      "-C",
      inner,
      "--owner=0",
      "--group=0",
      "--mode=4755",
      "-cf",
      join(work, "inner.tar"),
      "smuggled",
    ]);
    const carrier = join(tree, "x".repeat(99), "y".repeat(50));
    mkdirSync(join(carrier, ".."), { recursive: true });
    writeFileSync(carrier, readFileSync(join(work, "inner.tar")));
    // Links with long names and targets.
    const target = `${"P".repeat(99)}/${"x".repeat(101)}`;
    mkdirSync(join(tree, "P".repeat(99)));
    writeFileSync(join(tree, target), "link target\n");
    symlinkSync(`../${target}`, join(tree, "x".repeat(99), "s".repeat(120)));
    linkSync(join(tree, target), join(tree, "x".repeat(99), "h".repeat(120)));
    top = readdirSync(tree).sort();

    const gnuTar = async (format: string) => {
      const file = join(work, `gnu-${format}.tar`);
      const args = ["-C", tree, `--format=${format}`, "--sort=name", "-cf", file, ...top];
      // ustar and v7 cannot hold some names: GNU tar leaves those out, says so and exits 2.
      await execFileP("tar", args).catch((err: { code?: number }) => {
        if (err.code !== 2) throw err;
      });
      archives.push({ writer: `GNU tar --format=${format}`, file });
    };
    for (const format of ["gnu", "oldgnu", "posix", "ustar", "v7"]) await gnuTar(format);

    for (const format of ["GNU_FORMAT", "PAX_FORMAT", "USTAR_FORMAT"]) {
      const file = join(work, `python-${format}.tar`);
      const script = [
        "import os, sys, tarfile",
        `t = tarfile.open(sys.argv[1], "w", format=tarfile.${format})`,
        "os.chdir(sys.argv[2])",
        "for d, dirs, files in os.walk('.'):",
        "    dirs.sort()",
        "    for n in [d] + sorted(os.path.join(d, f) for f in files):",
        "        try: t.add(n, recursive=False)",
        "        except ValueError: pass", // a name USTAR_FORMAT cannot hold
        "t.close()",
      ].join("\n");
      await run("python3", ["-c", script, file, tree]);
      archives.push({ writer: `Python tarfile ${format}`, file });
    }

    const busybox = join(work, "busybox.tar");
    await run("busybox", ["tar", "-C", tree, "-cf", busybox, ...top]);
    archives.push({ writer: "busybox tar", file: busybox });

    // Go's archive/tar, as docker, buildkit and umoci write layers: umoci repack of the tree.
    const layout = join(work, "layout");
    const bundle = join(work, "bundle");
    const rootless = process.getuid?.() === 0 ? [] : ["--rootless"];
    await run("umoci", ["init", "--layout", layout]);
    await run("umoci", ["new", "--image", `${layout}:t`]);
    await run("umoci", ["unpack", ...rootless, "--image", `${layout}:t`, bundle]);
    await run("cp", ["-a", `${tree}/.`, join(bundle, "rootfs")]);
    await run("umoci", ["repack", "--image", `${layout}:t`, bundle]);
    const index = JSON.parse(readFileSync(join(layout, "index.json"), "utf8"));
    const blob = (digest: string) => join(layout, "blobs", "sha256", digest.slice(7));
    const manifest = JSON.parse(readFileSync(blob(index.manifests[0].digest), "utf8"));
    const go = join(work, "go.tar");
    writeFileSync(go, await run("gzip", ["-dc", blob(manifest.layers.at(-1).digest)], { binary: true }));
    archives.push({ writer: "Go archive/tar (umoci repack)", file: go });
  });
  after(async () => {
    if (work) await removeDir(work);
  });

  test("every writer: the same entries, types, sizes and link targets as GNU tar, each file its own bytes", async () => {
    assert.ok(archives.length >= 10);
    for (const { writer, file } of archives) {
      const expected = await gnuList(file);
      assert.ok(expected.length > 5, `${writer}: GNU tar lists ${expected.length} entries`);
      assert.deepEqual(await kilnList(file, join(work, "tree")), expected, writer);
    }
  });

  test("the full-length names are all there where the format can hold them", async () => {
    for (const { writer, file } of archives.filter((a) =>
      /gnu|posix|PAX|GNU_FORMAT|busybox|Go/.test(a.writer),
    )) {
      const listed = new Set((await kilnList(file, tree)).map((e) => e.path));
      for (const p of samplePaths())
        assert.ok(listed.has(p), `${writer}: ${p.length}-byte ${p.slice(0, 20)}…`);
      assert.ok(listed.has(`${"x".repeat(99)}/${"y".repeat(50)}`), `${writer}: the carrier file`);
      assert.ok(!listed.has("smuggled"), `${writer}: no entry read from a file's data`);
    }
  });
});
