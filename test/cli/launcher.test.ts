/**
 * bin/kiln's shell part chooses Node's flags by the CPUs the command may use: on one or two, one V8
 * worker thread and no TurboFan inlining (their background compiles would take the cores from the
 * main thread); on more, Node's defaults. Checked on the node process it execs (same pid), through a
 * long-running command (serve).
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { chmod, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { makeTempDir, removeDir } from "../helpers/exec.js";
import { BIN, childEnv, REPO_ROOT } from "./kiln.js";

const FEW_CPU_FLAGS = ["--v8-pool-size=1", "--no-turbo-inlining"];

/** Starts `[...prefix, bin/kiln, serve]`, waits until it listens, and returns the node process's argv. */
async function nodeArgv(prefix: readonly string[], root: string, env: NodeJS.ProcessEnv): Promise<string[]> {
  const argv = [...prefix, BIN, "--root", root, "serve", "--listen", "127.0.0.1:0", "--log-level", "warn"];
  const child = spawn(argv[0]!, argv.slice(1), { cwd: REPO_ROOT, env, stdio: ["ignore", "ignore", "pipe"] });
  const exited = new Promise<number | null>((resolve) => child.on("close", resolve));
  try {
    await new Promise<void>((resolve, reject) => {
      let stderr = "";
      child.stderr!.on("data", (c: Buffer) => {
        stderr += c.toString("utf8");
        if (/listening on http/.test(stderr)) resolve();
      });
      child.on("error", reject);
      exited.then((code) => reject(new Error(`kiln serve exited (${code}) before listening: ${stderr}`)));
    });
    // taskset and sh exec: the pid is node's by now.
    const cmdline = await readFile(`/proc/${child.pid}/cmdline`, "utf8");
    return cmdline.split("\0").filter((a) => a !== "");
  } finally {
    child.kill("SIGTERM");
    await exited;
  }
}

describe("bin/kiln's Node flags", () => {
  let root: string;
  let fakeBin: string;

  before(async () => {
    root = await makeTempDir("launcher-store");
    // A machine with more CPUs than this one: nproc is the only thing the shell part asks.
    fakeBin = await makeTempDir("launcher-bin");
    await writeFile(join(fakeBin, "nproc"), "#!/bin/sh\necho 8\n");
    await chmod(join(fakeBin, "nproc"), 0o755);
  });
  after(async () => {
    await removeDir(root);
    await removeDir(fakeBin);
  });

  it("on one CPU: one V8 worker thread and no TurboFan inlining, before the script", async () => {
    const argv = await nodeArgv(["taskset", "-c", "0"], root, childEnv());
    const script = argv.indexOf(BIN);
    assert.ok(script > 0, `bin/kiln not in ${JSON.stringify(argv)}`);
    assert.deepEqual(argv.slice(1, script), FEW_CPU_FLAGS);
  });

  it("on one CPU whatever OpenMP's thread limits say", async () => {
    const env = childEnv({ OMP_NUM_THREADS: "16", OMP_THREAD_LIMIT: "16" });
    const argv = await nodeArgv(["taskset", "-c", "0"], root, env);
    assert.deepEqual(argv.slice(1, argv.indexOf(BIN)), FEW_CPU_FLAGS);
  });

  it("on more than two CPUs: Node's defaults", async () => {
    const env = childEnv({ PATH: `${fakeBin}:${process.env.PATH}` });
    const argv = await nodeArgv([], root, env);
    assert.deepEqual(argv.slice(1, argv.indexOf(BIN)), []);
  });
});
