/**
 * Real image archives for the source tests, made here without the internet: umoci builds an OCI
 * layout from hand-made layer tars (GNU tar), skopeo writes docker-archive and oci-archive tars from
 * it, and node edits copies into the other layouts and the broken variants.
 */
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { chmodSync, copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { scanTar } from "../../src/tar/scan.js";

export function run(cmd: string, args: string[], cwd?: string): string {
  return execFileSync(cmd, args, { cwd, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

export function sha256(bytes: Buffer | string): string {
  return `sha256:${createHash("sha256").update(bytes).digest("hex")}`;
}

export function skopeo(...args: string[]): string {
  return run("skopeo", ["--insecure-policy", ...args]);
}

/** Writes a tar of `dir`'s contents (GNU tar, members named `./…`). */
export function packDir(dir: string, out: string): string {
  run("tar", ["-cf", out, "-C", dir, "."]);
  return out;
}

export function unpack(tarPath: string, dir: string): string {
  mkdirSync(dir, { recursive: true });
  run("tar", ["-xf", tarPath, "-C", dir]);
  return dir;
}

/** Flips one byte inside a member's data, in a copy of the archive. */
export async function flipByteInMember(
  tarPath: string,
  member: string,
  out: string,
  at = 10,
): Promise<string> {
  const index = await scanTar(tarPath);
  const e = index.get(member);
  if (!e) throw new Error(`no member ${member} in ${tarPath}`);
  const bytes = readFileSync(tarPath);
  bytes[e.offset + Math.min(at, e.size - 1)]! ^= 0xff;
  writeFileSync(out, bytes);
  return out;
}

export interface BaseImages {
  /** OCI layout with `t` (busybox + files, 2 layers) and `small` (one tiny layer, arm64). */
  readonly layout: string;
  /** The hand-made layer tars (GNU tar): `t`'s two, then `small`'s. */
  readonly layerTars: string[];
}

/** Builds the OCI layout every source test starts from. */
export function buildBaseImages(dir: string): BaseImages {
  const layout = join(dir, "layout");
  const root1 = join(dir, "root1");
  mkdirSync(join(root1, "bin"), { recursive: true });
  mkdirSync(join(root1, "etc"), { recursive: true });
  copyFileSync("/bin/busybox", join(root1, "bin", "busybox"));
  chmodSync(join(root1, "bin", "busybox"), 0o755);
  writeFileSync(join(root1, "etc", "hello"), "hello from layer 1\n");
  const root2 = join(dir, "root2");
  mkdirSync(join(root2, "etc"), { recursive: true });
  writeFileSync(join(root2, "etc", "hello"), "replaced by layer 2\n");
  writeFileSync(join(root2, "etc", ".wh.gone"), "");
  const root3 = join(dir, "root3");
  mkdirSync(root3, { recursive: true });
  writeFileSync(join(root3, "small"), "the small image\n");

  const tars = [root1, root2, root3].map((root, i) => {
    const out = join(dir, `layer${i + 1}.tar`);
    run("tar", ["--format=pax", "--numeric-owner", "--owner=0", "--group=0", "-cf", out, "-C", root, "."]);
    return out;
  });
  run("umoci", ["init", "--layout", layout]);
  run("umoci", ["new", "--image", `${layout}:t`]);
  run("umoci", ["raw", "add-layer", "--image", `${layout}:t`, tars[0]!]);
  run("umoci", ["raw", "add-layer", "--image", `${layout}:t`, tars[1]!]);
  run("umoci", ["new", "--image", `${layout}:small`]);
  run("umoci", ["config", "--image", `${layout}:small`, "--architecture", "arm64", "--config.cmd", "/small"]);
  run("umoci", ["raw", "add-layer", "--image", `${layout}:small`, tars[2]!]);
  return { layout, layerTars: tars };
}

/** What skopeo says about an image: its raw manifest and config bytes. */
export function skopeoInspect(transportRef: string): { manifest: Buffer; config: Buffer } {
  return {
    manifest: Buffer.from(skopeo("inspect", "--raw", transportRef)),
    config: Buffer.from(skopeo("inspect", "--config", "--raw", transportRef)),
  };
}

/** Collects a stream into one buffer (tests only: small blobs). */
export async function collect(stream: AsyncIterable<Buffer>): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(c);
  return Buffer.concat(chunks);
}
