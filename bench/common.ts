/**
 * What the benchmarks share: timing a command (wall, peak RSS, CPU) after an untimed `sync`,
 * medians, a byte-counting TCP proxy in front of a registry, and table printing.
 */
import { spawnSync } from "node:child_process";
import { readFileSync, rmSync, statSync } from "node:fs";
import { type AddressInfo, createConnection, createServer, type Socket } from "node:net";
import { join } from "node:path";

export const REPO_ROOT = join(import.meta.dirname, "..");
export const MB = 1e6;

export interface Measured {
  /** Wall time, process start included. */
  seconds: number;
  /** Peak resident set size of the process (its largest child for a shell pipeline). */
  rssMB: number;
  /** User + system CPU seconds over wall seconds: how many cores it kept busy. */
  cores: number;
  stdout: string;
  stderr: string;
}

/**
 * Runs a command under /usr/bin/time. `sync` runs first, untimed: the writeback of what the
 * previous command wrote must not slow this one.
 */
export function measure(
  cmd: string,
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; cwd?: string } = {},
): Measured {
  spawnSync("sync");
  const stats = join(REPO_ROOT, "bench", ".cache", `time-${process.pid}`);
  const t0 = process.hrtime.bigint();
  const r = spawnSync("/usr/bin/time", ["-f", "%M %U %S", "-o", stats, cmd, ...args], {
    cwd: opts.cwd ?? REPO_ROOT,
    env: { ...process.env, ...opts.env },
    stdio: ["ignore", "pipe", "pipe"],
    maxBuffer: 64 << 20,
  });
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) {
    throw new Error(
      `${cmd} ${args.join(" ")} failed (${r.status}): ${r.stderr.toString().trim().slice(-2000)}`,
    );
  }
  const [kb, user, sys] = readFileSync(stats, "utf8").trim().split("\n").pop()!.split(" ").map(Number);
  rmSync(stats, { force: true });
  return {
    seconds,
    rssMB: (kb! * 1024) / MB,
    cores: (user! + sys!) / seconds,
    stdout: r.stdout.toString(),
    stderr: r.stderr.toString(),
  };
}

/** Runs a command, untimed; its stdout. */
export function sh(
  cmd: string,
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; cwd?: string } = {},
): string {
  const r = spawnSync(cmd, args, {
    cwd: opts.cwd ?? REPO_ROOT,
    env: { ...process.env, ...opts.env },
    stdio: ["ignore", "pipe", "pipe"],
    maxBuffer: 64 << 20,
  });
  if (r.status !== 0) {
    throw new Error(
      `${cmd} ${args.join(" ")} failed (${r.status}): ${r.stderr.toString().trim().slice(-2000)}`,
    );
  }
  return r.stdout.toString();
}

export function median(xs: readonly number[]): number {
  if (xs.length === 0) return Number.NaN;
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

/** Apparent size and allocated bytes of a file, or of the files of a directory. */
export function sizes(path: string): { apparent: number; allocated: number } {
  const st = statSync(path);
  if (!st.isDirectory()) return { apparent: st.size, allocated: st.blocks * 512 };
  const out = sh("du", ["-s", "--block-size=1", path]).split("\t")[0];
  const apparent = sh("du", ["-s", "--apparent-size", "--block-size=1", path]).split("\t")[0];
  return { apparent: Number(apparent), allocated: Number(out) };
}

/** A TCP proxy to `upstream` (host:port) counting the bytes it sends back to clients. */
export interface CountingProxy {
  host: string;
  /** Bytes from the upstream to clients since the last reset. */
  bytes(): number;
  reset(): void;
  close(): Promise<void>;
}

export async function startCountingProxy(upstream: string): Promise<CountingProxy> {
  const [uhost, uport] = upstream.split(":");
  let count = 0;
  const sockets = new Set<Socket>();
  const server = createServer((client) => {
    const up = createConnection({ host: uhost, port: Number(uport) });
    sockets.add(client).add(up);
    up.on("data", (d: Buffer) => {
      count += d.length;
    });
    // pipe() ends each side when the other ends, after what is buffered is written: only an error
    // tears both down at once.
    client.pipe(up).pipe(client);
    const fail = () => {
      client.destroy();
      up.destroy();
    };
    client.on("error", fail).on("close", () => sockets.delete(client));
    up.on("error", fail).on("close", () => sockets.delete(up));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    host: `127.0.0.1:${port}`,
    bytes: () => count,
    reset: () => {
      count = 0;
    },
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** A fixed-width text table: first row is the header. */
export function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => (r[c] ?? "").length)));
  return rows
    .map((r) =>
      r.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join("  "),
    )
    .join("\n");
}

export const secs = (s: number) => `${s.toFixed(2)} s`;
export const mb = (bytes: number) => `${(bytes / MB).toFixed(0)} MB`;
export const ratio = (x: number) => `${x.toFixed(2)}×`;
