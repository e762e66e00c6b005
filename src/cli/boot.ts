/**
 * `kiln initramfs`, `kiln vm-config` and `kiln boot`: kiln's outputs as VMs (see src/boot/).
 */
import { createReadStream, createWriteStream, existsSync } from "node:fs";
import { mkdtemp, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, dirname, join, resolve } from "node:path";
import { pipeline } from "node:stream/promises";
import { Command, Option } from "commander";
import type { GuestConfig, RootKind } from "../boot/cmdline.js";
import type { Accel, Vmm, VmPlan } from "../boot/vmm.js";
import { EXPORT_FORMATS, type ExportFormat } from "../build/formats.js";
import { checkOutput } from "../build/output-path.js";
import { replaceAtomically } from "../build/publish.js";
import { KilnError } from "../errors.js";
import { type BootImage, prepareBootImage, type RuntimeConfig } from "../images.js";
import { parsePlatform } from "../registry/platform.js";
import { abortOnSignal, globals, json, out, positiveInt } from "./common.js";
import { formatBytes, parseSize } from "./format.js";

// The boot modules are loaded by the commands that use them, as the rest of the CLI does.
const vmm = () => import("../boot/vmm.js");

export function initramfsCommand(): Command {
  return new Command("initramfs")
    .description("build kiln's initramfs: a static busybox, kiln's init and the kernel modules a root needs")
    .option("--kernel-modules <dir>", "lib/modules/VERSION of an unpacked kernel package (default: none)")
    .option("--busybox <path>", "static busybox for the guest (default /bin/busybox, from busybox-static)")
    .requiredOption("-o, --output <path>", "file to write (gzip'd newc cpio, replaced atomically)")
    .action(async (o: { kernelModules?: string; busybox?: string; output: string }, cmd: Command) => {
      const g = globals(cmd);
      const r = await buildInitramfs(o.output, o.kernelModules, o.busybox);
      if (g.json) return json({ output: o.output, bytes: r.bytes, modules: r.modules, missing: r.missing });
      if (g.quiet) return out(o.output);
      const mods = r.modules.length > 0 ? `modules: ${r.modules.join(" ")}` : "no modules";
      out(`Wrote ${o.output} (${formatBytes(r.bytes)}, ${mods})`);
    });
}

async function buildInitramfs(output: string, modulesDir: string | undefined, busybox: string | undefined) {
  const { writeInitramfs } = await import("../boot/initramfs.js");
  // A symlink is followed; a device, a FIFO or a directory at the path is refused.
  const { path } = await checkOutput(output, { shape: "file", devices: false });
  const r = await replaceAtomically(path, (tmp) => writeInitramfs(tmp, { modulesDir, busybox }));
  if (r.missing.length > 0) {
    process.stderr.write(
      `kiln: warning: ${modulesDir} has neither a module nor a built-in driver for ${r.missing.join(", ")}\n`,
    );
  }
  return r;
}

/** Options `vm-config` and `boot` share. */
function vmOptions(c: Command): Command {
  return c
    .option("--format <format>", `root format: ${EXPORT_FORMATS.join(", ")}`, "erofs")
    .requiredOption("--kernel <path>", "the guest kernel (e.g. boot/vmlinuz-* of an unpacked kernel package)")
    .option("--initrd <path>", "kiln's initramfs (from `kiln initramfs`); default: built for this run")
    .option(
      "--kernel-modules <dir>",
      "modules for the initramfs (default: ../lib/modules/VERSION next to the kernel, if there)",
    )
    .option("--busybox <path>", "static busybox for the initramfs (default /bin/busybox)")
    .option(
      "--memory <size>",
      "guest memory, e.g. 512M, 2G (a bare number is MiB; default 512M, for cpio 3x the initrd plus 128M if more)",
    )
    .addOption(new Option("--cpus <n>", "vCPUs").default(1).argParser(positiveInt("--cpus")))
    .option("--append <words>", "more kernel command line words")
    .option("--platform <os/arch[/variant]>", "which platform, when the store holds several for the ref")
    .argument("<ref>", "image reference, or a unique prefix of its manifest digest")
    .argument("[cmd...]", "the command to run instead of the image's cmd (after --)");
}

