/**
 * OCI image layouts, as a directory or a tar (`oci-archive`, and docker 25+ `docker save`):
 * `oci-layout`, `index.json`, `blobs/<alg>/<hex>`. Each top-level index entry is an image (a
 * nested index being a multi-platform one); every index, manifest and config read is verified
 * against its digest.
 */
import type { Readable } from "node:stream";
import { KilnError } from "../errors.js";
import { parseDigest } from "../reference/digest.js";
import { formatReference, type ImageRef } from "../reference/reference.js";
import {
  type Descriptor,
  type ImageIndex,
  type ImageManifest,
  isAttestation,
  MediaType,
  parseConfig,
  parseManifest,
  selectPlatform,
} from "../registry/manifest.js";
import { hostPlatform } from "../registry/platform.js";
import { formatSize } from "../sizes.js";
import type { ArchiveFiles } from "./archive-files.js";
import {
  type ArchiveImage,
  archiveError,
  checkDigest,
  checkPlatform,
  configPlatform,
  MAX_DOCUMENT_SIZE,
  parseArchiveName,
  type ResolveOptions,
} from "./archive-image.js";
import type { OpenBlobOptions, RawDocument, ResolvedImage } from "./types.js";

export const OCI_LAYOUT_FILE = "oci-layout";
export const OCI_INDEX_FILE = "index.json";
const REF_NAME = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME = "io.containerd.image.name";

const MANIFEST_TYPES = new Set<string>([MediaType.OCI_MANIFEST, MediaType.DOCKER_MANIFEST]);
const INDEX_TYPES = new Set<string>([MediaType.OCI_INDEX, MediaType.DOCKER_LIST]);

/** `sha256:ab…` → `blobs/sha256/ab…`. */
export function blobPath(digest: string): string {
  const d = parseDigest(digest);
  return `blobs/${d.algorithm}/${d.hex}`;
}

/**
 * A document blob, whole and verified: present, of the descriptor's size, hashing to its digest.
 * Anything else → INVALID_ARCHIVE naming the blob.
 */
async function readDocument(files: ArchiveFiles, desc: Descriptor, what: string): Promise<Buffer> {
  const name = blobPath(desc.digest);
  if (desc.size > MAX_DOCUMENT_SIZE) {
    throw new KilnError(
      "TOO_LARGE",
      `${files.path}: ${what} ${desc.digest} is ${formatSize(desc.size, "up")}, more than the ${formatSize(MAX_DOCUMENT_SIZE)} allowed`,
    );
  }
  if ((await files.size(name)) === undefined) {
    throw new KilnError(
      "INVALID_ARCHIVE",
      `${files.path}: ${what} blob ${desc.digest} is missing (no ${name})`,
    );
  }
  const bytes = await files.read(name, MAX_DOCUMENT_SIZE);
  if (bytes.length !== desc.size) {
    throw new KilnError(
      "INVALID_ARCHIVE",
      `${files.path}: ${what} blob ${desc.digest} is ${bytes.length} bytes, its descriptor says ${desc.size}`,
    );
  }
  checkDigest(bytes, desc.digest, `${files.path}: ${what} blob ${name}`);
  return bytes;
}

/** Reads `oci-layout` and `index.json`; a malformed one → INVALID_ARCHIVE. */
export async function readOciIndex(files: ArchiveFiles): Promise<ImageIndex> {
  const layoutBytes = await files.read(OCI_LAYOUT_FILE, 64 * 1024);
  let layout: unknown;
  try {
    layout = JSON.parse(layoutBytes.toString("utf8"));
  } catch {
    layout = undefined;
  }
  const version = (layout as { imageLayoutVersion?: unknown } | undefined)?.imageLayoutVersion;
  if (typeof version !== "string") {
    throw new KilnError("INVALID_ARCHIVE", `${files.path}: ${OCI_LAYOUT_FILE} has no imageLayoutVersion`);
  }
  const bytes = await files.read(OCI_INDEX_FILE, MAX_DOCUMENT_SIZE);
  let index: ImageIndex | ImageManifest;
  try {
    index = parseManifest(bytes, MediaType.OCI_INDEX);
  } catch (err) {
    throw archiveError(`${files.path}: ${OCI_INDEX_FILE}`, err);
  }
  if (index.kind !== "index") {
    throw new KilnError("INVALID_ARCHIVE", `${files.path}: ${OCI_INDEX_FILE} is not an image index`);
  }
  return index;
}

function parseAs<K extends "index" | "manifest">(
  kind: K,
  bytes: Buffer,
  desc: Descriptor,
  where: string,
): K extends "index" ? ImageIndex : ImageManifest {
  let doc: ImageIndex | ImageManifest;
  try {
    doc = parseManifest(bytes, desc.mediaType);
  } catch (err) {
    throw archiveError(where, err);
  }
  if (doc.kind !== kind)
    throw new KilnError("INVALID_ARCHIVE", `${where}: expected an image ${kind}, found an ${doc.kind}`);
  return doc as K extends "index" ? ImageIndex : ImageManifest;
}

/** One top-level entry of an OCI index (all entries with the same digest). */
export class OciImage implements ArchiveImage {
  readonly id: string;
  readonly names: ImageRef[] = [];
  readonly tags: string[] = [];

  constructor(
    private readonly files: ArchiveFiles,
    readonly descriptor: Descriptor,
    readonly label: string,
  ) {
    this.id = descriptor.digest;
  }

