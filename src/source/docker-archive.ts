/**
 * `docker save` archives: `manifest.json` lists each image's config and layer members, in the old
 * layout (`<id>/layer.tar`, `<hex>.json`) or the docker 25+ one (`blobs/sha256/<hex>`). They carry
 * no registry manifest, so one is synthesized (Docker schema 2) from digests and sizes computed by
 * hashing each layer member once, at resolve time. The same archive always gives the same bytes.
 */
import { createHash } from "node:crypto";
import { Readable } from "node:stream";
import { KilnError } from "../errors.js";
import { formatReference, type ImageRef } from "../reference/reference.js";
import {
  type Descriptor,
  type ImageConfig,
  type ImageManifest,
  MediaType,
  parseConfig,
} from "../registry/manifest.js";
import type { Platform } from "../registry/platform.js";
import type { ArchiveFiles } from "./archive-files.js";
import {
  type ArchiveImage,
  archiveError,
  checkPlatform,
  configPlatform,
  MAX_DOCUMENT_SIZE,
  parseArchiveName,
  type ResolveOptions,
  sha256Hex,
} from "./archive-image.js";
import type { OpenBlobOptions, ResolvedImage } from "./types.js";

export const DOCKER_MANIFEST_FILE = "manifest.json";

/** One entry of `manifest.json`. */
export interface DockerManifestEntry {
  readonly config: string;
  readonly repoTags: string[];
  readonly layers: string[];
}

/** Reads and checks the shape of `manifest.json` → INVALID_ARCHIVE when it is not the docker one. */
export async function readDockerManifest(files: ArchiveFiles): Promise<DockerManifestEntry[]> {
  const bytes = await files.read(DOCKER_MANIFEST_FILE, MAX_DOCUMENT_SIZE);
  const bad = (why: string) =>
    new KilnError("INVALID_ARCHIVE", `${files.path}: ${DOCKER_MANIFEST_FILE}: ${why}`);
  let doc: unknown;
  try {
    doc = JSON.parse(bytes.toString("utf8"));
  } catch {
    throw bad("not JSON");
  }
  if (!Array.isArray(doc)) throw bad("not a list of images");
  return doc.map((raw, i) => {
    const e = raw as { Config?: unknown; RepoTags?: unknown; Layers?: unknown } | null;
    if (typeof e?.Config !== "string") throw bad(`entry ${i + 1} has no Config`);
    if (!Array.isArray(e.Layers) || !e.Layers.every((l) => typeof l === "string")) {
      throw bad(`entry ${i + 1} has no Layers list`);
    }
    const tags = e.RepoTags ?? [];
    if (!Array.isArray(tags) || !tags.every((t) => typeof t === "string"))
      throw bad(`entry ${i + 1}: bad RepoTags`);
    return { config: e.Config, repoTags: tags as string[], layers: e.Layers as string[] };
  });
}

/** `blobs/sha256/<hex>` and `<hex>.json` (the old image ID) name their content's digest. */
export function digestOfMemberName(name: string): string | undefined {
  const m = /^(?:\.\/)?(?:blobs\/sha256\/([0-9a-f]{64})|([0-9a-f]{64})\.json)$/.exec(name);
  const hex = m?.[1] ?? m?.[2];
  return hex === undefined ? undefined : `sha256:${hex}`;
}

/** The layer media type its first bytes declare: gzip 1f 8b, zstd 28 b5 2f fd, else a plain tar. */
export function dockerLayerMediaType(head: Buffer): string {
  if (head[0] === 0x1f && head[1] === 0x8b) return MediaType.DOCKER_LAYER_GZIP;
  if (head[0] === 0x28 && head[1] === 0xb5 && head[2] === 0x2f && head[3] === 0xfd)
    return MediaType.DOCKER_LAYER_ZSTD;
  return MediaType.DOCKER_LAYER;
}

interface MemberHash {
  readonly digest: string;
  readonly size: number;
  readonly mediaType: string;
}

