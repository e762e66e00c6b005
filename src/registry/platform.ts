import { KilnError } from "../errors.js";

/** An OCI platform: `linux/amd64`, `linux/arm64/v8`, `linux/arm/v7`. */
export interface Platform {
  readonly os: string;
  readonly architecture: string;
  readonly variant?: string | undefined;
}

const ARCH_ALIASES: Record<string, string> = {
  x86_64: "amd64",
  "x86-64": "amd64",
  aarch64: "arm64",
  armhf: "arm",
  armel: "arm",
  i386: "386",
  i686: "386",
};

/** Normalizes as containerd does: x86_64→amd64, aarch64→arm64, arm64's default variant is v8. */
export function normalizePlatform(p: {
  os: string;
  architecture: string;
  variant?: string | undefined;
}): Platform {
  const os = p.os.toLowerCase();
  let architecture = p.architecture.toLowerCase();
  let variant = p.variant?.toLowerCase() || undefined;
  if (p.architecture.toLowerCase() === "armhf" && variant === undefined) variant = "v7";
  if (p.architecture.toLowerCase() === "armel" && variant === undefined) variant = "v6";
  architecture = ARCH_ALIASES[architecture] ?? architecture;
  if (architecture === "arm64" && variant === undefined) variant = "v8";
  if (architecture === "arm" && variant === undefined) variant = "v7";
  if (architecture === "amd64" && variant === "v1") variant = undefined;
  return variant === undefined ? { os, architecture } : { os, architecture, variant };
}

/** Parses `os/arch[/variant]` (or `arch` alone, meaning linux). */
const KNOWN_OS = new Set([
  "linux",
  "windows",
  "darwin",
  "freebsd",
  "netbsd",
  "openbsd",
  "solaris",
  "illumos",
  "aix",
]);
const KNOWN_ARCH = new Set([
  "amd64",
  "arm64",
  "arm",
  "386",
  "ppc64le",
  "ppc64",
  "s390x",
  "riscv64",
  "mips64le",
  "mips64",
  "mipsle",
  "mips",
  "loong64",
  "wasm",
]);

export function parsePlatform(text: string): Platform {
  const parts = text.trim().split("/");
  if (parts.some((p) => p === "" || !/^[A-Za-z0-9_.-]+$/.test(p)) || parts.length > 3) {
    throw new KilnError("INVALID_PLATFORM", `invalid platform "${text}": expected os/arch[/variant]`);
  }
  if (parts.length === 1) {
    // One word, as containerd reads it: an OS (with the host's architecture) or an architecture (on linux).
    const word = parts[0]!.toLowerCase();
    if (KNOWN_OS.has(word)) return normalizePlatform({ os: word, architecture: hostPlatform().architecture });
    const arch = normalizePlatform({ os: "linux", architecture: word });
    if (KNOWN_ARCH.has(arch.architecture)) return arch;
    throw new KilnError("INVALID_PLATFORM", `invalid platform "${text}": not a known OS or architecture`);
  }
  return normalizePlatform({ os: parts[0]!, architecture: parts[1]!, variant: parts[2] });
}

export function formatPlatform(p: Platform): string {
  return p.variant ? `${p.os}/${p.architecture}/${p.variant}` : `${p.os}/${p.architecture}`;
}

/** The platform this process runs on, as OCI names it. */
export function hostPlatform(): Platform {
  return normalizePlatform({
    os: process.platform === "darwin" ? "linux" : process.platform,
    architecture: process.arch === "x64" ? "amd64" : process.arch === "ia32" ? "386" : process.arch,
  });
}

/**
 * Whether an image's platform satisfies what was asked. A request without a variant accepts any
 * variant only when the image names none or the default one, as containerd's matcher does.
 */
export function platformMatches(want: Platform, have: Platform): boolean {
  const w = normalizePlatform(want);
  const h = normalizePlatform(have);
  if (w.os !== h.os || w.architecture !== h.architecture) return false;
  if (w.variant === undefined || h.variant === undefined) return true;
  return w.variant === h.variant;
}
