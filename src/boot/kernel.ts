/**
 * The kernel and initrd an image carries (a distro image with a kernel package installed), copied
 * out of its layers as boot artifacts. Each file is keyed by the digest of the layer it comes from,
 * so images sharing that layer share the artifact, and a second boot reads no layer data at all.
 */
import { randomBytes } from "node:crypto";
import { createWriteStream } from "node:fs";
import { access, mkdir, rename, rm, stat } from "node:fs/promises";
import { join, posix, relative } from "node:path";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { createGunzip } from "node:zlib";
import { KilnError } from "../errors.js";
import type { Inode } from "../fs/tree.js";
import { openImageTree, readTreeFiles, resolveInTree } from "../layers/image.js";
import { fsyncPath } from "../store/blobs.js";
import type { ImageRecord } from "../store/catalog.js";
import type { Store } from "../store/store.js";

export interface BootFiles {
  /** Absolute path of the kernel (decompressed when the image's was gzip, as arm64 `Image.gz`). */
  kernel?: string;
  /** Absolute path of the initrd, as the image has it (the kernel unpacks it itself). */
  initrd?: string;
  /** The kernel release, from its file name (`vmlinuz-6.1.0-18-cloud-amd64`) or /lib/modules. */
  version?: string;
}

export interface BootFilesOptions {
  /** The image's merged tree, when the caller already has it (saves a pass over the layers). */
  tree?: Inode | undefined;
}

/** Links distros keep to the default kernel and initrd (Debian's `/vmlinuz → boot/vmlinuz-…`). */
const KERNEL_LINKS = ["/vmlinuz", "/boot/vmlinuz"];
const INITRD_LINKS = ["/initrd.img", "/boot/initrd.img"];
/** Unversioned kernels in /boot, used when nothing better is there (arm64 distros: Image, Image.gz). */
const PLAIN_KERNELS = ["/boot/Image.gz", "/boot/Image", "/boot/vmlinux"];
/** Versioned kernel names in /boot: the version is what follows the prefix. */
const KERNEL_PREFIXES = ["vmlinuz-", "vmlinux-", "Image-"];
/** Versioned initrd names, `{v}` standing for the kernel version (Debian, Fedora, SUSE). */
const INITRD_NAMES = ["initrd.img-{v}", "initramfs-{v}.img", "initrd-{v}"];
/** Leftovers that are not a kernel to boot: backups, signatures, package manager temp files. */
const NOT_A_KERNEL = /(\.old|\.bak|\.sig|\.dpkg-[a-z]+|\.rpm[a-z]+)$/;

interface Found {
  inode: Inode;
  /** Canonical path in the image. */
  path: string;
}

/** The file at `path` (symlinks followed in the image), if it is a non-empty regular file. */
function fileAt(tree: Inode, path: string): Found | undefined {
  const r = resolveInTree(tree, path);
  if (r === undefined || r.inode.type !== "file" || r.inode.size === 0) return undefined;
  return { inode: r.inode, path: r.path };
}

/** The release in a kernel or initrd file name, if it has one. */
function versionOf(path: string): string | undefined {
  const name = posix.basename(path);
  for (const prefix of [...KERNEL_PREFIXES, "initrd.img-", "initrd-"]) {
    if (name.startsWith(prefix) && name.length > prefix.length) return name.slice(prefix.length);
  }
  const fedora = /^initramfs-(.+)\.img$/.exec(name);
  return fedora?.[1];
}