interface Built {
  readonly resolved: Omit<ResolvedImage, "ref">;
  /** Blob digest → member name (layers and config). */
  readonly members: Map<string, string>;
}

/** One manifest.json entry. */
export class DockerImage implements ArchiveImage {
  readonly id: string;
  readonly names: ImageRef[] = [];
  readonly tags: readonly string[] = [];
  private building: Promise<Built> | undefined;

  constructor(
    private readonly files: ArchiveFiles,
    readonly entry: DockerManifestEntry,
    readonly label: string,
  ) {
    this.id = dockerImageId(entry);
    this.addRepoTags(entry.repoTags);
  }

  addRepoTags(repoTags: readonly string[]): void {
    for (const tag of repoTags) {
      const ref = parseArchiveName(tag);
      if (ref && !this.names.some((n) => formatReference(n) === formatReference(ref))) this.names.push(ref);
    }
  }

  private where(): string {
    return `${this.files.path} (${this.label})`;
  }

  /** The config digest, from its member name when that names it, else by hashing it. */
  async configDigest(): Promise<string> {
    return (
      digestOfMemberName(this.entry.config) ??
      `sha256:${sha256Hex(await this.files.read(this.entry.config, MAX_DOCUMENT_SIZE))}`
    );
  }

  async resolve(opts: ResolveOptions): Promise<Omit<ResolvedImage, "ref">> {
    const built = await this.build(opts.signal);
    checkPlatform(opts.platform, built.resolved.platform, this.where());
    return built.resolved;
  }

  /** Hashes the layers once; a failed or aborted attempt is forgotten so a later call retries. */
  private build(signal: AbortSignal | undefined): Promise<Built> {
    if (this.building === undefined) {
      this.building = this.compute(signal);
      this.building.catch(() => {
        this.building = undefined;
      });
    }
    return this.building;
  }

  private async compute(signal: AbortSignal | undefined): Promise<Built> {
    const { files, entry } = this;
    const configBytes = await files.read(entry.config, MAX_DOCUMENT_SIZE);
    const configDigest = `sha256:${sha256Hex(configBytes)}`;
    const named = digestOfMemberName(entry.config);
    if (named !== undefined && named !== configDigest) {
      throw new KilnError(
        "INVALID_ARCHIVE",
        `${files.path}: config "${entry.config}" does not match its digest ${named} (content hashes to ${configDigest})`,
      );
    }
    let config: ImageConfig;
    try {
      config = parseConfig(configBytes);
    } catch (err) {
      throw archiveError(`${files.path}: config "${entry.config}"`, err);
    }
    const platform: Platform = configPlatform(config, this.where());
    const diffIds = config.rootfs?.diff_ids;
    if (!Array.isArray(diffIds) || diffIds.length !== entry.layers.length) {
      throw new KilnError(
        "INVALID_ARCHIVE",
        `${this.where()}: config "${entry.config}" lists ${Array.isArray(diffIds) ? diffIds.length : 0} diff IDs but manifest.json lists ${entry.layers.length} layers`,
      );
    }

    const members = new Map<string, string>([[configDigest, entry.config]]);
    const hashed = new Map<string, MemberHash>();
    const layers: Descriptor[] = [];
    for (const [i, name] of entry.layers.entries()) {
      const what = `layer ${i + 1}/${entry.layers.length} "${name}"`;
      if ((await files.size(name)) === undefined) {
        throw new KilnError("INVALID_ARCHIVE", `${files.path}: ${what} named in manifest.json is missing`);
      }
      let h = hashed.get(name);
      if (h === undefined) {
        h = await hashMember(files, name, signal);
        hashed.set(name, h);
      }
      const namedDigest = digestOfMemberName(name);
      if (namedDigest !== undefined && namedDigest !== h.digest) {
        throw new KilnError(
          "INVALID_ARCHIVE",
          `${files.path}: ${what} does not match its digest ${namedDigest} (content hashes to ${h.digest})`,
        );
      }
      // An uncompressed layer is its own diff: it must be the one the config lists.
      if (h.mediaType === MediaType.DOCKER_LAYER && h.digest !== diffIds[i]) {
        throw new KilnError(
          "INVALID_ARCHIVE",
          `${files.path}: ${what} hashes to ${h.digest} but the config's diff ID is ${diffIds[i]}`,
          { details: { expected: diffIds[i], actual: h.digest } },
        );
      }
      if (!members.has(h.digest)) members.set(h.digest, name);
      layers.push({ mediaType: h.mediaType, size: h.size, digest: h.digest });
    }

    // Key order is fixed (docker's own): the bytes, hence the digest, depend only on the archive.
    const manifest = {
      schemaVersion: 2,
      mediaType: MediaType.DOCKER_MANIFEST,
      config: { mediaType: MediaType.DOCKER_CONFIG, size: configBytes.length, digest: configDigest },
      layers: layers.map((l) => ({ mediaType: l.mediaType, size: l.size, digest: l.digest })),
    };
    const manifestBytes = Buffer.from(JSON.stringify(manifest), "utf8");
    const parsed: ImageManifest = {
      kind: "manifest",
      mediaType: MediaType.DOCKER_MANIFEST,
      config: manifest.config,
      layers,
    };
    return {
      members,
      resolved: {
        index: undefined,
        manifest: {
          digest: `sha256:${sha256Hex(manifestBytes)}`,
          mediaType: MediaType.DOCKER_MANIFEST,
          bytes: manifestBytes,
          parsed,
        },
        config: {
          digest: configDigest,
          mediaType: MediaType.DOCKER_CONFIG,
          bytes: configBytes,
          parsed: config,
        },
        platform,
        layers,
      },
    };
  }

