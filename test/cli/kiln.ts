/**
 * Runs the real CLI (`bin/kiln`, the compiled dist/) as a child process, and checks a store
 * on disk. Shared by the test/cli tests.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { constants, createReadStream, existsSync } from "node:fs";
import { copyFile, mkdir, readdir, rm, writeFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { makeTempDir, removeDir } from "../helpers/exec.js";
import type { ConfigSpec, RawImage } from "../helpers/images.js";

export const REPO_ROOT = resolve(import.meta.dirname, "..", "..");
export const BIN = join(REPO_ROOT, "bin", "kiln");

if (!existsSync(join(REPO_ROOT, "dist", "cli", "run.js"))) {
  throw new Error("dist/ is missing: run `npm run build` before the CLI tests");
}

export interface KilnResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

export interface KilnOptions {
  /** Extra environment (DOCKER_CONFIG is always set, to an empty dir unless given here). */
  env?: Record<string, string>;
}

/** A store and an empty docker config dir for one test (or describe); `cleanup()` in `after`. */
export interface Sandbox {
  root: string;
  dockerConfig: string;
  /** `kiln --root ROOT ARGS…` */
  kiln(args: readonly string[], opts?: KilnOptions): Promise<KilnResult>;
  /** `kiln --root ROOT --json ARGS…`, which must succeed; stdout parsed. */
  json<T = unknown>(args: readonly string[], opts?: KilnOptions): Promise<T>;
  cleanup(): Promise<void>;
}

let dockerConfigDir: Promise<string> | undefined;

/** An empty DOCKER_CONFIG dir shared by the process, so the real ~/.docker is never read. */
function emptyDockerConfig(): Promise<string> {
  dockerConfigDir ??= makeTempDir("docker-config");
  return dockerConfigDir;
}

export function childEnv(extra: Record<string, string> = {}, dockerConfig?: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  // The store and credentials come from the test only; the child is no node:test process.
  for (const k of ["KILN_ROOT", "XDG_DATA_HOME", "NODE_TEST_CONTEXT", "NODE_OPTIONS", "NODE_EXTRA_CA_CERTS"])
    delete env[k];
  if (dockerConfig !== undefined) env.DOCKER_CONFIG = dockerConfig;
  return { ...env, ...extra };
}

/** Runs `bin/kiln ARGS` from the repository root, as a user would (its shell part included). */
export function runKiln(args: readonly string[], env: NodeJS.ProcessEnv): Promise<KilnResult> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(BIN, args, {
      cwd: REPO_ROOT,
      env,
      stdio: ["ignore", "pipe", "pipe"],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on("data", (c: Buffer) => out.push(c));
    child.stderr.on("data", (c: Buffer) => err.push(c));
    child.on("error", reject);
    child.on("close", (code) =>
      resolvePromise({
        code,
        stdout: Buffer.concat(out).toString("utf8"),
        stderr: Buffer.concat(err).toString("utf8"),
      }),
    );
  });
}

export async function sandbox(): Promise<Sandbox> {
  const dir = await makeTempDir("cli");
  const root = join(dir, "store");
  const dockerConfig = await emptyDockerConfig();
  const kiln = (args: readonly string[], opts: KilnOptions = {}) =>
    runKiln(["--root", root, ...args], childEnv(opts.env, dockerConfig));
  return {
    root,
    dockerConfig,
    kiln,
    async json<T>(args: readonly string[], opts: KilnOptions = {}): Promise<T> {
      const r = await kiln(["--json", ...args], opts);
      assert.equal(r.code, 0, `kiln --json ${args.join(" ")} failed (${r.code}): ${r.stderr}`);
      return JSON.parse(r.stdout) as T;
    },
    cleanup: () => removeDir(dir),
  };
}

