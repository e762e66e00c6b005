/** What the docker-archive and OCI readers share: one image of an archive, before it is named. */
import { createHash } from "node:crypto";
import type { Readable } from "node:stream";
import { isKilnError, KilnError } from "../errors.js";
import type { ImageRef } from "../reference/reference.js";
import { parseReference } from "../reference/reference.js";
import type { Descriptor, ImageConfig } from "../registry/manifest.js";
import { formatPlatform, normalizePlatform, type Platform, platformMatches } from "../registry/platform.js";
import type { OpenBlobOptions, ResolvedImage } from "./types.js";

/** Largest index, manifest, config or manifest.json read into memory. */
export const MAX_DOCUMENT_SIZE = 16 * 1024 * 1024;

export interface ResolveOptions {
  readonly platform?: Platform | undefined;
  readonly signal?: AbortSignal | undefined;
}

export interface ArchiveImage {
  /** Identity inside the archive: entries with the same id are one image under several names. */
  readonly id: string;
  /** For messages: `index.json entry 2 (sha256:…)`, `manifest.json entry 1`. */
  readonly label: string;
  /** Full names the archive gives it (RepoTags, `io.containerd.image.name`, a full ref.name). */
  readonly names: readonly ImageRef[];
  /** Bare tags (`1.0`, `latest`) from ref.name annotations, which name no repository. */
  readonly tags: readonly string[];
  resolve(opts: ResolveOptions): Promise<Omit<ResolvedImage, "ref">>;
  openBlob(desc: Descriptor, opts?: OpenBlobOptions): Promise<Readable>;
}

export function sha256Hex(bytes: Buffer): string {
  return createHash("sha256").update(bytes).digest("hex");
}

/** Bytes must hash to the digest that names them → else INVALID_ARCHIVE naming `what`. */
export function checkDigest(bytes: Buffer, digest: string, what: string): void {
  const colon = digest.indexOf(":");
  const algorithm = digest.slice(0, colon);
  const actual = `${algorithm}:${createHash(algorithm).update(bytes).digest("hex")}`;
  if (actual !== digest) {
    throw new KilnError(
      "INVALID_ARCHIVE",
      `${what} does not match its digest ${digest} (content hashes to ${actual})`,
      {
        details: { expected: digest, actual },
      },
    );
  }
}

/** The platform an image config declares; one without os or architecture → INVALID_ARCHIVE. */
export function configPlatform(config: ImageConfig, what: string): Platform {
  if (
    typeof config.os !== "string" ||
    typeof config.architecture !== "string" ||
    !config.os ||
    !config.architecture
  ) {
    throw new KilnError("INVALID_ARCHIVE", `${what}: image config names no os/architecture`);
  }
  return normalizePlatform({
    os: config.os,
    architecture: config.architecture,
    variant: typeof config.variant === "string" ? config.variant : undefined,
  });
}

/** A single-platform image is accepted when no platform is asked, refused when another one is. */
export function checkPlatform(asked: Platform | undefined, have: Platform, what: string): void {
  if (asked !== undefined && !platformMatches(asked, have)) {
    throw new KilnError(
      "PLATFORM_MISMATCH",
      `${what} is ${formatPlatform(have)}, not ${formatPlatform(normalizePlatform(asked))} as asked`,
      { details: { wanted: formatPlatform(normalizePlatform(asked)), available: [formatPlatform(have)] } },
    );
  }
}

/**
 * A name from an archive (RepoTag, annotation) as a full reference; undefined when it does not
 * parse (the image stays importable, untagged or with --tag).
 */
export function parseArchiveName(text: string): ImageRef | undefined {
  try {
    const ref = parseReference(text);
    return ref.digest === undefined ? ref : undefined;
  } catch (err) {
    if (isKilnError(err, "INVALID_REFERENCE")) return undefined;
    throw err;
  }
}

/** Rewraps a parse error of an archive document as INVALID_ARCHIVE naming where it is. */
export function archiveError(where: string, err: unknown): unknown {
  if (isKilnError(err, "INVALID_MANIFEST") || isKilnError(err, "INVALID_ARCHIVE")) {
    return new KilnError("INVALID_ARCHIVE", `${where}: ${err.message}`, { cause: err, details: err.details });
  }
  return err;
}
