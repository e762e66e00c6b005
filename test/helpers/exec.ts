import { type ChildProcess, execFile } from "node:child_process";
import { rmSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";

const execFileP = promisify(execFile);

export interface RunOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Returned stdout as a Buffer instead of text (manifest bytes must stay exact). */
  binary?: boolean;
}

/** Runs a command to completion; a failure throws one line naming the command, its exit code and stderr. */
export async function run(
  cmd: string,
  args: readonly string[],
  opts: RunOptions & { binary: true },
): Promise<Buffer>;
export async function run(cmd: string, args: readonly string[], opts?: RunOptions): Promise<string>;
export async function run(
  cmd: string,
  args: readonly string[],
  opts: RunOptions = {},
): Promise<string | Buffer> {
  try {
    const { stdout } = await execFileP(cmd, args, {
      cwd: opts.cwd,
      env: { ...process.env, ...opts.env },
      encoding: opts.binary ? "buffer" : "utf8",
      maxBuffer: 64 * 1024 * 1024,
    });
    return stdout;
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string | Buffer; code?: number | string };
    const stderr = String(e.stderr ?? "")
      .trim()
      .replace(/\s*\n\s*/g, " | ");
    throw new Error(`${cmd} ${args.join(" ")} failed (${e.code ?? "error"}): ${stderr || e.message}`, {
      cause: err,
    });
  }
}

// Everything below is a safety net: tests stop what they start in `after`, but a failing or
// interrupted test must not leave registries running or temp dirs behind.
const liveChildren = new Set<ChildProcess>();
const liveDirs = new Set<string>();
let hooked = false;

function hookExit(): void {
  if (hooked) return;
  hooked = true;
  process.on("exit", () => {
    for (const child of liveChildren) child.kill("SIGKILL");
    for (const dir of liveDirs) rmSync(dir, { recursive: true, force: true });
  });
}

/** Kills `child` when this process exits, whatever way it exits (see also setpriv --pdeathsig). */
export function trackChild(child: ChildProcess): void {
  hookExit();
  liveChildren.add(child);
  child.once("exit", () => liveChildren.delete(child));
}

/** A fresh directory under os.tmpdir(), removed at process exit unless removed earlier with removeDir. */
export async function makeTempDir(prefix: string): Promise<string> {
  hookExit();
  const dir = await mkdtemp(join(tmpdir(), `kiln-${prefix}-`));
  liveDirs.add(dir);
  return dir;
}

export async function removeDir(dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true });
  liveDirs.delete(dir);
}
