/**
 * The kernel modules a root needs, with their dependencies, in load order, from an unpacked kernel
 * package's `lib/modules/VERSION`. Dependencies come from `modules.dep` when depmod was run, else
 * from each module's own `.modinfo` ELF section (`depends=`, `softdep=pre:`): Debian's kernel .deb
 * ships no modules.dep. Modules listed in `modules.builtin` are part of the kernel and skipped.
 */
import { execFile } from "node:child_process";
import { readdir, readFile } from "node:fs/promises";
import { basename, join } from "node:path";
import { promisify } from "node:util";
import { gunzipSync } from "node:zlib";
import { KilnError } from "../errors.js";

/** Disk drivers (PCI and MMIO transports) and the root filesystems kiln's init mounts. */
export const ROOT_MODULES: readonly string[] = [
  "virtio_pci",
  "virtio_mmio",
  "virtio_blk",
  "ext4",
  "erofs",
  "overlay",
];

/** Modules that must be there, as a module or built in, for kiln's init to mount any root. */
const REQUIRED = new Set(["virtio_blk", "ext4", "erofs", "overlay"]);

const MODULE_SUFFIXES = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"] as const;

export interface KernelModule {
  /** Module name as the kernel spells it (underscores). */
  name: string;
  /** The .ko file (maybe compressed). */
  file: string;
}

export interface ModulePlan {
  /** Modules to load, dependencies first. */
  modules: KernelModule[];
  /** Wanted modules that are neither a module nor built in (the kernel may lack them). */
  missing: string[];
}

/** The kernel's name for a module file or name: dashes are underscores. */
export function moduleName(fileOrName: string): string {
  let n = basename(fileOrName);
  for (const s of MODULE_SUFFIXES) if (n.endsWith(s)) n = n.slice(0, -s.length);
  return n.replaceAll("-", "_");
}

async function readOptional(file: string): Promise<string | undefined> {
  try {
    return await readFile(file, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw err;
  }
}

async function listModuleFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  const visit = async (d: string) => {
    for (const e of await readdir(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) await visit(p);
      else if (MODULE_SUFFIXES.some((s) => e.name.endsWith(s))) out.push(p);
    }
  };
  await visit(dir);
  return out.sort();
}

/**
 * Resolves `wanted` (default ROOT_MODULES) and their dependencies in `dir` (lib/modules/VERSION).
 * Softdeps that resolve to nothing are left out (they are optional by nature).
 */
export async function resolveModules(
  dir: string,
  wanted: readonly string[] = ROOT_MODULES,
): Promise<ModulePlan> {
  const builtinText = await readOptional(join(dir, "modules.builtin"));
  const builtin = new Set((builtinText ?? "").split("\n").filter(Boolean).map(moduleName));
  const files = new Map<string, string>();
  const deps = new Map<string, string[]>();
  const depText = await readOptional(join(dir, "modules.dep"));
  if (depText !== undefined) {
    for (const line of depText.split("\n")) {
      const colon = line.indexOf(":");
      if (colon < 0) continue;
      const file = line.slice(0, colon).trim();
      const name = moduleName(file);
      files.set(name, join(dir, file));
      deps.set(
        name,
        line
          .slice(colon + 1)
          .trim()
          .split(/\s+/)
          .filter(Boolean)
          .map(moduleName),
      );
    }
  } else {
    let all: string[];
    try {
      all = await listModuleFiles(dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") {
        throw new KilnError("NOT_FOUND", `kernel modules: ${dir} does not exist`, { cause: err });
      }
      throw err;
    }
    for (const f of all) files.set(moduleName(f), f);
  }
  if (files.size === 0 && builtin.size === 0) {
    throw new KilnError(
      "NOT_FOUND",
      `kernel modules: ${dir} holds no modules and no modules.builtin (expected lib/modules/VERSION of a kernel package)`,
    );
  }
  const aliases = parseAliases((await readOptional(join(dir, "modules.alias"))) ?? "");
  const softdeps = parseSoftdeps((await readOptional(join(dir, "modules.softdep"))) ?? "");

  /** Dependencies of one module: modules.dep's list, or its .modinfo. */
  const depsOf = async (name: string): Promise<{ hard: string[]; soft: string[] }> => {
    const file = files.get(name)!;
    const soft = softdeps.get(name) ?? [];
    if (deps.has(name)) return { hard: deps.get(name)!, soft };
    const info = modinfo(await readModule(file));
    return {
      hard: info.depends,
      soft: [...soft, ...info.softPre],
    };
  };

  const order: KernelModule[] = [];
  const missing: string[] = [];
  const state = new Map<string, "visiting" | "done">();
  const visit = async (raw: string, required: boolean, chain: string[]): Promise<void> => {
    let name = moduleName(raw);
    if (!files.has(name) && !builtin.has(name)) {
      // A softdep may name an alias ("crc32c") rather than a module.
      const alias = aliases.get(name) ?? (files.has(`${name}_generic`) ? `${name}_generic` : undefined);
      if (alias !== undefined) name = alias;
    }
    if (builtin.has(name)) return;
    if (!files.has(name)) {
      if (required) missing.push(name);
      return;
    }
    const s = state.get(name);
    if (s === "done") return;
    if (s === "visiting") {
      throw new KilnError(
        "INVALID_ARGUMENT",
        `kernel modules: dependency cycle ${[...chain, name].join(" → ")}`,
      );
    }
    state.set(name, "visiting");
    const { hard, soft } = await depsOf(name);
    for (const d of soft) await visit(d, false, [...chain, name]);
    for (const d of hard) await visit(d, true, [...chain, name]);
    state.set(name, "done");
    order.push({ name, file: files.get(name)! });
  };
  for (const w of wanted) {
    const name = moduleName(w);
    if (!files.has(name) && !builtin.has(name)) {
      if (REQUIRED.has(name)) missing.push(name);
      continue;
    }
    await visit(name, true, []);
  }
  return { modules: order, missing: [...new Set(missing)] };
}