/** A DOCKER_CONFIG dir whose config.json holds `auths` for `host`. */
export async function dockerConfigWithAuth(host: string, user: string, pass: string): Promise<string> {
  const dir = await makeTempDir("docker-config");
  const auth = Buffer.from(`${user}:${pass}`).toString("base64");
  await writeFile(join(dir, "config.json"), JSON.stringify({ auths: { [host]: { auth } } }));
  return dir;
}

/**
 * A failed run: exactly one stderr line `kiln: error [CODE]: …` and exit code 2 for a usage error
 * (INVALID_ARGUMENT), 1 for anything else; returns the line.
 */
export function assertFails(r: KilnResult, code: string): string {
  const exit = code === "INVALID_ARGUMENT" ? 2 : 1;
  assert.equal(r.code, exit, `expected exit ${exit} with ${code}, got ${r.code}; stderr: ${r.stderr}`);
  const lines = r.stderr.split("\n");
  assert.equal(lines.length, 2, `expected one stderr line, got: ${JSON.stringify(r.stderr)}`);
  assert.equal(lines[1], "");
  assert.match(lines[0]!, new RegExp(`^kiln: error \\[${code}\\]: \\S.*$`));
  return lines[0]!;
}

/** What `kiln pull --json` prints. */
export interface PullJson extends InspectJson {
  downloaded: number;
  present: number;
}

/** What `kiln inspect` prints. */
export interface InspectJson {
  ref: string | null;
  digest: string;
  indexDigest: string | null;
  mediaType: string;
  configDigest: string;
  platform: string;
  size: number;
  created: string | null;
  layers: { digest: string; diffId: string | null; mediaType: string; size: number }[];
  config: {
    entrypoint: string[] | null;
    cmd: string[] | null;
    env: string[];
    workingDir: string;
    user: string;
    labels: Record<string, string>;
    stopSignal: string | null;
    exposedPorts: string[];
    volumes: string[];
  };
}

/** One row of `kiln images --json`. */
export interface ImageRow {
  ref: string | null;
  repository: string | null;
  tag: string | null;
  digest: string;
  indexDigest: string | null;
  platform: string;
  size: number;
  created: string | null;
  layers: number;
  builds?: { format: string; status: string; error?: { code: string; message: string } }[];
}

interface RawManifest {
  mediaType?: string;
  config: { digest: string; mediaType: string };
  layers: { digest: string; mediaType: string; size: number }[];
}

/**
 * `kiln inspect` output against the registry's own bytes: manifest and config digests, the layers
 * (digests, sizes, media types as the manifest gives them, diff IDs from the config's rootfs).
 */
export function assertMatchesRaw(info: InspectJson, raw: RawImage): void {
  assert.equal(info.digest, raw.manifestDigest);
  assert.equal(info.configDigest, raw.configDigest);
  assert.equal(info.mediaType, raw.mediaType);
  const m = raw.json as unknown as RawManifest;
  assert.equal(info.configDigest, m.config.digest);
  const config = JSON.parse(raw.config!.toString("utf8")) as { rootfs: { diff_ids: string[] } };
  assert.deepEqual(
    info.layers.map((l) => ({ digest: l.digest, mediaType: l.mediaType, size: l.size })),
    m.layers.map((l) => ({ digest: l.digest, mediaType: l.mediaType, size: l.size })),
  );
  assert.deepEqual(
    info.layers.map((l) => l.diffId),
    config.rootfs.diff_ids,
  );
}

/** The runtime config fields as the image was built (umoci config flags). */
export function assertConfig(info: InspectJson, spec: ConfigSpec): void {
  assert.deepEqual(info.config.entrypoint, spec.entrypoint ?? null);
  assert.deepEqual(info.config.cmd, spec.cmd ?? null);
  assert.deepEqual(info.config.env, spec.env ?? []);
  assert.equal(info.config.workingDir, spec.workingDir ?? "");
  assert.equal(info.config.user, spec.user ?? "");
  assert.deepEqual(info.config.labels, spec.labels ?? {});
  assert.equal(info.config.stopSignal, spec.stopSignal ?? null);
  assert.deepEqual(info.config.exposedPorts, [...(spec.exposedPorts ?? [])].sort());
}

