/**
 * One service runs builds per store: `ROOT/serve.lock` holds its pid. A lock whose process is gone
 * (kill -9, crash) is taken over; GC never touches it. The same pid lock serves bench/fixtures.ts.
 */
import { readFileSync, unlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { KilnError } from "../errors.js";

/** A held pid lock (the service's, or any other: see acquirePidLock). */
export interface ServiceLock {
  readonly file: string;
  release(): void;
}

export const SERVICE_LOCK = "serve.lock";

/** Locks this process holds: a file with our own pid is ours only if listed here (pid 1 restarts in containers). */
const held = new Set<string>();

export async function acquireServiceLock(root: string): Promise<ServiceLock> {
  return acquirePidLock(
    join(root, SERVICE_LOCK),
    (holder) => new KilnError("STORE", `another kiln serve (pid ${holder}) is running on the store ${root}`),
  );
}

/**
 * Creates `file` holding this process's pid; a file left by a process that is gone is taken over,
 * one whose process lives is refused with `busy(pid)`.
 */
export async function acquirePidLock(file: string, busy: (pid: number) => Error): Promise<ServiceLock> {
  for (let attempt = 0; ; attempt++) {
    try {
      writeFileSync(file, `${process.pid}\n`, { flag: "wx" });
      held.add(file);
      return { file, release: () => release(file) };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST" || attempt > 0) throw lockError(file, err);
    }
    const holder = readPid(file);
    const ours = holder === process.pid;
    if (holder !== undefined && ((ours && held.has(file)) || (!ours && alive(holder)))) throw busy(holder);
    // Stale: its process is gone.
    try {
      unlinkSync(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw lockError(file, err);
    }
  }
}

function release(file: string): void {
  if (!held.delete(file) || readPid(file) !== process.pid) return;
  try {
    unlinkSync(file);
  } catch {
    // Already gone: nothing to release.
  }
}

function readPid(file: string): number | undefined {
  try {
    const pid = Number.parseInt(readFileSync(file, "utf8"), 10);
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

function lockError(file: string, err: unknown): KilnError {
  return new KilnError("STORE", `cannot take the service lock ${file}: ${(err as Error).message}`, {
    cause: err,
  });
}
