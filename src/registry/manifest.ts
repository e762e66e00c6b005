import { KilnError } from "../errors.js";
import { parseDigest } from "../reference/digest.js";
import { formatPlatform, normalizePlatform, type Platform, platformMatches } from "./platform.js";

export const MediaType = {
  OCI_INDEX: "application/vnd.oci.image.index.v1+json",
  OCI_MANIFEST: "application/vnd.oci.image.manifest.v1+json",
  OCI_CONFIG: "application/vnd.oci.image.config.v1+json",
  OCI_LAYER: "application/vnd.oci.image.layer.v1.tar",
  OCI_LAYER_GZIP: "application/vnd.oci.image.layer.v1.tar+gzip",
  OCI_LAYER_ZSTD: "application/vnd.oci.image.layer.v1.tar+zstd",
  OCI_LAYER_ND: "application/vnd.oci.image.layer.nondistributable.v1.tar",
  OCI_LAYER_ND_GZIP: "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
  OCI_LAYER_ND_ZSTD: "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
  DOCKER_LIST: "application/vnd.docker.distribution.manifest.list.v2+json",
  DOCKER_MANIFEST: "application/vnd.docker.distribution.manifest.v2+json",
  DOCKER_CONFIG: "application/vnd.docker.container.image.v1+json",
  DOCKER_LAYER: "application/vnd.docker.image.rootfs.diff.tar",
  DOCKER_LAYER_GZIP: "application/vnd.docker.image.rootfs.diff.tar.gzip",
  DOCKER_LAYER_ZSTD: "application/vnd.docker.image.rootfs.diff.tar.zstd",
  DOCKER_LAYER_FOREIGN: "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
  DOCKER_SCHEMA1: "application/vnd.docker.distribution.manifest.v1+json",
  DOCKER_SCHEMA1_SIGNED: "application/vnd.docker.distribution.manifest.v1+prettyjws",
} as const;

/** What kiln asks a registry for, best first. Schema 1 is deliberately absent. */
export const MANIFEST_ACCEPT = [
  MediaType.OCI_INDEX,
  MediaType.DOCKER_LIST,
  MediaType.OCI_MANIFEST,
  MediaType.DOCKER_MANIFEST,
];

export type Compression = "gzip" | "zstd" | "none";

const LAYER_COMPRESSION: Record<string, Compression> = {
  [MediaType.OCI_LAYER]: "none",
  [MediaType.OCI_LAYER_GZIP]: "gzip",
  [MediaType.OCI_LAYER_ZSTD]: "zstd",
  [MediaType.OCI_LAYER_ND]: "none",
  [MediaType.OCI_LAYER_ND_GZIP]: "gzip",
  [MediaType.OCI_LAYER_ND_ZSTD]: "zstd",
  [MediaType.DOCKER_LAYER]: "none",
  [MediaType.DOCKER_LAYER_GZIP]: "gzip",
  [MediaType.DOCKER_LAYER_ZSTD]: "zstd",
  [MediaType.DOCKER_LAYER_FOREIGN]: "gzip",
};

/** The compression a layer media type declares; unknown types → UNSUPPORTED_MEDIA_TYPE. */
export function layerCompression(mediaType: string): Compression {
  const c = LAYER_COMPRESSION[mediaType];
  if (c === undefined) {
    throw new KilnError("UNSUPPORTED_MEDIA_TYPE", `unsupported layer media type "${mediaType}"`);
  }
  return c;
}

export function isNonDistributable(mediaType: string): boolean {
  return mediaType.includes("nondistributable") || mediaType === MediaType.DOCKER_LAYER_FOREIGN;
}

export interface Descriptor {
  readonly mediaType: string;
  readonly digest: string;
  readonly size: number;
  readonly urls?: string[] | undefined;
  readonly annotations?: Record<string, string> | undefined;
  readonly platform?: Platform | undefined;
  readonly artifactType?: string | undefined;
}

export interface ImageIndex {
  readonly kind: "index";
  readonly mediaType: string;
  readonly manifests: Descriptor[];
  readonly annotations?: Record<string, string> | undefined;
}

export interface ImageManifest {
  readonly kind: "manifest";
  readonly mediaType: string;
  readonly config: Descriptor;
  readonly layers: Descriptor[];
  readonly annotations?: Record<string, string> | undefined;
}

/** The parts of an image config kiln reads (OCI image-spec config, Docker v1 image JSON). */
export interface ImageConfig {
  readonly architecture?: string;
  readonly os?: string;
  readonly variant?: string;
  readonly created?: string;
  readonly config?: {
    Entrypoint?: string[] | null;
    Cmd?: string[] | null;
    Env?: string[] | null;
    WorkingDir?: string;
    User?: string;
    Labels?: Record<string, string> | null;
    StopSignal?: string;
    ExposedPorts?: Record<string, unknown> | null;
    Volumes?: Record<string, unknown> | null;
  };
  readonly rootfs?: { type?: string; diff_ids?: string[] };
}

function bad(what: string, why: string): KilnError {
  return new KilnError("INVALID_MANIFEST", `invalid ${what}: ${why}`);
}