  async openBlob(desc: Descriptor, opts: OpenBlobOptions = {}): Promise<Readable> {
    const built = await this.build(opts.signal);
    if (desc.digest === built.resolved.manifest.digest) return Readable.from([built.resolved.manifest.bytes]);
    const name = built.members.get(desc.digest);
    if (name === undefined) {
      throw new KilnError("NOT_FOUND", `${this.where()} has no blob ${desc.digest}`);
    }
    const size = await this.files.size(name);
    if (size === undefined)
      throw new KilnError("INVALID_ARCHIVE", `${this.files.path}: member "${name}" is missing`);
    if (size !== desc.size) {
      throw new KilnError(
        "INVALID_ARCHIVE",
        `${this.files.path}: member "${name}" (${desc.digest}) is ${size} bytes, ${size < desc.size ? "shorter" : "longer"} than the ${desc.size} its descriptor says`,
      );
    }
    return this.files.stream(name, opts);
  }
}

/** Hashes a member in one streaming pass, noting its size and compression from its first bytes. */
async function hashMember(
  files: ArchiveFiles,
  name: string,
  signal: AbortSignal | undefined,
): Promise<MemberHash> {
  const hash = createHash("sha256");
  const head = Buffer.alloc(4);
  let size = 0;
  const stream = await files.stream(name, { signal });
  for await (const chunk of stream as AsyncIterable<Buffer>) {
    if (size < head.length) chunk.copy(head, size, 0, Math.min(chunk.length, head.length - size));
    size += chunk.length;
    hash.update(chunk);
  }
  return {
    digest: `sha256:${hash.digest("hex")}`,
    size,
    mediaType: dockerLayerMediaType(size >= 4 ? head : head.subarray(0, size)),
  };
}

function dockerImageId(entry: DockerManifestEntry): string {
  return JSON.stringify([entry.config, entry.layers]);
}

/** One DockerImage per distinct manifest.json entry (same config and layers: one image, names merged). */
export function dockerImages(files: ArchiveFiles, entries: readonly DockerManifestEntry[]): DockerImage[] {
  const byId = new Map<string, DockerImage>();
  entries.forEach((e, i) => {
    const image = byId.get(dockerImageId(e));
    if (image) image.addRepoTags(e.repoTags);
    else byId.set(dockerImageId(e), new DockerImage(files, e, `manifest.json entry ${i + 1}`));
  });
  return [...byId.values()];
}