/** The kernel and initrd in the tree, without reading any file: what extractBootFiles would write. */
export function findBootFiles(tree: Inode): { kernel?: Found; initrd?: Found; version?: string } {
  let kernel: Found | undefined;
  for (const link of KERNEL_LINKS) {
    kernel = fileAt(tree, link);
    if (kernel) break;
  }
  if (kernel === undefined) {
    const boot = resolveInTree(tree, "/boot");
    const versioned: { version: string; found: Found }[] = [];
    if (boot?.inode.type === "directory") {
      for (const name of boot.inode.entries!.keys()) {
        if (NOT_A_KERNEL.test(name)) continue;
        const prefix = KERNEL_PREFIXES.find((p) => name.startsWith(p) && name.length > p.length);
        if (prefix === undefined) continue;
        const found = fileAt(tree, `${boot.path}/${name}`);
        if (found) versioned.push({ version: name.slice(prefix.length), found });
      }
    }
    versioned.sort((a, b) => compareVersions(b.version, a.version));
    kernel = versioned[0]?.found;
  }
  if (kernel === undefined) {
    for (const path of PLAIN_KERNELS) {
      kernel = fileAt(tree, path);
      if (kernel) break;
    }
  }
  if (kernel === undefined) return {};
  const version = versionOf(kernel.path) ?? onlyModulesDir(tree);

  let initrd: Found | undefined;
  if (version !== undefined) {
    for (const pattern of INITRD_NAMES) {
      initrd = fileAt(tree, `/boot/${pattern.replace("{v}", version)}`);
      if (initrd) break;
    }
  }
  if (initrd === undefined) {
    for (const link of INITRD_LINKS) {
      const found = fileAt(tree, link);
      // An initrd built for another kernel would not find its modules: only a matching or unnamed one.
      const v = found && versionOf(found.path);
      if (found && (v === undefined || version === undefined || v === version)) {
        initrd = found;
        break;
      }
    }
  }
  // A link mixing the two up (initrd.img → the kernel) is not an initrd.
  if (initrd?.inode === kernel.inode) initrd = undefined;
  return { kernel, ...(initrd && { initrd }), ...(version !== undefined && { version }) };
}

/** The one release under /lib/modules, when there is exactly one (an unversioned kernel's). */
function onlyModulesDir(tree: Inode): string | undefined {
  const mods = resolveInTree(tree, "/lib/modules");
  if (mods?.inode.type !== "directory") return undefined;
  const dirs = [...mods.inode.entries!].filter(([, i]) => i.type === "directory").map(([n]) => n);
  return dirs.length === 1 ? dirs[0] : undefined;
}

/**
 * Writes the image's kernel and initrd as `boot-<layer digest hex>-<name>` into the store's
 * artifacts (recorded in the catalog with the image, so GC keeps them while it is there), or into
 * `outDir` when given. An artifact already present is used as is. No kernel → `{}`.
 */
export async function extractBootFiles(
  store: Store,
  image: ImageRecord,
  outDir?: string,
  opts: BootFilesOptions = {},
): Promise<BootFiles> {
  const tree = opts.tree ?? (await openImageTree(store, image));
  const found = findBootFiles(tree);
  if (found.kernel === undefined) return {};
  const dir = outDir ?? store.artifactsDir;
  const tmpDir = outDir ?? store.tmpDir;
  await mkdir(dir, { recursive: true });

  type Target = { role: "kernel" | "initrd"; found: Found; file: string };
  const targets: Target[] = [];
  for (const role of ["kernel", "initrd"] as const) {
    const f = found[role];
    if (f === undefined) continue;
    targets.push({ role, found: f, file: join(dir, artifactName(image, f, role)) });
  }
  const missing: Target[] = [];
  for (const t of targets) if (!(await exists(t.file))) missing.push(t);

  await readTreeFiles(
    store,
    image,
    missing.map((t) => t.found.inode),
    async (inode, data) => {
      const t = missing.find((m) => m.found.inode === inode)!;
      await writeArtifact(data, t.file, tmpDir, t.role === "kernel", t.found.path);
    },
  );

  const result: BootFiles = {};
  for (const t of targets) {
    result[t.role] = t.file;
    if (outDir === undefined) {
      store.catalog.putArtifact({
        key: posix.basename(t.file),
        manifestDigest: image.manifestDigest,
        format: `boot-${t.role}`,
        options: JSON.stringify({ path: t.found.path, layer: layerOf(image, t.found).digest }),
        path: relative(store.root, t.file),
        size: (await stat(t.file)).size,
      });
    }
  }
  if (found.version !== undefined) result.version = found.version;
  return result;
}

function layerOf(image: ImageRecord, found: Found): { digest: string } {
  const i = found.inode.data?.layer;
  const layer = i === undefined ? undefined : image.layers[i];
  if (layer === undefined) throw new KilnError("INTERNAL", `${found.path} has no layer`);
  return layer;
}

