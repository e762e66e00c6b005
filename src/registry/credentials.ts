/**
 * Registry credentials the way the docker CLI finds them: an explicit `user:pass`, else the docker
 * config's `credHelpers`, `credsStore` and `auths`, with credential helpers run as
 * `docker-credential-NAME get`.
 */
import { spawn } from "node:child_process";
import { readFile } from "node:fs/promises";
import { homedir } from "node:os";
import { join } from "node:path";
import { KilnError } from "../errors.js";

export interface Credential {
  /** For Basic auth and token requests (may be absent with an identity token). */
  readonly username?: string | undefined;
  readonly password?: string | undefined;
  /** An OAuth2 refresh token (docker's `identitytoken`), exchanged at the token server. */
  readonly identityToken?: string | undefined;
}

export interface CredentialProvider {
  /** Credentials for a registry host (`docker.io`, `ghcr.io`, `127.0.0.1:5000`); undefined = anonymous. */
  get(registry: string): Promise<Credential | undefined>;
}

export interface DockerCredentialsOptions {
  /** `user:pass` (the CLI's `--creds`); wins over the docker config for every registry. */
  explicit?: string | undefined;
  /** The directory holding config.json (default: $DOCKER_CONFIG, else ~/.docker). */
  configDir?: string | undefined;
  /** Environment for DOCKER_CONFIG, HOME and the helpers' PATH (default process.env). */
  env?: NodeJS.ProcessEnv | undefined;
}

/** The key docker uses for Docker Hub in config.json and towards credential helpers. */
export const DOCKER_HUB_SERVER = "https://index.docker.io/v1/";
const DOCKER_HUB_ALIASES = new Set(["docker.io", "index.docker.io", "registry-1.docker.io"]);
const HELPER_TIMEOUT_MS = 60_000;

interface DockerConfig {
  auths?: Record<string, { auth?: string; username?: string; password?: string; identitytoken?: string }>;
  credHelpers?: Record<string, string>;
  credsStore?: string;
}

/** Parses `user:pass` (the password may contain colons). */
export function parseCredentials(text: string): Credential {
  const colon = text.indexOf(":");
  if (colon <= 0) throw new KilnError("CREDENTIALS", "credentials must be given as user:pass");
  return { username: text.slice(0, colon), password: text.slice(colon + 1) };
}

/** `https://host:port/v1/` or `host:port` → `host:port`, with Docker Hub's aliases folded into docker.io. */
export function credentialHost(key: string): string {
  const host = key
    .trim()
    .replace(/^[a-z][a-z0-9+.-]*:\/\//i, "")
    .split("/")[0]!
    .toLowerCase();
  return DOCKER_HUB_ALIASES.has(host) ? "docker.io" : host;
}

/** The directory of config.json, as docker picks it. */
export function dockerConfigDir(opts: {
  configDir?: string | undefined;
  env?: NodeJS.ProcessEnv | undefined;
}): string {
  const env = opts.env ?? process.env;
  if (opts.configDir) return opts.configDir;
  if (env.DOCKER_CONFIG) return env.DOCKER_CONFIG;
  return join(env.HOME || homedir(), ".docker");
}

/** A provider over an explicit `user:pass` and the docker config; lookups are cached. */
export function dockerCredentials(opts: DockerCredentialsOptions = {}): CredentialProvider {
  if (opts.explicit !== undefined) {
    const cred = parseCredentials(opts.explicit);
    return { get: async () => cred };
  }
  const env = opts.env ?? process.env;
  const file = join(dockerConfigDir(opts), "config.json");
  let config: Promise<DockerConfig> | undefined;
  const cache = new Map<string, Promise<Credential | undefined>>();
  return {
    get(registry: string) {
      const host = credentialHost(registry);
      let found = cache.get(host);
      if (!found) {
        config ??= readDockerConfig(file);
        found = config.then((c) => lookup(c, host, file, env));
        cache.set(host, found);
      }
      return found;
    },
  };
}

async function readDockerConfig(file: string): Promise<DockerConfig> {
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return {};
    throw new KilnError("CREDENTIALS", `cannot read docker config ${file}: ${(err as Error).message}`, {
      cause: err,
    });
  }
  try {
    const doc = JSON.parse(text);
    if (typeof doc !== "object" || doc === null) throw new Error("not a JSON object");
    return doc as DockerConfig;
  } catch (err) {
    throw new KilnError("CREDENTIALS", `cannot parse docker config ${file}: ${(err as Error).message}`, {
      cause: err,
    });
  }
}

