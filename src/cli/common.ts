import { statSync } from "node:fs";
import type { Command } from "commander";
import { KilnError } from "../errors.js";
import type { IngestProgress } from "../images.js";
import { defaultRoot } from "../store/root.js";
import { parseSize } from "./format.js";

/** What every command shares: global options, output, progress, signals, flag parsers. */

export interface GlobalOptions {
  root?: string;
  json?: boolean;
  quiet?: boolean;
  verbose?: boolean;
}

export const collect = (value: string, previous: string[] = []) => [...previous, value];

export function globals(cmd: Command): GlobalOptions & { root: string } {
  const g = cmd.optsWithGlobals() as GlobalOptions;
  return { ...g, root: g.root === undefined ? defaultRoot() : checkRoot(g.root) };
}

/** --root checked before any work: an empty value would put the store in the working directory. */
function checkRoot(root: string): string {
  if (root.trim() === "") throw new KilnError("INVALID_ARGUMENT", "--root: empty; give the store directory");
  const st = statSync(root, { throwIfNoEntry: false });
  if (st && !st.isDirectory()) throw new KilnError("INVALID_ARGUMENT", `--root: ${root} is not a directory`);
  return root;
}

export function out(text: string): void {
  process.stdout.write(`${text}\n`);
}

export function json(value: unknown): void {
  out(JSON.stringify(value, null, 2));
}

/**
 * Progress on a TTY (bars) or with --verbose (lines); nothing with --json or --quiet. The progress
 * module (and cli-progress) loads only when it will draw something.
 */
export async function progressFor(
  g: GlobalOptions,
): Promise<(IngestProgress & { stop?(): void }) | undefined> {
  if (g.json || g.quiet || !(process.stderr.isTTY || g.verbose)) return undefined;
  const { lineProgress, ttyProgress } = await import("./progress.js");
  return process.stderr.isTTY ? ttyProgress(process.stderr) : lineProgress(process.stderr);
}

export function abortOnSignal(): AbortController {
  const ac = new AbortController();
  const onSignal = (sig: NodeJS.Signals) => ac.abort(new KilnError("INTERNAL", `interrupted by ${sig}`));
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  return ac;
}

export function sizeFlag(flag: string, v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = parseSize(v);
  if (n === undefined || n <= 0) {
    throw new KilnError("INVALID_ARGUMENT", `${flag}: "${v}" is not a size (examples: 4096, 512M, 10G)`);
  }
  return n;
}

/** A commander argParser for `flag`: a positive integer, else INVALID_ARGUMENT naming the flag. */
export function positiveInt(flag: string): (v: string) => number {
  return (v) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 1)
      throw new KilnError("INVALID_ARGUMENT", `${flag}: expected a positive integer, got "${v}"`);
    return n;
  };
}