interface VmFlags {
  format: string;
  kernel: string;
  initrd?: string;
  kernelModules?: string;
  busybox?: string;
  memory?: string;
  cpus: number;
  append?: string;
  platform?: string;
}

function parseFormat(v: string): ExportFormat {
  if (!(EXPORT_FORMATS as readonly string[]).includes(v)) {
    throw new KilnError(
      "INVALID_ARGUMENT",
      `--format: unknown format "${v}"; expected ${EXPORT_FORMATS.join(", ")}`,
    );
  }
  return v as ExportFormat;
}

function memoryMiB(v: string): number {
  const bytes = /^\d+$/.test(v.trim()) ? Number(v) * 2 ** 20 : parseSize(v);
  if (bytes === undefined || bytes < 64 * 2 ** 20 || bytes % 2 ** 20 !== 0) {
    throw new KilnError("INVALID_ARGUMENT", `--memory: "${v}" is not a whole number of MiB, at least 64M`);
  }
  return bytes / 2 ** 20;
}

const rootKind = (format: ExportFormat): RootKind => (format === "cpio" ? "initramfs" : format);

function guestConfig(r: RuntimeConfig): GuestConfig {
  return {
    args: r.args,
    env: r.env,
    workingDir: r.workingDir,
    uid: r.uid,
    gid: r.gid,
    groups: r.groups,
    hostname: r.hostname,
    systemd: r.systemd,
  };
}

async function checkKernel(path: string): Promise<string> {
  const st = await stat(path).catch(() => undefined);
  if (!st?.isFile()) {
    throw new KilnError(
      "NOT_FOUND",
      `kernel ${path} does not exist (for example: apt-get download linux-image-cloud-amd64's linux-image-6.1.0-*-cloud-amd64, dpkg-deb -x it, use boot/vmlinuz-*)`,
    );
  }
  return resolve(path);
}

/** lib/modules/VERSION beside boot/vmlinuz-VERSION in an unpacked kernel package, if it is there. */
export function modulesNextToKernel(kernel: string): string | undefined {
  const m = /^(?:vmlinuz|vmlinux|bzImage|Image)-(.+)$/.exec(basename(kernel));
  if (!m) return undefined;
  for (const lib of ["lib", "usr/lib"]) {
    const dir = resolve(dirname(kernel), "..", lib, "modules", m[1]!);
    if (existsSync(dir)) return dir;
  }
  return undefined;
}

/** Concatenates files into `out`, each padded to 512 bytes (the kernel skips zeros between archives). */
async function concatInitrd(out: string, parts: string[]): Promise<void> {
  const w = createWriteStream(out);
  let total = 0;
  for (const p of parts) {
    await pipeline(createReadStream(p), w, { end: false });
    total += (await stat(p)).size;
    const pad = (512 - (total % 512)) % 512;
    if (pad > 0) w.write(Buffer.alloc(pad));
    total += pad;
  }
  await new Promise<void>((res, rej) => w.end((err?: Error | null) => (err ? rej(err) : res())));
}

interface Prepared {
  boot: BootImage;
  plan: VmPlan;
}

/**
 * Exports the image, builds or takes the initrd (the cpio format: the image's archive, then kiln's
 * initramfs, so kiln's /init wins), and plans the VM. Files it makes go to `dir`.
 */