/** Names of the files in ROOT/blobs/sha256, sorted. */
export async function blobNames(root: string): Promise<string[]> {
  try {
    return (await readdir(join(root, "blobs", "sha256"))).sort();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw err;
  }
}

/** Every blob file hashes to its name; returns the digests. */
export async function assertBlobsVerify(root: string): Promise<string[]> {
  const names = await blobNames(root);
  for (const name of names) {
    assert.match(name, /^[0-9a-f]{64}$/, `stray file in blobs/sha256: ${name}`);
    const h = createHash("sha256");
    for await (const chunk of createReadStream(join(root, "blobs", "sha256", name)))
      h.update(chunk as Buffer);
    assert.equal(h.digest("hex"), name, `blob file ${name} does not hash to its name`);
  }
  return names.map((n) => `sha256:${n}`);
}

/** ROOT/tmp holds nothing (no staging dir, no temp file left behind). */
export async function assertTmpEmpty(root: string): Promise<void> {
  let entries: string[] = [];
  try {
    entries = await readdir(join(root, "tmp"));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
  }
  assert.deepEqual(entries, [], "ROOT/tmp is not empty");
}

/**
 * Whether a file in `from` can be cloned into `to` (FICLONE: btrfs, XFS), as the store clones an
 * export's output into its cache: an export with -o keeps a store copy only then. Creates `to`.
 */
export async function canClone(from: string, to: string): Promise<boolean> {
  await mkdir(to, { recursive: true });
  const src = join(from, `.clone-probe-${process.pid}`);
  const dest = join(to, `.clone-probe-${process.pid}.copy`);
  try {
    await writeFile(src, "probe");
    await copyFile(src, dest, constants.COPYFILE_FICLONE_FORCE);
    return true;
  } catch {
    return false;
  } finally {
    await rm(src, { force: true });
    await rm(dest, { force: true });
  }
}

/** The store as files and catalog: blob names, tmp entries and `kiln images --json`. */
export interface StoreSnapshot {
  blobs: string[];
  tmp: string[];
  images: ImageRow[];
}

export async function snapshot(box: Sandbox): Promise<StoreSnapshot> {
  let tmp: string[] = [];
  try {
    tmp = (await readdir(join(box.root, "tmp"))).sort();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
  }
  return { blobs: await blobNames(box.root), tmp, images: await box.json<ImageRow[]>(["images"]) };
}

/** The digest in a `/v2/NAME/blobs/sha256:…` request path. */
export function blobDigestOf(path: string): string {
  const m = /\/blobs\/(sha256:[0-9a-f]{64})/.exec(path);
  assert.ok(m, `not a blob path: ${path}`);
  return m[1]!;
}

export const BLOB_PATH = /^\/v2\/.+\/blobs\/sha256:[0-9a-f]{64}$/;

/** `s` as a literal inside a RegExp. */
export function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/** A test's skip reason when util-linux `script` (for runInPty) is missing. */
export function scriptMissing(): string | false {
  return existsSync("/usr/bin/script") ? false : "util-linux script is not installed";
}

/** Runs a shell command on a pseudo-terminal (util-linux `script`); returns what the terminal showed. */
export function runInPty(
  cmd: string,
  env: NodeJS.ProcessEnv,
): Promise<{ code: number | null; text: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn("script", ["-qfec", cmd, "/dev/null"], {
      cwd: REPO_ROOT,
      env: { ...env, TERM: "xterm", COLUMNS: "160", LINES: "40" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    const chunks: Buffer[] = [];
    child.stdout.on("data", (c: Buffer) => chunks.push(c));
    child.stderr.on("data", (c: Buffer) => chunks.push(c));
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, text: Buffer.concat(chunks).toString("utf8") }));
  });
}
