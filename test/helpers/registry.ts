import { type ChildProcess, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { get as httpGet } from "node:http";
import { get as httpsGet } from "node:https";
import { type AddressInfo, createServer } from "node:net";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { makeTempDir, removeDir, run, trackChild } from "./exec.js";
import { makeServerCert } from "./tls.js";
import { type Creds, startTokenServer, type TokenServer } from "./tokenserver.js";

export type { Creds, TokenRequest, TokenServer } from "./tokenserver.js";

export interface RegistryOptions {
  /** Default "none". htpasswd = Basic auth; token = Bearer tokens from a local token server. */
  auth?: "none" | "htpasswd" | "token";
  /** Serve HTTPS with a certificate from a throwaway CA (`caFile`). */
  tls?: boolean;
  /** Default one user, kiln/kiln-secret, when auth is not "none". */
  users?: Creds[];
  /** Token auth only: anonymous callers may pull. */
  anonymousPull?: boolean;
  /** Token auth only: token lifetime in seconds (default 300). */
  tokenTtlSeconds?: number;
}

export interface Registry {
  /** `127.0.0.1:PORT`, the registry part of an image reference. */
  host: string;
  /** `http://127.0.0.1:PORT` or `https://…`. */
  url: string;
  auth: "none" | "htpasswd" | "token";
  tls: boolean;
  /** PEM CA certificate that signed the server certificate (tls only). */
  caFile?: string;
  /** Directory with `ca.crt`, for skopeo `--cert-dir` (tls only). */
  certDir?: string;
  users: Creds[];
  storageDir: string;
  /** The registry process, to check that stop() really ended it. */
  pid: number;
  tokenServer?: TokenServer;
  /** The registry's recent stderr, for diagnosing a failure. */
  log(): string;
  /** Kills the registry and the token server and removes every temp file; safe to call twice. */
  stop(): Promise<void>;
}

const DEFAULT_USERS: Creds[] = [{ user: "kiln", pass: "kiln-secret" }];
const READY_TIMEOUT_MS = 10_000;
// setpriv makes the kernel kill the registry if this process dies without running exit hooks.
const SETPRIV = existsSync("/usr/bin/setpriv") ? "/usr/bin/setpriv" : undefined;

/**
 * Runs Docker distribution 2.8 (`docker-registry serve`) on 127.0.0.1 with fresh storage and
 * resolves once `/v2/` answers. Call `stop()` in `after`; the process is also killed at exit.
 */
export async function startRegistry(opts: RegistryOptions = {}): Promise<Registry> {
  const auth = opts.auth ?? "none";
  const tls = opts.tls ?? false;
  const users = auth === "none" ? (opts.users ?? []) : (opts.users ?? DEFAULT_USERS);
  const dir = await makeTempDir("registry");
  let tokenServer: TokenServer | undefined;
  try {
    const storageDir = join(dir, "storage");
    await mkdir(storageDir);
    const config: Record<string, unknown> = {
      version: "0.1",
      log: { level: "warn", accesslog: { disabled: true } },
      storage: { filesystem: { rootdirectory: storageDir }, delete: { enabled: true } },
      http: { addr: "", secret: "kiln-test-secret" },
    };
    const tlsFiles = tls ? await makeServerCert(dir) : undefined;
    if (tlsFiles) {
      (config.http as Record<string, unknown>).tls = {
        certificate: tlsFiles.certFile,
        key: tlsFiles.keyFile,
      };
    }
    if (auth === "htpasswd") {
      const lines = await Promise.all(
        users.map((u) => run("htpasswd", ["-Bbn", "-C", "4", u.user, u.pass]).then((s) => s.trim())),
      );
      const file = join(dir, "htpasswd");
      await writeFile(file, `${lines.join("\n")}\n`);
      config.auth = { htpasswd: { realm: "kiln-test", path: file } };
    } else if (auth === "token") {
      const service = "kiln-test-registry";
      tokenServer = await startTokenServer({
        dir,
        service,
        users,
        anonymousPull: opts.anonymousPull ?? false,
        ttlSeconds: opts.tokenTtlSeconds ?? 300,
      });
      config.auth = {
        token: {
          realm: tokenServer.realm,
          service,
          issuer: tokenServer.issuer,
          rootcertbundle: tokenServer.rootCertFile,
        },
      };
    }
    const scheme = tls ? "https" : "http";
    const ca = tlsFiles ? await readFile(tlsFiles.caFile) : undefined;

    // Another process may take the free port between probe and bind: retry on a fresh one.
    for (let attempt = 1; ; attempt++) {
      const port = await freePort();
      const host = `127.0.0.1:${port}`;
      (config.http as Record<string, unknown>).addr = host;
      const configFile = join(dir, "config.yml");
      await writeFile(configFile, JSON.stringify(config, null, 2)); // JSON is YAML
      const proc = spawnRegistry(configFile);
      try {
        await waitReady(proc.child, `${scheme}://${host}/v2/`, ca, proc.log);
      } catch (err) {
        await killChild(proc.child);
        if (attempt < 3 && /address already in use/.test(proc.log())) continue;
        throw err;
      }
      let stopped: Promise<void> | undefined;
      const ts = tokenServer;
      const registry: Registry = {
        host,
        url: `${scheme}://${host}`,
        auth,
        tls,
        users,
        storageDir,
        pid: proc.child.pid!,
        log: proc.log,
        stop() {
          stopped ??= (async () => {
            await killChild(proc.child);
            await ts?.stop();
            await removeDir(dir);
          })();
          return stopped;
        },
      };
      if (tlsFiles) {
        registry.caFile = tlsFiles.caFile;
        registry.certDir = tlsFiles.certDir;
      }
      if (ts) registry.tokenServer = ts;
      return registry;
    }
  } catch (err) {
    await tokenServer?.stop();
    await removeDir(dir);
    throw err;
  }
}

function spawnRegistry(configFile: string): { child: ChildProcess; log: () => string } {
  const argv = ["docker-registry", "serve", configFile];
  const child = SETPRIV
    ? spawn(SETPRIV, ["--pdeathsig", "KILL", ...argv], { stdio: ["ignore", "pipe", "pipe"] })
    : spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", "pipe", "pipe"] });
  trackChild(child);
  let log = "";
  const keep = (chunk: Buffer) => {
    log = (log + chunk.toString("utf8")).slice(-16_384);
  };
  child.stdout?.on("data", keep);
  child.stderr?.on("data", keep);
  child.on("error", (err) => keep(Buffer.from(`spawn error: ${err.message}\n`)));
  // A forgotten registry must not keep a test process alive; the exit hook kills it.
  child.unref();
  for (const s of [child.stdout, child.stderr]) (s as unknown as { unref?: () => void } | null)?.unref?.();
  return { child, log: () => log };
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Polls `/v2/` until any HTTP answer (200 or 401), the process exits, or the time is up. */
async function waitReady(child: ChildProcess, url: string, ca: Buffer | undefined, log: () => string) {
  const deadline = Date.now() + READY_TIMEOUT_MS;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(
        `docker-registry exited (${child.exitCode ?? child.signalCode}) before serving ${url}: ${oneLine(log())}`,
      );
    }
    if (await answers(url, ca)) return;
    if (Date.now() > deadline) {
      throw new Error(
        `docker-registry did not answer ${url} within ${READY_TIMEOUT_MS} ms: ${oneLine(log())}`,
      );
    }
    await sleep(20);
  }
}

function answers(url: string, ca: Buffer | undefined): Promise<boolean> {
  return new Promise((resolve) => {
    const onRes = (res: { resume(): void; statusCode?: number }) => {
      res.resume();
      resolve(res.statusCode !== undefined);
    };
    const req = ca ? httpsGet(url, { ca, timeout: 1000 }, onRes) : httpGet(url, { timeout: 1000 }, onRes);
    req.on("timeout", () => req.destroy());
    req.on("error", () => resolve(false));
  });
}

async function killChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 3000);
  await exited;
  clearTimeout(timer);
}

function oneLine(s: string): string {
  return (
    s
      .trim()
      .replace(/\s*\n\s*/g, " | ")
      .slice(-2000) || "(no output)"
  );
}