async function prepare(
  ref: string,
  args: string[],
  o: VmFlags & { upper?: string; rw?: boolean },
  target: {
    vmm: Vmm;
    root: string;
    dir?: string | undefined;
    outDir?: string | undefined;
  },
): Promise<Prepared> {
  const { planVm, archOf, guestMemoryMiB } = await vmm();
  const format = parseFormat(o.format);
  const kernel = await checkKernel(o.kernel);
  const memoryFlag = o.memory === undefined ? undefined : memoryMiB(o.memory);
  if (o.upper !== undefined && !existsSync(o.upper)) {
    throw new KilnError(
      "NOT_FOUND",
      `upper disk ${o.upper} does not exist (create one with kiln disk create)`,
    );
  }
  const boot = await prepareBootImage(ref, {
    root: target.root,
    format,
    args,
    platform: o.platform ? parsePlatform(o.platform) : undefined,
    outDir: target.outDir,
  });
  for (const w of boot.warnings) process.stderr.write(`kiln: warning: ${w}\n`);
  let initrd = o.initrd ? resolve(o.initrd) : undefined;
  if (initrd === undefined) {
    if (target.dir === undefined) throw new KilnError("INTERNAL", "no directory for the initramfs");
    initrd = join(target.dir, "initramfs.cpio.gz");
    await buildInitramfs(initrd, o.kernelModules ?? modulesNextToKernel(kernel), o.busybox);
  } else if (!existsSync(initrd)) {
    throw new KilnError("NOT_FOUND", `initrd ${initrd} does not exist (build one with kiln initramfs)`);
  }
  if (format === "cpio") {
    if (target.dir === undefined) throw new KilnError("INTERNAL", "no directory for the initrd");
    const both = join(target.dir, "initrd.img");
    await concatInitrd(both, [boot.files[0]!, initrd]);
    initrd = both;
  }
  // The cpio root is unpacked into guest memory: sized from the archive unless the user says.
  const memory =
    memoryFlag ?? guestMemoryMiB(rootKind(format), format === "cpio" ? (await stat(initrd)).size : 0);
  const plan = planVm({
    vmm: target.vmm,
    arch: archOf(boot.runtime.architecture),
    kernel,
    initrd,
    root: rootKind(format),
    rootDisks: format === "cpio" ? [] : boot.files.map((f) => resolve(f)),
    upper: o.upper ? resolve(o.upper) : undefined,
    rw: o.rw,
    config: guestConfig(boot.runtime),
    memoryMiB: memory,
    cpus: o.cpus,
    append: o.append?.split(/\s+/).filter(Boolean),
    configDiskPath: target.dir === undefined ? undefined : join(target.dir, "config.img"),
  });
  if (plan.configDisk) await writeFile(plan.configDisk.path, plan.configDisk.bytes);
  return { boot, plan };
}

export function vmConfigCommand(): Command {
  return vmOptions(
    new Command("vm-config").description(
      "print a VM config that boots an image: Firecracker's JSON, or Cloud Hypervisor's or QEMU's command line",
    ),
  )
    .addOption(
      new Option("--vmm <vmm>", "the VM monitor")
        .choices(["firecracker", "cloud-hypervisor", "qemu"])
        .makeOptionMandatory(),
    )
    .option(
      "--upper <disk>",
      "erofs-layers: an ext4 disk (kiln disk create) for the overlay's writable layer",
    )
    .option("--rw", "ext4: mount the root read-write (needs --output-dir: the store's copy stays as built)")
    .addOption(
      new Option("--accel <accel>", "qemu: accelerator").choices(["auto", "kvm", "tcg"]).default("auto"),
    )
    .option(
      "-o, --output-dir <dir>",
      "write the root, the initramfs and any config disk here (default: the store's cached export; needs --initrd)",
    )
    .action(async (ref: string, args: string[], o, cmd: Command) => {
      const g = globals(cmd);
      const { firecrackerConfig, cloudHypervisorArgs, qemuArgs, shellCommand, archOf } = await vmm();
      const outDir: string | undefined = o.outputDir ? resolve(o.outputDir) : undefined;
      if (outDir === undefined) {
        if (o.rw)
          throw new KilnError(
            "INVALID_ARGUMENT",
            "--rw needs --output-dir: the store's export stays as built",
          );
        if (!o.initrd) {
          throw new KilnError(
            "INVALID_ARGUMENT",
            "give --initrd (from kiln initramfs), or --output-dir to build one",
          );
        }
        if (o.format === "cpio") {
          throw new KilnError(
            "INVALID_ARGUMENT",
            "--format cpio needs --output-dir: the initrd is the image's archive and kiln's initramfs in one file",
          );
        }
      } else if (!(await stat(outDir).catch(() => undefined))?.isDirectory()) {
        throw new KilnError("NOT_FOUND", `--output-dir ${outDir} is not a directory`);
      }
      // Without an output directory nothing is written (a config too long for the command line fails).
      const { plan, boot } = await prepare(ref, args, o, { vmm: o.vmm, root: g.root, dir: outDir, outDir });
      const spec = plan.spec;
      if (o.vmm === "firecracker") {
        const config = firecrackerConfig(spec);
        if (g.json) json({ vmm: o.vmm, config, image: boot.image.manifestDigest });
        else json(config);
        return;
      }
      let argv: string[];
      if (o.vmm === "cloud-hypervisor") argv = cloudHypervisorArgs(spec);
      else {
        const { detectAccel, findQemu } = await import("../boot/qemu.js");
        const arch = archOf(boot.runtime.architecture);
        let accel = o.accel as Accel | "auto";
        if (accel === "auto") {
          // Printed for this machine; without QEMU here to probe KVM, /dev/kvm decides.
          const qemu = await findQemu(arch).catch(() => undefined);
          if (qemu) accel = await detectAccel(arch, qemu);
          else accel = existsSync("/dev/kvm") ? "kvm" : "tcg";
        }
        argv = qemuArgs(spec, accel);
      }
      if (g.json) json({ vmm: o.vmm, argv, image: boot.image.manifestDigest });
      else out(shellCommand(argv));
    });
}