/**
 * `boot-<layer hex>-<path>`: the image path with "/" as "_" (`boot_vmlinuz-6.1.0-18-cloud-amd64`),
 * unique within the layer; a decompressed kernel drops its `.gz`.
 */
function artifactName(image: ImageRecord, found: Found, role: "kernel" | "initrd"): string {
  const hex = layerOf(image, found).digest.replace(/^sha256:/, "");
  let name = found.path.slice(1).replaceAll("/", "_");
  if (role === "kernel") name = name.replace(/\.gz$/, "");
  return `boot-${hex}-${name}`;
}

async function exists(file: string): Promise<boolean> {
  return access(file).then(
    () => true,
    () => false,
  );
}

const GZIP = [0x1f, 0x8b];

/**
 * Writes `data` to a temp file in `tmpDir`, fsynced, then renames it to `file`: a reader never sees
 * half a kernel, and two processes writing the same artifact both leave a whole one. A kernel that
 * is gzip (arm64 `Image.gz`, Debian's arm64 vmlinuz) is stored decompressed: Firecracker and Cloud
 * Hypervisor load only an uncompressed image.
 */
async function writeArtifact(
  data: AsyncIterable<Buffer>,
  file: string,
  tmpDir: string,
  kernel: boolean,
  imagePath: string,
): Promise<void> {
  const it = data[Symbol.asyncIterator]();
  const head: Buffer[] = [];
  let headLength = 0;
  while (headLength < GZIP.length) {
    const r = await it.next();
    if (r.done) break;
    head.push(r.value);
    headLength += r.value.length;
  }
  const first = Buffer.concat(head);
  const gzip = kernel && GZIP.every((b, i) => first[i] === b);
  async function* all(): AsyncGenerator<Buffer> {
    if (first.length > 0) yield first;
    for (;;) {
      const r = await it.next();
      if (r.done) return;
      yield r.value;
    }
  }
  const tmp = join(tmpDir, `.boot-${process.pid}-${randomBytes(6).toString("hex")}.tmp`);
  try {
    const out = createWriteStream(tmp, { flags: "wx" });
    try {
      if (gzip) await pipeline(Readable.from(all()), createGunzip(), out);
      else await pipeline(Readable.from(all()), out);
    } catch (err) {
      if (gzip && (err as NodeJS.ErrnoException).code?.startsWith("Z_")) {
        throw new KilnError(
          "INVALID_ARCHIVE",
          `kernel ${imagePath} in the image starts as gzip but does not decompress: ${(err as Error).message}`,
          { cause: err },
        );
      }
      throw err;
    }
    await fsyncPath(tmp);
    await rename(tmp, file);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
  await fsyncPath(posix.dirname(file));
}

/**
 * Orders version strings as dpkg does (`sort -V` agrees on kernel releases): runs of digits compare
 * as numbers, other characters by ASCII with letters before non-letters, and `~` before anything,
 * even the end. Negative when `a` is older.
 */
export function compareVersions(a: string, b: string): number {
  let i = 0;
  let j = 0;
  while (i < a.length || j < b.length) {
    let firstDiff = 0;
    while ((i < a.length && !isDigit(a[i]!)) || (j < b.length && !isDigit(b[j]!))) {
      const ac = order(a[i]);
      const bc = order(b[j]);
      if (ac !== bc) return ac - bc;
      i++;
      j++;
    }
    while (a[i] === "0") i++;
    while (b[j] === "0") j++;
    while (i < a.length && isDigit(a[i]!) && j < b.length && isDigit(b[j]!)) {
      if (firstDiff === 0) firstDiff = a.charCodeAt(i) - b.charCodeAt(j);
      i++;
      j++;
    }
    if (i < a.length && isDigit(a[i]!)) return 1;
    if (j < b.length && isDigit(b[j]!)) return -1;
    if (firstDiff !== 0) return firstDiff;
  }
  return 0;
}

function isDigit(c: string): boolean {
  return c >= "0" && c <= "9";
}

/** dpkg's order of a non-digit character: end of string and digits 0, `~` lowest, letters before others. */
function order(c: string | undefined): number {
  if (c === undefined || isDigit(c)) return 0;
  if (c === "~") return -1;
  if (/[A-Za-z]/.test(c)) return c.charCodeAt(0);
  return c.charCodeAt(0) + 256;
}
