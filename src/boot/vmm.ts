/**
 * VM configs for kiln's outputs: one plan (kernel, initrd, disks in order, kernel command line,
 * memory, vCPUs), then the same plan as Firecracker's JSON config file, Cloud Hypervisor's command
 * line or QEMU's command line. `kiln boot` runs exactly the QEMU argv built here.
 *
 * Disk order (virtio names follow it: vda, vdb, …): the root (ext4, erofs) or the layer images
 * bottom layer first (erofs-layers), then the writable upper disk if any, then the config disk
 * when the config does not fit on the command line. The cpio format has no disk: the image's
 * archive is part of the initrd.
 */
import { KilnError } from "../errors.js";
import { CMDLINE_BUDGET, type GuestConfig, kernelCmdline, type RootKind } from "./cmdline.js";

export type Vmm = "firecracker" | "cloud-hypervisor" | "qemu";
export const VMMS: readonly Vmm[] = ["firecracker", "cloud-hypervisor", "qemu"];

export type Arch = "x86_64" | "aarch64";
export type Accel = "kvm" | "tcg";

export interface VmDisk {
  /** Firecracker's drive_id; also says what the disk is. */
  id: string;
  path: string;
  readOnly: boolean;
}

export interface VmSpec {
  arch: Arch;
  kernel: string;
  initrd: string | undefined;
  cmdline: string;
  disks: VmDisk[];
  memoryMiB: number;
  cpus: number;
}

export interface VmPlanOptions {
  vmm: Vmm;
  arch: Arch;
  kernel: string;
  initrd: string | undefined;
  root: RootKind;
  /** ext4/erofs: the root image; erofs-layers: the layer images, bottom first; initramfs: none. */
  rootDisks: string[];
  /** erofs-layers: an ext4 disk for the overlay's upper layer (read-write). */
  upper?: string | undefined;
  /** ext4: the root read-write. */
  rw?: boolean | undefined;
  config: GuestConfig;
  memoryMiB: number;
  cpus: number;
  /** Extra kernel command line words. */
  append?: string[] | undefined;
  /** Where the config disk goes if one is needed (the caller writes `configDisk` there). */
  configDiskPath?: string | undefined;
}

export interface VmPlan {
  spec: VmSpec;
  /** A config disk to write at configDiskPath before the VM starts. */
  configDisk: { path: string; bytes: Buffer } | undefined;
}

/** Guest memory when the user gives none and the root needs no more. */
export const DEFAULT_MEMORY_MIB = 512;
/** The kernel, kiln's own initramfs unpacked, and the small files' page rounding in the tmpfs. */
const INITRAMFS_OVERHEAD_MIB = 128;
const MiB = 2 ** 20;

/**
 * Guest memory for a root when the user gives none. An initramfs root is unpacked into a tmpfs
 * that may fill only half of the memory left beside the kernel and the archive itself (held until
 * it is unpacked): so three times the initrd, plus the kernel's own, in 64 MiB steps.
 */
export function guestMemoryMiB(root: RootKind, initrdBytes: number): number {
  if (root !== "initramfs") return DEFAULT_MEMORY_MIB;
  const need = Math.ceil((3 * initrdBytes) / MiB) + INITRAMFS_OVERHEAD_MIB;
  return Math.max(DEFAULT_MEMORY_MIB, Math.ceil(need / 64) * 64);
}

/** The architecture of an image platform's CPU, as kernels and QEMU name it. */
export function archOf(architecture: string): Arch {
  if (architecture === "amd64" || architecture === "x86_64") return "x86_64";
  if (architecture === "arm64" || architecture === "aarch64") return "aarch64";
  throw new KilnError("INVALID_ARGUMENT", `booting ${architecture} images is not supported (amd64, arm64)`);
}

/** The VMM's own kernel command line words. */
function baseCmdline(vmm: Vmm, arch: Arch): string[] {
  const console = arch === "aarch64" && vmm !== "firecracker" ? "console=ttyAMA0" : "console=ttyS0";
  // Firecracker stops the VM when the guest resets (reboot=k: through the keyboard controller).
  if (vmm === "firecracker") return [console, "reboot=k", "panic=1", "pci=off", "quiet"];
  // Cloud Hypervisor restarts a VM that resets: a panic must not loop, it stops there.
  if (vmm === "cloud-hypervisor") return [console, "quiet"];
  // panic=-1: a dead init resets the VM at once, and QEMU (-no-reboot) exits.
  return [console, "panic=-1", "quiet"];
}