export function bootCommand(): Command {
  return vmOptions(
    new Command("boot").description(
      "boot an image in QEMU with kiln's init, stream the console and exit with the program's status",
    ),
  )
    .addOption(
      new Option("--accel <accel>", "accelerator (auto: KVM when it works here, else TCG)")
        .choices(["auto", "kvm", "tcg"])
        .default("auto"),
    )
    .action(async (ref: string, args: string[], o, cmd: Command) => {
      const g = globals(cmd);
      const { qemuArgs, archOf, shellCommand } = await vmm();
      const { detectAccel, findQemu, runQemu } = await import("../boot/qemu.js");
      await checkKernel(o.kernel);
      // Before any work: QEMU for this machine's architecture (images are normally the host's).
      const hostArch = process.arch === "arm64" ? "aarch64" : "x86_64";
      await findQemu(hostArch);
      const dir = await mkdtemp(join(tmpdir(), "kiln-boot-"));
      try {
        const { plan, boot } = await prepare(ref, args, o, { vmm: "qemu", root: g.root, dir });
        const arch = archOf(boot.runtime.architecture);
        const binary = await findQemu(arch);
        const accel = o.accel === "auto" ? await detectAccel(arch, binary) : o.accel;
        const argv = qemuArgs(plan.spec, accel);
        if (g.verbose) process.stderr.write(`kiln: running ${shellCommand(argv)}\n`);
        const ac = abortOnSignal();
        const r = await runQemu(argv, { out: process.stdout, err: process.stderr, signal: ac.signal });
        if (r.guestStatus !== undefined) {
          process.exitCode = r.guestStatus;
          return;
        }
        if (r.guestError) throw new KilnError("INTERNAL", `kiln's init in the guest: ${r.guestError}`);
        if (r.initramfsFull) {
          const initrdBytes = plan.spec.initrd ? (await stat(plan.spec.initrd)).size : 0;
          throw new KilnError(
            "TOO_LARGE",
            `not enough guest memory for the initramfs (${plan.spec.memoryMiB} MiB for a ${formatBytes(initrdBytes)} initrd); use --memory`,
          );
        }
        if (r.outOfMemory) {
          throw new KilnError(
            "TOO_LARGE",
            `the guest ran out of memory (${plan.spec.memoryMiB} MiB; see the console above); use --memory`,
          );
        }
        if (r.panicked) throw new KilnError("INTERNAL", "the guest kernel panicked (see the console above)");
        if (r.qemuCode !== 0) throw new KilnError("INTERNAL", `${argv[0]} exited with status ${r.qemuCode}`);
        // An init system powers the VM off itself and reports no status.
        if (!boot.runtime.systemd) {
          throw new KilnError(
            "INTERNAL",
            "the guest stopped without reporting an exit status (see the console above)",
          );
        }
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    });
}