/** The entry for a host: a literal key first, then any key that names the same host. */
function entryFor<T>(map: Record<string, T> | undefined, host: string): T | undefined {
  if (!map) return undefined;
  const literal = host === "docker.io" ? DOCKER_HUB_SERVER : host;
  if (Object.hasOwn(map, literal)) return map[literal];
  for (const [key, value] of Object.entries(map)) if (credentialHost(key) === host) return value;
  return undefined;
}

async function lookup(
  config: DockerConfig,
  host: string,
  file: string,
  env: NodeJS.ProcessEnv,
): Promise<Credential | undefined> {
  const helper = entryFor(config.credHelpers, host) || config.credsStore;
  if (helper) {
    const server = host === "docker.io" ? DOCKER_HUB_SERVER : host;
    const cred = await runHelper(helper, server, file, env);
    if (cred) return cred;
  }
  const entry = entryFor(config.auths, host);
  if (!entry) return undefined;
  let username = entry.username;
  let password = entry.password;
  if (entry.auth) {
    const decoded = Buffer.from(entry.auth, "base64").toString("utf8");
    const colon = decoded.indexOf(":");
    if (colon < 0)
      throw new KilnError(
        "CREDENTIALS",
        `docker config ${file}: the auth entry for ${host} is not user:pass`,
      );
    username = decoded.slice(0, colon);
    password = decoded.slice(colon + 1);
  }
  if (entry.identitytoken) return { username: username || undefined, identityToken: entry.identitytoken };
  if (username || password) return { username, password };
  return undefined;
}

/** Runs `docker-credential-NAME get`; "credentials not found" means anonymous. */
function runHelper(
  name: string,
  server: string,
  file: string,
  env: NodeJS.ProcessEnv,
): Promise<Credential | undefined> {
  const program = `docker-credential-${name}`;
  return new Promise((resolve, reject) => {
    const child = spawn(program, ["get"], { env, stdio: ["pipe", "pipe", "pipe"] });
    let out = "";
    let err = "";
    const timer = setTimeout(() => child.kill("SIGKILL"), HELPER_TIMEOUT_MS);
    child.stdout.on("data", (d: Buffer) => {
      out += d.toString("utf8");
    });
    child.stderr.on("data", (d: Buffer) => {
      err += d.toString("utf8");
    });
    child.stdin.on("error", () => {}); // a helper that exits without reading stdin is judged by its output
    child.on("error", (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(
        new KilnError(
          "CREDENTIALS",
          e.code === "ENOENT"
            ? `credential helper ${program} (named in ${file}) is not on PATH`
            : `cannot run credential helper ${program}: ${e.message}`,
          { cause: e },
        ),
      );
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      const said = `${out}\n${err}`.trim();
      if (code !== 0) {
        if (/credentials not found/i.test(said)) return resolve(undefined);
        const why = signal ? `killed by ${signal}` : said.split("\n")[0] || `exit status ${code}`;
        return reject(
          new KilnError("CREDENTIALS", `credential helper ${program} failed for ${server}: ${why}`),
        );
      }
      try {
        const doc = JSON.parse(out) as { Username?: unknown; Secret?: unknown };
        const username = typeof doc.Username === "string" ? doc.Username : "";
        const secret = typeof doc.Secret === "string" ? doc.Secret : "";
        if (!secret) return resolve(undefined);
        // docker's convention: the user name `<token>` marks the secret as an identity token.
        if (username === "<token>") return resolve({ identityToken: secret });
        resolve({ username, password: secret });
      } catch {
        reject(new KilnError("CREDENTIALS", `credential helper ${program} printed no JSON for ${server}`));
      }
    });
    child.stdin.end(server);
  });
}
