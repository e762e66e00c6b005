/**
 * Running QEMU for `kiln boot`: finding it, choosing KVM or TCG, streaming the guest console and
 * reading the exit status kiln's init prints (`kiln: exit status N`).
 */
import { spawn } from "node:child_process";
import { constants } from "node:fs";
import { access, open } from "node:fs/promises";
import { delimiter, join } from "node:path";
import { KilnError } from "../errors.js";
import { type Accel, type Arch, qemuBinary, qemuMachineArgs } from "./vmm.js";

const APT_PACKAGE: Record<Arch, string> = { x86_64: "qemu-system-x86", aarch64: "qemu-system-arm" };

/** The QEMU binary for `arch` on PATH, or one clear error saying what to install. */
export async function findQemu(arch: Arch, path = process.env.PATH ?? ""): Promise<string> {
  const name = qemuBinary(arch);
  for (const dir of path.split(delimiter).filter(Boolean)) {
    const candidate = join(dir, name);
    try {
      await access(candidate, constants.X_OK);
      return candidate;
    } catch {
      // next
    }
  }
  throw new KilnError("NOT_FOUND", `${name} is not installed (apt-get install ${APT_PACKAGE[arch]})`);
}

/**
 * KVM when /dev/kvm opens and QEMU can start a VM on it with `-cpu host`, else TCG. The check starts
 * QEMU paused with a QMP monitor on stdio and asks it to quit: QEMU sets up the vCPU before it
 * greets, so a KVM that cannot run this CPU (some nested or sandboxed hosts) fails here, not in
 * the middle of a boot. No timing is involved; a probe that never answers counts as "no".
 */
export async function detectAccel(arch: Arch, binary: string): Promise<Accel> {
  try {
    const fh = await open("/dev/kvm", "r+");
    await fh.close();
  } catch {
    return "tcg";
  }
  const argv = [...qemuMachineArgs(arch, "kvm"), "-nodefaults", "-no-user-config", "-display", "none", "-S"];
  return new Promise((resolve) => {
    const child = spawn(binary, [...argv, "-qmp", "stdio"], { stdio: ["pipe", "pipe", "ignore"] });
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    child.stdout.resume();
    child.stdin.on("error", () => {});
    child.stdin.end('{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n');
    child.on("error", () => {
      clearTimeout(timer);
      resolve("tcg");
    });
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve(code === 0 ? "kvm" : "tcg");
    });
  });
}

export interface QemuResult {
  /** QEMU's own exit code (null if it died of a signal). */
  qemuCode: number | null;
  /** The status kiln's init printed, the last one if several. */
  guestStatus: number | undefined;
  /** The guest kernel panicked. */
  panicked: boolean;
  /** What kiln's init said when it could not run the program (`kiln: error: …`), the last one. */
  guestError: string | undefined;
  /** The kernel could not unpack the initrd: the rootfs tmpfs (half the memory) was full. */
  initramfsFull: boolean;
  /** The kernel panicked for want of memory (at boot: unpacking a large initrd can do it). */
  outOfMemory: boolean;
}

const MARKER = /^kiln: exit status (\d+)$/;
const INIT_ERROR = /^kiln: error: (.*)$/;
const PANIC = /Kernel panic - not syncing/;
const INITRAMFS_FULL = /Initramfs unpacking failed: write error/;
const OUT_OF_MEMORY = /Kernel panic - not syncing: (System is deadlocked on memory|Out of memory)/;

/**
 * Runs `argv` (from qemuArgs), passing the guest console to `out` with the serial line's CRLF as
 * LF, and QEMU's own messages to `err`. Resolves when QEMU exits.
 */
export async function runQemu(
  argv: readonly string[],
  io: { out: NodeJS.WritableStream; err: NodeJS.WritableStream; signal?: AbortSignal | undefined },
): Promise<QemuResult> {
  const child = spawn(argv[0]!, argv.slice(1), {
    stdio: [process.stdin.isTTY ? "inherit" : "ignore", "pipe", "pipe"],
    signal: io.signal,
  });
  let guestStatus: number | undefined;
  let panicked = false;
  let initramfsFull = false;
  let outOfMemory = false;
  let guestError: string | undefined;
  let line = "";
  let pendingCr = false;
  const scan = (text: string) => {
    line += text;
    let nl = line.indexOf("\n");
    while (nl >= 0) {
      const l = line.slice(0, nl).replace(/\r+$/, "");
      const m = MARKER.exec(l);
      if (m) guestStatus = Number(m[1]);
      if (PANIC.test(l)) panicked = true;
      if (INITRAMFS_FULL.test(l)) initramfsFull = true;
      if (OUT_OF_MEMORY.test(l)) outOfMemory = true;
      const e = INIT_ERROR.exec(l);
      if (e) guestError = e[1];
      line = line.slice(nl + 1);
      nl = line.indexOf("\n");
    }
    // Keep a bounded tail: a guest that never prints a newline must not grow memory.
    if (line.length > 65536) line = line.slice(-4096);
  };
  child.stdout.setEncoding("latin1");
  child.stdout.on("data", (chunk: string) => {
    scan(chunk);
    // CRLF → LF, across chunk boundaries.
    let text = pendingCr ? `\r${chunk}` : chunk;
    pendingCr = text.endsWith("\r");
    if (pendingCr) text = text.slice(0, -1);
    io.out.write(Buffer.from(text.replaceAll("\r\n", "\n"), "latin1"));
  });
  child.stderr.on("data", (chunk: Buffer) => io.err.write(chunk));
  const code = await new Promise<number | null>((resolve, reject) => {
    child.on("error", (err) => {
      if (io.signal?.aborted) reject(io.signal.reason);
      else if ((err as NodeJS.ErrnoException).code === "ENOENT") {
        reject(new KilnError("NOT_FOUND", `${argv[0]} is not installed (apt-get install qemu-system-x86)`));
      } else reject(err);
    });
    child.on("close", (c) => resolve(c));
  });
  if (pendingCr) io.out.write("\r");
  scan("\n");
  return { qemuCode: code, guestStatus, panicked, guestError, initramfsFull, outOfMemory };
}
