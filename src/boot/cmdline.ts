/**
 * What kiln's guest init is told, and how: the kernel command line and the config it carries.
 *
 * The root is described on the command line with `kiln.*` words (a dot in the name makes the kernel
 * treat them as module parameters: they reach neither init's argv nor its environment):
 * - `kiln.root=ext4|erofs|erofs-layers|initramfs`; ext4 and erofs are on `/dev/vda`.
 * - `kiln.lowers=vda,vdb,…`: erofs-layers, the layer disks bottom layer first (disk order = layer
 *   order); `kiln.upper=vdX`: an ext4 disk for overlayfs's upper layer (default: tmpfs).
 * - `kiln.rw`: mount an ext4 root read-write (default read-only).
 * - `kiln.halt=poweroff|reboot`: how the init stops the VM (Firecracker only knows reboot).
 * - `kiln.cfg=BASE64`: the config, a POSIX shell fragment whose every value is single-quoted, or
 *   `kiln.cfgdisk=vdX` when the config does not fit on the command line: a raw disk (the last one)
 *   holding the fragment, padded with NUL bytes to a multiple of 4 KiB.
 */
import { KilnError } from "../errors.js";

/** What the init needs to run the image's program (a subset of RuntimeConfig). */
export interface GuestConfig {
  args: string[];
  env: string[];
  workingDir: string;
  uid: number;
  gid: number;
  groups: number[];
  hostname: string | undefined;
  systemd: boolean;
}

export type RootKind = "ext4" | "erofs" | "erofs-layers" | "initramfs";
export const ROOT_KINDS: readonly RootKind[] = ["ext4", "erofs", "erofs-layers", "initramfs"];

/** x86 and arm64 kernels keep 2048 bytes of command line; what is left is for the VMM and the user. */
export const CMDLINE_BUDGET = 1800;
/** The config disk's size unit. */
const DISK_BLOCK = 4096;

/** `s` as one single-quoted shell word: nothing in it is expanded. */
export function shellQuote(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

function checkText(what: string, s: string): void {
  if (s.includes("\0")) throw new KilnError("INVALID_ARGUMENT", `${what} contains a NUL byte`);
}

function checkId(what: string, n: number): void {
  if (!Number.isInteger(n) || n < 0 || n > 0xfffffffe) {
    throw new KilnError("INVALID_ARGUMENT", `${what} ${n} is not a valid id`);
  }
}

/**
 * The config as the init sources it: `KILN_*` variables only, every value single-quoted; the env
 * entries and arguments as numbered variables (`KILN_ENV_1`…, `KILN_ARG_1`…) so any bytes but NUL
 * survive. Env entries without `=` are left out (they name nothing to set).
 */
export function configScript(cfg: GuestConfig): string {
  if (cfg.args.length === 0) throw new KilnError("INVALID_ARGUMENT", "the image has no command to run");
  checkId("uid", cfg.uid);
  checkId("gid", cfg.gid);
  for (const g of cfg.groups) checkId("group", g);
  const env = cfg.env.filter((e) => e.indexOf("=") > 0);
  const lines: string[] = [];
  const set = (name: string, value: string) => {
    checkText(name, value);
    lines.push(`${name}=${shellQuote(value)}`);
  };
  set("KILN_UID", String(cfg.uid));
  set("KILN_GID", String(cfg.gid));
  set("KILN_GROUPS", cfg.groups.join(" "));
  set("KILN_WORKDIR", cfg.workingDir || "/");
  set("KILN_HOSTNAME", cfg.hostname ?? "");
  set("KILN_SYSTEMD", cfg.systemd ? "1" : "0");
  set("KILN_NENV", String(env.length));
  for (const [i, e] of env.entries()) set(`KILN_ENV_${i + 1}`, e);
  set("KILN_NARGS", String(cfg.args.length));
  for (const [i, a] of cfg.args.entries()) set(`KILN_ARG_${i + 1}`, a);
  return `${lines.join("\n")}\n`;
}

/** The name Linux gives the i-th virtio disk (0 → vda, 25 → vdz, 26 → vdaa), as sd_format_disk_name. */
export function virtioDiskName(index: number): string {
  let name = "";
  for (let i = index + 1; i > 0; i = Math.floor((i - 1) / 26)) {
    name = String.fromCharCode(97 + ((i - 1) % 26)) + name;
  }
  return `vd${name}`;
}

export interface CmdlineOptions {
  root: RootKind;
  /** erofs-layers: the number of layer disks (the first disks, bottom layer first). */
  layers?: number | undefined;
  /** erofs-layers: an ext4 upper disk follows the layers. */
  upper?: boolean | undefined;
  /** ext4: mount read-write. */
  rw?: boolean | undefined;
  halt?: "poweroff" | "reboot" | undefined;
  /** The VMM's own words (console, panic…), first. */
  base: string[];
  /** The user's extra words, last (`kiln.debug` traces the init). */
  extra?: string[] | undefined;
  /** Bytes the command line may take (default CMDLINE_BUDGET); the VMM may add its own words. */
  budget?: number | undefined;
  config: GuestConfig;
}

export interface Cmdline {
  cmdline: string;
  /** When the config did not fit on the command line: the bytes of the config disk, the last disk. */
  configDisk: Buffer | undefined;
  /** Data disks the root needs (erofs-layers: layers then upper), before any config disk. */
  dataDisks: number;
}

/** The kernel command line for kiln's init, and the config disk when the config is too long for it. */
export function kernelCmdline(opts: CmdlineOptions): Cmdline {
  const words = [...opts.base, `kiln.root=${opts.root}`];
  let dataDisks = opts.root === "ext4" || opts.root === "erofs" ? 1 : 0;
  if (opts.root === "erofs-layers") {
    const n = opts.layers ?? 0;
    if (n < 1) throw new KilnError("INVALID_ARGUMENT", "erofs-layers needs at least one layer disk");
    words.push(`kiln.lowers=${Array.from({ length: n }, (_, i) => virtioDiskName(i)).join(",")}`);
    dataDisks = n;
    if (opts.upper) words.push(`kiln.upper=${virtioDiskName(dataDisks++)}`);
  } else if (opts.upper) {
    throw new KilnError("INVALID_ARGUMENT", "an upper disk applies to erofs-layers only");
  }
  if (opts.rw) {
    if (opts.root !== "ext4") throw new KilnError("INVALID_ARGUMENT", "only an ext4 root can be read-write");
    words.push("kiln.rw");
  }
  if (opts.halt && opts.halt !== "poweroff") words.push(`kiln.halt=${opts.halt}`);
  const extra = opts.extra ?? [];
  for (const w of extra) {
    if (/^kiln\./.test(w) && w !== "kiln.debug") {
      throw new KilnError("INVALID_ARGUMENT", `${w}: kiln.* words are kiln's own`);
    }
  }
  const budget = opts.budget ?? CMDLINE_BUDGET;
  const script = Buffer.from(configScript(opts.config), "utf8");
  const inline = [...words, `kiln.cfg=${script.toString("base64")}`, ...extra].join(" ");
  if (inline.length <= budget) return { cmdline: inline, configDisk: undefined, dataDisks };
  const disk = Buffer.alloc(Math.ceil(script.length / DISK_BLOCK) * DISK_BLOCK);
  script.copy(disk);
  const cmdline = [...words, `kiln.cfgdisk=${virtioDiskName(dataDisks)}`, ...extra].join(" ");
  if (cmdline.length > budget) {
    throw new KilnError(
      "TOO_LARGE",
      `the kernel command line is ${cmdline.length} bytes (at most ${budget})`,
    );
  }
  return { cmdline, configDisk: disk, dataDisks };
}
