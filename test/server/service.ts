/**
 * Starts `kiln serve` (the real CLI, or the crash script beside this file) as a child process on
 * 127.0.0.1:0 and talks to it over HTTP.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { join } from "node:path";
import { BIN, childEnv, REPO_ROOT } from "../cli/kiln.js";
import { trackChild } from "../helpers/exec.js";

export interface Service {
  url: string;
  child: ChildProcess;
  /** Everything the process wrote to stderr so far. */
  stderr(): string;
  /** fetch against the service, with the token when given. */
  request(
    method: string,
    path: string,
    body?: unknown,
    token?: string,
  ): Promise<{ status: number; json: any; text: string; headers: Headers }>;
  /** SIGTERM and wait for the exit code. */
  stop(): Promise<number | null>;
  /** SIGKILL and wait. */
  kill9(): Promise<void>;
  exited: Promise<number | null>;
}

export interface StartOptions {
  token?: string;
  /** Run test/server/crashing-serve.ts instead of bin/kiln: it SIGKILLs itself at this phase. */
  crashAt?: "converting";
  env?: Record<string, string>;
  /**
   * Start bin/kiln as a user does (its shell line, not `node bin/kiln`), behind these commands
   * (e.g. `taskset -c 0`; none: bin/kiln itself).
   */
  asUser?: readonly string[];
}

export async function startService(
  root: string,
  args: readonly string[],
  opts: StartOptions = {},
): Promise<Service> {
  const argv = opts.crashAt
    ? ["--import", "tsx", join(REPO_ROOT, "test/server/crashing-serve.ts"), root, opts.crashAt]
    : [BIN, "--root", root, "serve", "--listen", "127.0.0.1:0", "--log-level", "warn", ...args];
  const [cmd, ...cmdArgs] =
    opts.asUser && !opts.crashAt ? [...opts.asUser, ...argv] : [process.execPath, ...argv];
  const child = spawn(cmd!, cmdArgs, {
    cwd: REPO_ROOT,
    env: childEnv(opts.env),
    stdio: ["ignore", "ignore", "pipe"],
  });
  trackChild(child);
  let stderr = "";
  child.stderr!.setEncoding("utf8");
  const exited = once(child, "exit").then(([code]) => code as number | null);
  const url = await new Promise<string>((resolve, reject) => {
    child.stderr!.on("data", (chunk: string) => {
      stderr += chunk;
      const m = /listening on (http:\/\/\S+)/.exec(stderr);
      if (m) resolve(m[1]!);
    });
    exited.then((code) => reject(new Error(`kiln serve exited (${code}) before listening: ${stderr}`)));
  });
  const request = async (method: string, path: string, body?: unknown, token?: string) => {
    const headers: Record<string, string> = {};
    if (body !== undefined) headers["content-type"] = "application/json";
    if (token !== undefined) headers.authorization = `Bearer ${token}`;
    const res = await fetch(`${url}${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch {
      json = undefined;
    }
    return { status: res.status, json, text, headers: res.headers };
  };
  return {
    url,
    child,
    stderr: () => stderr,
    request,
    exited,
    async stop() {
      child.kill("SIGTERM");
      return exited;
    },
    async kill9() {
      child.kill("SIGKILL");
      await exited;
    },
  };
}