export function planVm(opts: VmPlanOptions): VmPlan {
  if (!Number.isInteger(opts.memoryMiB) || opts.memoryMiB < 64) {
    throw new KilnError("INVALID_ARGUMENT", `memory: ${opts.memoryMiB} MiB is too little (at least 64)`);
  }
  if (!Number.isInteger(opts.cpus) || opts.cpus < 1) {
    throw new KilnError("INVALID_ARGUMENT", `cpus: ${opts.cpus} is not a positive number`);
  }
  const disks: VmDisk[] = [];
  switch (opts.root) {
    case "ext4":
    case "erofs":
      if (opts.rootDisks.length !== 1)
        throw new KilnError("INTERNAL", `${opts.root}: expected one root disk`);
      disks.push({ id: "root", path: opts.rootDisks[0]!, readOnly: !(opts.root === "ext4" && opts.rw) });
      break;
    case "erofs-layers":
      for (const [i, path] of opts.rootDisks.entries()) disks.push({ id: `layer${i}`, path, readOnly: true });
      if (opts.upper) disks.push({ id: "upper", path: opts.upper, readOnly: false });
      break;
    case "initramfs":
      if (!opts.initrd)
        throw new KilnError("INVALID_ARGUMENT", "the cpio format boots from the initrd: give one");
      break;
  }
  if (opts.upper && opts.root !== "erofs-layers") {
    throw new KilnError("INVALID_ARGUMENT", "an upper disk applies to --format erofs-layers only");
  }
  const line = kernelCmdline({
    root: opts.root,
    layers: opts.root === "erofs-layers" ? opts.rootDisks.length : undefined,
    upper: opts.upper !== undefined,
    rw: opts.rw,
    halt: opts.vmm === "firecracker" ? "reboot" : "poweroff",
    base: baseCmdline(opts.vmm, opts.arch),
    extra: opts.append,
    // Firecracker adds a `virtio_mmio.device=SIZE@ADDR:IRQ` word per drive (the config disk's too).
    budget: opts.vmm === "firecracker" ? CMDLINE_BUDGET - 40 * (disks.length + 1) : CMDLINE_BUDGET,
    config: opts.config,
  });
  let configDisk: VmPlan["configDisk"];
  if (line.configDisk) {
    if (!opts.configDiskPath) {
      throw new KilnError(
        "TOO_LARGE",
        "the image's config is too long for the kernel command line and needs a config disk: give an output directory (--output-dir)",
      );
    }
    configDisk = { path: opts.configDiskPath, bytes: line.configDisk };
    disks.push({ id: "config", path: opts.configDiskPath, readOnly: true });
  }
  return {
    spec: {
      arch: opts.arch,
      kernel: opts.kernel,
      initrd: opts.initrd,
      cmdline: line.cmdline,
      disks,
      memoryMiB: opts.memoryMiB,
      cpus: opts.cpus,
    },
    configDisk,
  };
}

/** Firecracker's `--config-file` JSON. No drive is the "root device": kiln's init mounts the root. */
export function firecrackerConfig(spec: VmSpec): Record<string, unknown> {
  const bootSource: Record<string, unknown> = {
    kernel_image_path: spec.kernel,
    boot_args: spec.cmdline,
  };
  if (spec.initrd) bootSource.initrd_path = spec.initrd;
  return {
    "boot-source": bootSource,
    drives: spec.disks.map((d) => ({
      drive_id: d.id,
      path_on_host: d.path,
      is_root_device: false,
      is_read_only: d.readOnly,
    })),
    "machine-config": { vcpu_count: spec.cpus, mem_size_mib: spec.memoryMiB },
  };
}

/** `cloud-hypervisor …`: the console on the serial port, the virtio console off. */
export function cloudHypervisorArgs(spec: VmSpec): string[] {
  const argv = ["cloud-hypervisor", "--kernel", spec.kernel];
  if (spec.initrd) argv.push("--initramfs", spec.initrd);
  argv.push("--cmdline", spec.cmdline);
  if (spec.disks.length > 0) {
    argv.push("--disk");
    for (const d of spec.disks) {
      // Cloud Hypervisor splits the value at commas and has no escape for them.
      if (d.path.includes(",")) {
        throw new KilnError(
          "INVALID_ARGUMENT",
          `cloud-hypervisor cannot take a disk path with a comma: ${d.path}`,
        );
      }
      argv.push(`path=${d.path}${d.readOnly ? ",readonly=on" : ""}`);
    }
  }
  argv.push(
    "--memory",
    `size=${spec.memoryMiB}M`,
    "--cpus",
    `boot=${spec.cpus}`,
    "--serial",
    "tty",
    "--console",
    "off",
  );
  return argv;
}

/** QEMU's program for an architecture. */
export function qemuBinary(arch: Arch): string {
  return arch === "x86_64" ? "qemu-system-x86_64" : "qemu-system-aarch64";
}

/** QEMU's machine and CPU flags for an accelerator (shared with the KVM probe). */
export function qemuMachineArgs(arch: Arch, accel: Accel): string[] {
  const machine = arch === "x86_64" ? ["-M", "pc"] : ["-M", "virt"];
  const cpu = accel === "kvm" ? ["-cpu", "host"] : arch === "aarch64" ? ["-cpu", "max"] : [];
  return [...machine, "-accel", accel, ...cpu];
}

/** QEMU option values double their commas. */
function qemuEscape(value: string): string {
  return value.replaceAll(",", ",,");
}

/**
 * `qemu-system-… …`: no default devices, the serial console on stdio, `-no-reboot` so a guest reset
 * (or panic) ends QEMU, the disks as virtio block devices in order.
 */
export function qemuArgs(spec: VmSpec, accel: Accel): string[] {
  const argv = [
    qemuBinary(spec.arch),
    ...qemuMachineArgs(spec.arch, accel),
    "-m",
    String(spec.memoryMiB),
    "-smp",
    String(spec.cpus),
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-serial",
    "stdio",
    "-no-reboot",
    "-kernel",
    spec.kernel,
  ];
  if (spec.initrd) argv.push("-initrd", spec.initrd);
  argv.push("-append", spec.cmdline);
  for (const d of spec.disks) {
    argv.push("-drive", `file=${qemuEscape(d.path)},format=raw,if=virtio${d.readOnly ? ",readonly=on" : ""}`);
  }
  return argv;
}

/** One shell word per argument, quoted only where needed: a command line to copy and run. */
export function shellCommand(argv: readonly string[]): string {
  return argv
    .map((a) => (/^[A-Za-z0-9_@%+=:,./-]+$/.test(a) ? a : `'${a.replaceAll("'", `'\\''`)}'`))
    .join(" ");
}