function parseAliases(text: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of text.split("\n")) {
    const m = /^alias\s+(\S+)\s+(\S+)/.exec(line);
    if (m && !out.has(moduleName(m[1]!))) out.set(moduleName(m[1]!), moduleName(m[2]!));
  }
  return out;
}

function parseSoftdeps(text: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const line of text.split("\n")) {
    const m = /^softdep\s+(\S+)\s+(.*)$/.exec(line);
    if (m) out.set(moduleName(m[1]!), softPre(m[2]!));
  }
  return out;
}

/** The `pre:` names of a softdep value (`pre: a b post: c`). */
function softPre(value: string): string[] {
  const out: string[] = [];
  let pre = false;
  for (const w of value.trim().split(/\s+/)) {
    if (w === "pre:") pre = true;
    else if (w === "post:") pre = false;
    else if (pre && w) out.push(w);
  }
  return out;
}

const execFileP = promisify(execFile);

/** A module's bytes, decompressed (the initramfs carries plain .ko files for busybox insmod). */
export async function readModule(file: string): Promise<Buffer> {
  if (file.endsWith(".ko")) return readFile(file);
  if (file.endsWith(".ko.gz")) return gunzipSync(await readFile(file));
  const tool = file.endsWith(".ko.xz") ? "xz" : "zstd";
  try {
    const { stdout } = await execFileP(tool, ["-dc", file], { encoding: "buffer", maxBuffer: 256 << 20 });
    return stdout;
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (e.code === "ENOENT") {
      throw new KilnError(
        "NOT_FOUND",
        `kernel module ${basename(file)} is ${tool}-compressed and the ${tool} tool is not installed (apt-get install ${tool === "xz" ? "xz-utils" : "zstd"})`,
        { cause: err },
      );
    }
    throw new KilnError(
      "INVALID_ARCHIVE",
      `kernel module ${basename(file)}: ${tool} -d failed: ${e.message}`,
      {
        cause: err,
      },
    );
  }
}

/** The `depends=` and `softdep=pre:` of a module's .modinfo section. */
export function modinfo(ko: Buffer): { depends: string[]; softPre: string[] } {
  const section = elfSection(ko, ".modinfo");
  if (!section) return { depends: [], softPre: [] };
  const depends: string[] = [];
  const softPreNames: string[] = [];
  for (const field of section.toString("latin1").split("\0")) {
    if (field.startsWith("depends=")) depends.push(...field.slice(8).split(",").filter(Boolean));
    else if (field.startsWith("softdep=")) softPreNames.push(...softPre(field.slice(8)));
  }
  return { depends, softPre: softPreNames };
}

interface ElfReader {
  is64: boolean;
  u16(off: number): number;
  u32(off: number): number;
  word(off: number): number;
}

function elfReader(b: Buffer, what: string): ElfReader {
  if (b.length < 52 || b.readUInt32BE(0) !== 0x7f454c46) {
    throw new KilnError("INVALID_ARGUMENT", `${what} is not an ELF file`);
  }
  const is64 = b[4] === 2;
  const le = b[5] === 1;
  const u16 = (o: number) => (le ? b.readUInt16LE(o) : b.readUInt16BE(o));
  const u32 = (o: number) => (le ? b.readUInt32LE(o) : b.readUInt32BE(o));
  const u64 = (o: number) => Number(le ? b.readBigUInt64LE(o) : b.readBigUInt64BE(o));
  return { is64, u16, u32, word: is64 ? u64 : u32 };
}

/** The bytes of a named section of an ELF file, or undefined. */
export function elfSection(b: Buffer, name: string): Buffer | undefined {
  const r = elfReader(b, "kernel module");
  const shoff = r.word(r.is64 ? 0x28 : 0x20);
  const shentsize = r.u16(r.is64 ? 0x3a : 0x2e);
  const shnum = r.u16(r.is64 ? 0x3c : 0x30);
  const shstrndx = r.u16(r.is64 ? 0x3e : 0x32);
  const header = (i: number) => {
    const o = shoff + i * shentsize;
    if (o + shentsize > b.length) throw new KilnError("INVALID_ARGUMENT", "kernel module: truncated ELF");
    return {
      name: r.u32(o),
      offset: r.word(o + (r.is64 ? 0x18 : 0x10)),
      size: r.word(o + (r.is64 ? 0x20 : 0x14)),
    };
  };
  const strtab = header(shstrndx);
  for (let i = 0; i < shnum; i++) {
    const h = header(i);
    const start = strtab.offset + h.name;
    const end = b.indexOf(0, start);
    if (b.toString("latin1", start, end) === name) return b.subarray(h.offset, h.offset + h.size);
  }
  return undefined;
}

/** True when the ELF has no PT_INTERP program header: it runs without a dynamic loader. */
export function isStaticElf(b: Buffer, what: string): boolean {
  const r = elfReader(b, what);
  const phoff = r.word(r.is64 ? 0x20 : 0x1c);
  const phentsize = r.u16(r.is64 ? 0x36 : 0x2a);
  const phnum = r.u16(r.is64 ? 0x38 : 0x2c);
  for (let i = 0; i < phnum; i++) {
    if (r.u32(phoff + i * phentsize) === 3) return false;
  }
  return true;
}
