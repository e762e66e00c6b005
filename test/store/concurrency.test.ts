import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { after, before, describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import { openStore } from "../../src/store/store.js";
import { fixtureImage } from "./fixtures/image.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const WORKER = fileURLToPath(new URL("./fixtures/pull-worker.ts", import.meta.url));
const BLOBS = 40;

/** A worker process and its stdout, line by line. */
class Worker {
  readonly child: ChildProcess;
  readonly exited: Promise<number | null>;
  stderr = "";
  readonly #lines: AsyncIterator<string>;

  constructor(root: string) {
    this.child = spawn(process.execPath, ["--import", "tsx", WORKER, root, String(BLOBS)], {
      cwd: REPO,
      stdio: ["pipe", "pipe", "pipe"],
    });
    this.child.stderr!.on("data", (d: Buffer) => {
      this.stderr += d.toString();
    });
    this.exited = new Promise((resolve) => this.child.on("exit", (code) => resolve(code)));
    this.#lines = createInterface({ input: this.child.stdout! })[Symbol.asyncIterator]();
  }

  async expect(prefix: string): Promise<string> {
    const { value, done } = await this.#lines.next();
    assert.ok(
      !done && value.startsWith(prefix),
      `expected "${prefix}", got ${done ? "EOF" : value}: ${this.stderr}`,
    );
    return value;
  }

  send(line: string): void {
    this.child.stdin!.write(`${line}\n`);
  }
}

describe("two processes pulling the same image into one store at once", () => {
  let root: string;
  const workers: Worker[] = [];
  before(async () => {
    root = await mkdtemp(join(tmpdir(), "kiln-concurrent-"));
  });
  after(async () => {
    for (const w of workers) if (w.child.exitCode === null) w.child.kill();
    await rm(root, { recursive: true, force: true });
  });

  it("both succeed, one file per blob, nothing left in tmp/, one catalog row", async () => {
    workers.push(new Worker(root), new Worker(root));
    // Barriers: both open the (new) store together, then both commit together.
    await Promise.all(workers.map((w) => w.expect("ready")));
    for (const w of workers) w.send("open");
    await Promise.all(workers.map((w) => w.expect("staged")));
    // Both have staged everything and hold a staging dir each under tmp/.
    assert.equal((await readdir(join(root, "tmp"))).length, 2);
    for (const w of workers) w.send("commit");
    const done = await Promise.all(workers.map((w) => w.expect("done ")));
    const codes = await Promise.all(workers.map((w) => w.exited));
    assert.deepEqual(codes, [0, 0], workers.map((w) => w.stderr).join("\n"));
    // The second put replaced nothing: same (ref, platform), same manifest, same row.
    assert.equal(done[0], done[1]);

    const image = fixtureImage(BLOBS);
    const expected = [...image.layers, image.manifest, image.config].map((b) => b.digest.slice(7)).sort();
    assert.deepEqual((await readdir(join(root, "blobs", "sha256"))).sort(), expected);
    for (const blob of [...image.layers, image.manifest, image.config]) {
      const bytes = await readFile(join(root, "blobs", "sha256", blob.digest.slice(7)));
      assert.equal(`sha256:${createHash("sha256").update(bytes).digest("hex")}`, blob.digest);
    }
    assert.deepEqual(await readdir(join(root, "tmp")), []);

    const store = await openStore(root);
    try {
      const images = store.catalog.list();
      assert.equal(images.length, 1);
      assert.equal(images[0]!.manifestDigest, image.manifest.digest);
      assert.equal(images[0]!.layers.length, BLOBS);
      assert.equal(`done ${images[0]!.id}`, done[0]);
    } finally {
      store.close();
    }
  });
});

describe("several processes creating one new catalog at once", () => {
  const catalogModule = fileURLToPath(new URL("../../src/store/catalog.ts", import.meta.url));
  const FILES = 100;

  /** One process: on "go" (so all start together), opens and closes catalog-0 … catalog-N in turn. */
  function opener(dir: string): {
    child: ChildProcess;
    done: Promise<{ code: number | null; stderr: string }>;
  } {
    const script = `import { join } from "node:path";
import { Catalog } from ${JSON.stringify(catalogModule)};
process.stdin.once("data", () => {
  for (let i = 0; i < ${FILES}; i++) Catalog.open(join(${JSON.stringify(dir)}, "catalog-" + i + ".db")).close();
  process.exit(0);
});`;
    const child = spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
      stdio: ["pipe", "ignore", "pipe"],
    });
    let stderr = "";
    child.stderr!.on("data", (d: Buffer) => {
      stderr += d.toString();
    });
    return { child, done: new Promise((resolve) => child.on("exit", (code) => resolve({ code, stderr }))) };
  }

  it("all succeed: switching a new catalog to WAL is retried, not refused as 'database is locked'", async () => {
    const dir = await mkdtemp(join(tmpdir(), "kiln-catalog-race-"));
    try {
      const procs = Array.from({ length: 4 }, () => opener(dir));
      // Each process races the others on the creation of every one of the catalogs.
      await new Promise((r) => setTimeout(r, 1500));
      for (const p of procs) p.child.stdin!.end("go\n");
      for (const p of procs) {
        const r = await p.done;
        assert.equal(r.code, 0, r.stderr);
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
