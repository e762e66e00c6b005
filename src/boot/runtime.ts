/**
 * What a VM booting an image must run, and as whom: the image config read the way a container
 * runtime (Docker, runc) reads it. The user is resolved through the image's own /etc/passwd and
 * /etc/group, read from the layers without extracting, so an unknown user fails at export time
 * rather than in the guest.
 */
import { KilnError } from "../errors.js";
import type { Inode } from "../fs/tree.js";
import { fromText } from "../io/bytestring.js";
import { openImageTree, readImageFiles, resolveInTree } from "../layers/image.js";
import { type ImageConfig, parseConfig } from "../registry/manifest.js";
import type { ImageRecord } from "../store/catalog.js";
import type { Store } from "../store/store.js";

export interface RuntimeConfig {
  /** Entrypoint + cmd as the guest runs them (the command given at boot replaces cmd). */
  args: string[];
  /** KEY=VALUE, the image's first; PATH and HOME always present. */
  env: string[];
  workingDir: string;
  /** The user's name from /etc/passwd, else the uid as text. */
  user: string;
  uid: number;
  gid: number;
  /** Supplementary groups: the gids of /etc/group entries that list the user. */
  groups: number[];
  /** The command is an init system (systemd, or anything at /sbin/init): it is run as PID 1 as is. */
  systemd: boolean;
  hostname: string | undefined;
  labels: Record<string, string>;
  stopSignal: string | null;
  exposedPorts: string[];
  architecture: string;
}

export interface RuntimeOptions {
  /** Replaces the image's cmd (`docker run IMAGE CMD…`); the entrypoint stays. Empty → the image's cmd. */
  args?: string[] | undefined;
  /** The guest's hostname (default: the config's Hostname, if any). */
  hostname?: string | undefined;
  /** The image's merged tree, when the caller already has it (saves a pass over the layers). */
  tree?: Inode | undefined;
}

/** Docker's PATH for an image that sets none. */
export const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/** Where an init system lives; a command starting with one of these (or a link to one) boots as is. */
export const INIT_PATHS: readonly string[] = [
  "/sbin/init",
  "/lib/systemd/systemd",
  "/usr/lib/systemd/systemd",
];

/** /etc/passwd and /etc/group larger than this are refused (they are a few KiB; this is a guard). */
const MAX_ACCOUNT_FILE = 4 << 20;

/** The image config's Docker-only fields kiln also reads. */
export type Config = NonNullable<ImageConfig["config"]> & { Hostname?: string };

export async function runtimeConfig(
  store: Store,
  image: ImageRecord,
  opts: RuntimeOptions = {},
): Promise<RuntimeConfig> {
  const doc = parseConfig(Buffer.from(image.config, "utf8"));
  const c: Config = doc.config ?? {};
  const args = effectiveArgs(c, opts.args);
  if (args.length === 0) {
    throw new KilnError(
      "INVALID_ARGUMENT",
      `image ${image.ref ?? image.manifestDigest} has no entrypoint or cmd: give the command to run`,
    );
  }
  const tree = opts.tree ?? (await openImageTree(store, image));
  const files = await readImageFiles(store, image, ["/etc/passwd", "/etc/group"], MAX_ACCOUNT_FILE, tree);
  const account = resolveUser(
    c.User ?? "",
    files.get("/etc/passwd")?.toString("utf8"),
    files.get("/etc/group")?.toString("utf8"),
  );

  const env = [...(c.Env ?? [])];
  const has = (key: string) => env.some((e) => e.startsWith(`${key}=`));
  if (!has("PATH")) env.push(`PATH=${DEFAULT_PATH}`);
  // As runc: HOME from the user's passwd entry, "/" when it has none.
  if (!has("HOME")) env.push(`HOME=${account.home}`);

  const hostname = opts.hostname ?? (c.Hostname || undefined);
  return {
    args,
    env,
    workingDir: c.WorkingDir || "/",
    user: account.name,
    uid: account.uid,
    gid: account.gid,
    groups: account.groups,
    systemd: isSystemdImage(args, tree),
    hostname,
    labels: { ...(c.Labels ?? {}) },
    stopSignal: c.StopSignal || null,
    exposedPorts: Object.keys(c.ExposedPorts ?? {}).sort(),
    architecture: doc.architecture ?? image.platform.split("/")[1] ?? "",
  };
}

/** Entrypoint + cmd, with `override` (when non-empty) in place of cmd, as `docker run IMAGE CMD…`. */
export function effectiveArgs(config: Config, override?: readonly string[]): string[] {
  const cmd = override !== undefined && override.length > 0 ? override : (config.Cmd ?? []);
  return [...(config.Entrypoint ?? []), ...cmd];
}

