/**
 * kiln's initramfs: a gzip'd newc cpio with a static busybox, kiln's init and the kernel modules the
 * root needs. Everything lives under /kiln (and /init → kiln/init), so an image's own cpio archive
 * unpacked before it into the same rootfs (the cpio format) cannot break it.
 *
 *   /init → kiln/init          /kiln/busybox        /kiln/modules/NAME.ko
 *   /dev/console (char 5:1)    /kiln/bin/APPLET → ../busybox    /kiln/modules/order
 */
import { readFile } from "node:fs/promises";
import { KilnError } from "../errors.js";
import { writeCpio } from "../fs/cpio/writer.js";
import { type Inode, MemoryContent, newInode } from "../fs/tree.js";
import { INIT_APPLETS, INIT_SCRIPT } from "./init.js";
import { isStaticElf, readModule, resolveModules } from "./modules.js";

export const DEFAULT_BUSYBOX = "/bin/busybox";

export interface InitramfsOptions {
  /** A static busybox for the guest's architecture (default /bin/busybox, from busybox-static). */
  busybox?: string | undefined;
  /** lib/modules/VERSION of an unpacked kernel package; none for kernels with the drivers built in. */
  modulesDir?: string | undefined;
}

export interface InitramfsResult {
  bytes: number;
  /** Modules included, in load order. */
  modules: string[];
  /** Root modules the kernel has neither as a module nor built in. */
  missing: string[];
}

/** Reads and checks the busybox to embed: an ELF without a dynamic loader. */
export async function readStaticBusybox(path: string): Promise<Buffer> {
  let bytes: Buffer;
  try {
    bytes = await readFile(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") {
      throw new KilnError(
        "NOT_FOUND",
        `busybox: ${path} does not exist (apt-get install busybox-static, or give --busybox PATH)`,
        { cause: err },
      );
    }
    throw err;
  }
  if (!isStaticElf(bytes, `busybox ${path}`)) {
    throw new KilnError(
      "INVALID_ARGUMENT",
      `busybox: ${path} is dynamically linked; the initramfs needs a static one (apt-get install busybox-static)`,
    );
  }
  return bytes;
}

/** Writes kiln's initramfs, gzip'd, to `out` (created or truncated: callers pass a temp path). */
export async function writeInitramfs(out: string, opts: InitramfsOptions = {}): Promise<InitramfsResult> {
  const busybox = await readStaticBusybox(opts.busybox ?? DEFAULT_BUSYBOX);
  const plan = opts.modulesDir ? await resolveModules(opts.modulesDir) : { modules: [], missing: [] };

  const content = new MemoryContent();
  let offset = 0;
  const root = newInode("directory");
  const dir = (parent: Inode, name: string): Inode => {
    const d = newInode("directory");
    parent.entries!.set(name, d);
    return d;
  };
  const file = (parent: Inode, name: string, bytes: Buffer, mode: number): void => {
    const f = newInode("file", {
      mode,
      size: bytes.length,
      // Any distinct, increasing position: MemoryContent only needs the order.
      data: bytes.length > 0 ? { layer: 0, offset: offset++, stored: bytes.length } : undefined,
    });
    content.set(f, bytes);
    parent.entries!.set(name, f);
  };
  const symlink = (parent: Inode, name: string, target: string): void => {
    parent.entries!.set(name, newInode("symlink", { target, size: Buffer.byteLength(target), mode: 0o777 }));
  };

  const dev = dir(root, "dev");
  // The kernel opens /dev/console for init's stdio before init can mount devtmpfs.
  dev.entries!.set("console", newInode("char", { mode: 0o600, rdevMajor: 5, rdevMinor: 1 }));
  symlink(root, "init", "kiln/init");
  const kiln = dir(root, "kiln");
  file(kiln, "init", Buffer.from(INIT_SCRIPT, "utf8"), 0o755);
  file(kiln, "busybox", busybox, 0o755);
  const bin = dir(kiln, "bin");
  for (const a of INIT_APPLETS) symlink(bin, a, "../busybox");
  if (plan.modules.length > 0) {
    const mods = dir(kiln, "modules");
    for (const m of plan.modules) file(mods, `${m.name}.ko`, await readModule(m.file), 0o644);
    file(mods, "order", Buffer.from(`${plan.modules.map((m) => m.name).join("\n")}\n`), 0o644);
  }
  const { bytes } = await writeCpio(root, content, out, { compress: "gzip" });
  return { bytes, modules: plan.modules.map((m) => m.name), missing: plan.missing };
}