  /** Takes the names an index entry gives (a full ref.name is used as is; a bare one is a tag). */
  addNames(desc: Descriptor): void {
    const containerd = desc.annotations?.[CONTAINERD_NAME];
    if (typeof containerd === "string" && containerd !== "") {
      const ref = parseArchiveName(containerd);
      if (ref) this.addName(ref);
    }
    const refName = desc.annotations?.[REF_NAME];
    if (typeof refName !== "string" || refName === "") return;
    if (/[/:@]/.test(refName)) {
      const ref = parseArchiveName(refName);
      if (ref) this.addName(ref);
    } else if (!this.tags.includes(refName)) {
      this.tags.push(refName);
    }
  }

  addName(ref: ImageRef): void {
    const key = formatReference(ref);
    if (!this.names.some((n) => formatReference(n) === key)) this.names.push(ref);
  }

  get isIndex(): boolean {
    return INDEX_TYPES.has(this.descriptor.mediaType);
  }

  /** The config digests this image's manifests name (present ones), to match docker RepoTags. */
  async configDigests(): Promise<string[]> {
    const manifests: Descriptor[] = [];
    if (this.isIndex) {
      const index = parseAs(
        "index",
        await readDocument(this.files, this.descriptor, "index"),
        this.descriptor,
        this.where("index"),
      );
      for (const m of await this.presentManifests(index)) manifests.push(m);
    } else manifests.push(this.descriptor);
    const out: string[] = [];
    for (const m of manifests) {
      const manifest = parseAs(
        "manifest",
        await readDocument(this.files, m, "manifest"),
        m,
        this.where("manifest"),
      );
      out.push(manifest.config.digest);
    }
    return out;
  }

  private where(what: string): string {
    return `${this.files.path}: ${this.label} ${what}`;
  }

  /** Index entries an archive can import: manifests whose blob it holds (docker save of a multi-platform image keeps one platform). */
  private async presentManifests(index: ImageIndex): Promise<Descriptor[]> {
    const present: Descriptor[] = [];
    for (const m of index.manifests) {
      if (!MANIFEST_TYPES.has(m.mediaType) || isAttestation(m)) continue;
      if ((await this.files.size(blobPath(m.digest))) !== undefined) present.push(m);
    }
    return present;
  }

  async resolve(opts: ResolveOptions): Promise<Omit<ResolvedImage, "ref">> {
    let index: RawDocument<ImageIndex> | undefined;
    let manifestDesc = this.descriptor;
    if (this.isIndex) {
      const bytes = await readDocument(this.files, this.descriptor, "index");
      const parsed = parseAs("index", bytes, this.descriptor, this.where("index"));
      index = { digest: this.descriptor.digest, mediaType: parsed.mediaType, bytes, parsed };
      const present = await this.presentManifests(parsed);
      try {
        manifestDesc = selectPlatform(
          { ...parsed, manifests: present },
          opts.platform ?? hostPlatform(),
          `${this.files.path} (${this.label})`,
        );
      } catch (err) {
        // With no platform asked, an archive holding a single platform's image gives that one.
        if (opts.platform !== undefined || present.length !== 1) throw err;
        manifestDesc = present[0]!;
      }
    }
    opts.signal?.throwIfAborted();
    const manifestBytes = await readDocument(this.files, manifestDesc, "manifest");
    const manifest = parseAs("manifest", manifestBytes, manifestDesc, this.where("manifest"));
    const configBytes = await readDocument(this.files, manifest.config, "config");
    let config: ReturnType<typeof parseConfig>;
    try {
      config = parseConfig(configBytes);
    } catch (err) {
      throw archiveError(this.where("config"), err);
    }
    const platform = configPlatform(config, `${this.files.path} (${this.label})`);
    if (index === undefined) checkPlatform(opts.platform, platform, `${this.files.path} (${this.label})`);
    return {
      index,
      manifest: {
        digest: manifestDesc.digest,
        mediaType: manifest.mediaType,
        bytes: manifestBytes,
        parsed: manifest,
      },
      config: {
        digest: manifest.config.digest,
        mediaType: manifest.config.mediaType,
        bytes: configBytes,
        parsed: config,
      },
      platform,
      layers: manifest.layers,
    };
  }

  async openBlob(desc: Descriptor, opts: OpenBlobOptions = {}): Promise<Readable> {
    return openLayoutBlob(this.files, desc, opts);
  }
}

/** Streams `blobs/<alg>/<hex>`: missing, or not the descriptor's size → INVALID_ARCHIVE. */
export async function openLayoutBlob(
  files: ArchiveFiles,
  desc: Descriptor,
  opts: OpenBlobOptions = {},
): Promise<Readable> {
  const name = blobPath(desc.digest);
  const size = await files.size(name);
  if (size === undefined)
    throw new KilnError("INVALID_ARCHIVE", `${files.path}: blob ${desc.digest} is missing (no ${name})`);
  if (size < desc.size) {
    throw new KilnError(
      "INVALID_ARCHIVE",
      `${files.path}: blob ${desc.digest} is ${size} bytes, shorter than the ${desc.size} its descriptor says`,
    );
  }
  if (size > desc.size) {
    throw new KilnError(
      "INVALID_ARCHIVE",
      `${files.path}: blob ${desc.digest} is ${size} bytes, longer than the ${desc.size} its descriptor says`,
    );
  }
  return files.stream(name, opts);
}

/** One OciImage per distinct top-level entry (manifest or index), in index order, with its names. */
export function ociImages(files: ArchiveFiles, index: ImageIndex): OciImage[] {
  const byDigest = new Map<string, OciImage>();
  index.manifests.forEach((desc, i) => {
    if (!MANIFEST_TYPES.has(desc.mediaType) && !INDEX_TYPES.has(desc.mediaType)) return;
    let image = byDigest.get(desc.digest);
    if (image === undefined) {
      image = new OciImage(files, desc, `index.json entry ${i + 1} (${desc.digest})`);
      byDigest.set(desc.digest, image);
    }
    image.addNames(desc);
  });
  return [...byDigest.values()];
}