/**
 * True when the command starts with an init system: /sbin/init, /lib/systemd/systemd or
 * /usr/lib/systemd/systemd, named directly or reached through symlinks in the image (`/sbin/init →
 * /lib/systemd/systemd`, usrmerge's `/sbin → usr/sbin`, relative or absolute targets).
 */
export function isSystemdImage(args: readonly string[], tree: Inode): boolean {
  const cmd = args[0];
  if (cmd === undefined || !cmd.startsWith("/")) return false;
  if (INIT_PATHS.includes(cmd)) return true;
  const r = resolveInTree(tree, fromText(cmd));
  if (r === undefined) return false;
  return [r.path, ...r.via].some((p) => INIT_PATHS.includes(p));
}

export interface Account {
  name: string;
  uid: number;
  gid: number;
  groups: number[];
  home: string;
}

interface PasswdEntry {
  name: string;
  uid: number;
  gid: number;
  home: string;
}

interface GroupEntry {
  name: string;
  gid: number;
  members: string[];
}

/** /etc/passwd lines `name:x:uid:gid:gecos:home:shell`; malformed lines are skipped (as libc does). */
export function parsePasswd(text: string): PasswdEntry[] {
  const out: PasswdEntry[] = [];
  for (const line of text.split("\n")) {
    const f = line.split(":");
    if (f.length < 7 || f[0] === "" || line.startsWith("#")) continue;
    const uid = parseId(f[2]!);
    const gid = parseId(f[3]!);
    if (uid === undefined || gid === undefined) continue;
    out.push({ name: f[0]!, uid, gid, home: f[5]! });
  }
  return out;
}

/** /etc/group lines `name:x:gid:user1,user2`; malformed lines are skipped. */
export function parseGroup(text: string): GroupEntry[] {
  const out: GroupEntry[] = [];
  for (const line of text.split("\n")) {
    const f = line.split(":");
    if (f.length < 4 || f[0] === "" || line.startsWith("#")) continue;
    const gid = parseId(f[2]!);
    if (gid === undefined) continue;
    out.push({ name: f[0]!, gid, members: f[3]!.split(",").filter((m) => m !== "") });
  }
  return out;
}

/** A decimal id that fits a 32-bit uid/gid (not -1, which means "no change" to the kernel). */
function parseId(text: string): number | undefined {
  if (!/^[0-9]{1,10}$/.test(text)) return undefined;
  const n = Number(text);
  return n < 0xffffffff ? n : undefined;
}

/**
 * Resolves an image's `User` (`name`, `uid`, `name:group`, `uid:gid`, `name:gid`, `uid:group`; empty
 * = root) as runc does: a numeric uid need not be in /etc/passwd (its gid is then 0 unless given,
 * its home "/"); a name must be. Supplementary groups are the /etc/group entries listing the user.
 */
export function resolveUser(spec: string, passwd: string | undefined, group: string | undefined): Account {
  const colon = spec.indexOf(":");
  const userPart = colon < 0 ? spec : spec.slice(0, colon);
  const groupPart = colon < 0 ? undefined : spec.slice(colon + 1);
  const users = passwd === undefined ? [] : parsePasswd(passwd);
  const groups = group === undefined ? [] : parseGroup(group);

  const numericUid = userPart === "" ? 0 : parseId(userPart);
  let entry: PasswdEntry | undefined;
  if (numericUid !== undefined) {
    entry = users.find((u) => u.uid === numericUid);
  } else {
    entry = users.find((u) => u.name === userPart);
    if (entry === undefined) {
      throw new KilnError(
        "INVALID_ARGUMENT",
        passwd === undefined
          ? `user "${userPart}" not found: the image has no /etc/passwd`
          : `user "${userPart}" not found in the image's /etc/passwd`,
      );
    }
  }
  const uid = entry?.uid ?? numericUid!;

  let gid = entry?.gid ?? 0;
  if (groupPart !== undefined && groupPart !== "") {
    const numericGid = parseId(groupPart);
    if (numericGid !== undefined) gid = numericGid;
    else {
      const g = groups.find((x) => x.name === groupPart);
      if (g === undefined) {
        throw new KilnError(
          "INVALID_ARGUMENT",
          group === undefined
            ? `group "${groupPart}" not found: the image has no /etc/group`
            : `group "${groupPart}" not found in the image's /etc/group`,
        );
      }
      gid = g.gid;
    }
  }

  const supplementary: number[] = [];
  if (entry !== undefined) {
    for (const g of groups) {
      if (g.members.includes(entry.name) && !supplementary.includes(g.gid)) supplementary.push(g.gid);
    }
  }
  return {
    name: entry?.name ?? String(uid),
    uid,
    gid,
    groups: supplementary,
    home: entry?.home || "/",
  };
}