function parseDescriptor(raw: unknown, what: string): Descriptor {
  if (typeof raw !== "object" || raw === null) throw bad(what, "descriptor is not an object");
  const d = raw as Record<string, unknown>;
  if (typeof d.mediaType !== "string") throw bad(what, "descriptor without mediaType");
  if (typeof d.digest !== "string") throw bad(what, "descriptor without digest");
  try {
    parseDigest(d.digest);
  } catch {
    throw bad(what, `bad digest "${d.digest}"`);
  }
  if (typeof d.size !== "number" || !Number.isSafeInteger(d.size) || d.size < 0) {
    throw bad(what, `bad size for ${d.digest}`);
  }
  let platform: Platform | undefined;
  if (d.platform && typeof d.platform === "object") {
    const p = d.platform as Record<string, unknown>;
    if (typeof p.os === "string" && typeof p.architecture === "string") {
      platform = normalizePlatform({
        os: p.os,
        architecture: p.architecture,
        variant: typeof p.variant === "string" ? p.variant : undefined,
      });
    }
  }
  return {
    mediaType: d.mediaType,
    digest: d.digest,
    size: d.size,
    urls: Array.isArray(d.urls) ? d.urls.filter((u): u is string => typeof u === "string") : undefined,
    annotations: (d.annotations as Record<string, string> | undefined) ?? undefined,
    platform,
    artifactType: typeof d.artifactType === "string" ? d.artifactType : undefined,
  };
}

/**
 * Parses manifest bytes. The media type comes from the response (or the referring descriptor) and
 * falls back to the document's own `mediaType`, then to its shape, as registries are not consistent.
 */
export function parseManifest(bytes: Buffer, declaredMediaType?: string): ImageIndex | ImageManifest {
  let doc: Record<string, unknown>;
  try {
    doc = JSON.parse(bytes.toString("utf8"));
  } catch {
    throw bad("manifest", "not JSON");
  }
  if (typeof doc !== "object" || doc === null) throw bad("manifest", "not a JSON object");
  const declared = declaredMediaType?.split(";")[0]?.trim();
  let mediaType =
    (typeof doc.mediaType === "string" && doc.mediaType) ||
    (declared && declared !== "application/json" && declared !== "text/plain" ? declared : "");
  if (
    doc.schemaVersion === 1 ||
    mediaType === MediaType.DOCKER_SCHEMA1 ||
    mediaType === MediaType.DOCKER_SCHEMA1_SIGNED
  ) {
    throw new KilnError(
      "UNSUPPORTED_MEDIA_TYPE",
      "Docker image manifest schema 1 is not supported (deprecated since 2017): push the image again with a current client",
    );
  }
  if (!mediaType) mediaType = Array.isArray(doc.manifests) ? MediaType.OCI_INDEX : MediaType.OCI_MANIFEST;
  if (mediaType === MediaType.OCI_INDEX || mediaType === MediaType.DOCKER_LIST) {
    if (!Array.isArray(doc.manifests)) throw bad("index", "no manifests list");
    return {
      kind: "index",
      mediaType,
      manifests: doc.manifests.map((m) => parseDescriptor(m, "index")),
      annotations: doc.annotations as Record<string, string> | undefined,
    };
  }
  if (mediaType === MediaType.OCI_MANIFEST || mediaType === MediaType.DOCKER_MANIFEST) {
    if (!Array.isArray(doc.layers)) throw bad("manifest", "no layers list");
    return {
      kind: "manifest",
      mediaType,
      config: parseDescriptor(doc.config, "manifest config"),
      layers: doc.layers.map((l) => parseDescriptor(l, "manifest layer")),
      annotations: doc.annotations as Record<string, string> | undefined,
    };
  }
  throw new KilnError("UNSUPPORTED_MEDIA_TYPE", `unsupported manifest media type "${mediaType}"`);
}

export function parseConfig(bytes: Buffer): ImageConfig {
  try {
    const c = JSON.parse(bytes.toString("utf8"));
    if (typeof c !== "object" || c === null) throw new Error("not an object");
    return c as ImageConfig;
  } catch (err) {
    throw bad("image config", (err as Error).message);
  }
}

/** Index entries that are attestations or signatures, not runnable images (BuildKit, cosign). */
export function isAttestation(d: Descriptor): boolean {
  return (
    d.annotations?.["vnd.docker.reference.type"] === "attestation-manifest" ||
    (d.platform?.os === "unknown" && d.platform.architecture === "unknown")
  );
}

/**
 * Picks the manifest for a platform from an index: attestations skipped, exact variant preferred,
 * then an entry with no variant. No match → PLATFORM_NOT_FOUND listing what exists.
 */
export function selectPlatform(index: ImageIndex, want: Platform, what: string): Descriptor {
  const candidates = index.manifests.filter((d) => !isAttestation(d) && d.platform !== undefined);
  const w = normalizePlatform(want);
  const exact = candidates.find(
    (d) =>
      d.platform!.os === w.os &&
      d.platform!.architecture === w.architecture &&
      d.platform!.variant === w.variant,
  );
  if (exact) return exact;
  const loose = candidates.find((d) => platformMatches(w, d.platform!));
  if (loose) return loose;
  const available = candidates.map((d) => formatPlatform(d.platform!));
  throw new KilnError(
    "PLATFORM_NOT_FOUND",
    `${what} has no image for ${formatPlatform(w)}; available: ${available.length ? available.join(", ") : "none"}`,
    { details: { wanted: formatPlatform(w), available } },
  );
}
