/**
 * bin/kiln's shell part chooses Node's flags by the CPUs the command may use: on one or two, one V8
 * worker thread and no TurboFan inlining (their background compiles would take the cores from the
 * main thread); on more, Node's defaults. Checked on the node process it execs (same pid), through a
 * long-running command (serve).
 */
import assert from "node:assert/strict";
import { chmod, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { makeTempDir, removeDir } from "../helpers/exec.js";
import { startService } from "../server/service.js";
import { BIN } from "./kiln.js";

const FEW_CPU_FLAGS = ["--v8-pool-size=1", "--no-turbo-inlining"];

/** Node's flags (before the script) in the process `[...asUser, bin/kiln, serve]` became. */
async function nodeFlags(root: string, asUser: readonly string[], env?: Record<string, string>) {
  const svc = await startService(root, [], { asUser, env });
  try {
    // taskset and sh exec: the pid is node's by now.
    const argv = (await readFile(`/proc/${svc.child.pid}/cmdline`, "utf8")).split("\0");
    const script = argv.indexOf(BIN);
    assert.ok(script > 0, `bin/kiln not in ${JSON.stringify(argv)}`);
    return argv.slice(1, script);
  } finally {
    await svc.stop();
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
    assert.deepEqual(await nodeFlags(root, ["taskset", "-c", "0"]), FEW_CPU_FLAGS);
  });

  it("on one CPU whatever OpenMP's thread limits say", async () => {
    const env = { OMP_NUM_THREADS: "16", OMP_THREAD_LIMIT: "16" };
    assert.deepEqual(await nodeFlags(root, ["taskset", "-c", "0"], env), FEW_CPU_FLAGS);
  });

  it("on more than two CPUs: Node's defaults", async () => {
    const env = { PATH: `${fakeBin}:${process.env.PATH}` };
    assert.deepEqual(await nodeFlags(root, [], env), []);
  });
});
