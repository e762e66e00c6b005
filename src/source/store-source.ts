/**
 * An image whose blobs are already in the store (pushed to the embedded registry), as an
 * ImageSource: ingesting it records the image in the catalog without fetching anything.
 */
import type { Readable } from "node:stream";
import { KilnError } from "../errors.js";
import { formatReference, type ImageRef, refName } from "../reference/reference.js";
import { type Descriptor, type ImageManifest, parseManifest } from "../registry/manifest.js";
import { formatPlatform, hostPlatform, normalizePlatform, type Platform } from "../registry/platform.js";
import type { Catalog } from "../store/catalog.js";
import type { Store } from "../store/store.js";
import { checkPlatform } from "./archive-image.js";
import { resolveDocuments } from "./resolve.js";
import type { ImageSource, OpenBlobOptions, RawDocument, ResolvedImage, ResolveOptions } from "./types.js";

/** Largest index, manifest or config read from the store. */
const MAX_DOCUMENT_BYTES = 16 * 1024 * 1024;

/** The top document (index or manifest) of an image in the store. */
export interface StoreTarget {
  /** The name to record the image under; also how the document is found when `digest` is absent. */
  readonly ref?: ImageRef | undefined;
  readonly digest?: string | undefined;
  /** The media type the document was declared with (a push's Content-Type), if known. */
  readonly mediaType?: string | undefined;
  /** The document's bytes when the caller holds them (verified against `digest` by the caller). */
  readonly bytes?: Buffer | undefined;
}

/**
 * What `repository:tag` names in the catalog: the index its images share when that index is in the
 * store, else one manifest (the host platform's, or the only one). Undefined when nothing is tagged.
 */
export async function findTagged(
  store: Store,
  repository: string,
  tag: string,
): Promise<{ digest: string; mediaType: string | undefined } | undefined> {
  const rows = taggedRows(store.catalog, repository, tag);
  if (rows.length === 0) return undefined;
  const index = rows[0]!.indexDigest;
  if (index !== null && rows.every((r) => r.indexDigest === index) && (await store.blobs.has(index))) {
    return { digest: index, mediaType: undefined };
  }
  const host = formatPlatform(hostPlatform());
  const row =
    rows.find((r) => r.platform === host) ?? rows.find((r) => r.platform.startsWith(`${host}/`)) ?? rows[0]!;
  return { digest: row.manifestDigest, mediaType: row.manifestMediaType };
}

/** Images recorded under `repository:tag` (any platform, pinned to a digest or not). */
export function taggedRows(catalog: Catalog, repository: string, tag: string) {
  return catalog.list().filter((r) => r.repository === repository && r.tag === tag);
}

export class StoreSource implements ImageSource {
  readonly origin: string;

  constructor(
    private readonly store: Store,
    private readonly target: StoreTarget,
  ) {
    this.origin = target.ref ? formatReference(target.ref) : `store:${target.digest ?? "?"}`;
  }

  async resolve(opts: ResolveOptions = {}): Promise<ResolvedImage> {
    const top = await this.top();
    const { index, manifest, config, chosen } = await resolveDocuments(
      top,
      this.origin,
      opts.platform,
      (desc) => this.childManifest(desc),
      (desc) => this.document(desc),
    );

    const c = config.parsed;
    let platform: Platform;
    if (chosen) platform = chosen;
    else if (typeof c.os === "string" && typeof c.architecture === "string" && c.os && c.architecture) {
      platform = normalizePlatform({ os: c.os, architecture: c.architecture, variant: c.variant });
      checkPlatform(opts.platform, platform, this.origin);
    } else {
      // A config that names no platform: take the one asked for, as the registry source does.
      platform = opts.platform ? normalizePlatform(opts.platform) : hostPlatform();
    }
    return { ref: this.target.ref, index, manifest, config, platform, layers: manifest.parsed.layers };
  }

  async openBlob(desc: Descriptor, opts: OpenBlobOptions = {}): Promise<Readable> {
    opts.signal?.throwIfAborted();
    return this.store.blobs.open(desc.digest);
  }

  async close(): Promise<void> {}

  private async top(): Promise<{ digest: string; mediaType: string | undefined; bytes: Buffer }> {
    const t = this.target;
    if (t.digest !== undefined) {
      const bytes = t.bytes ?? (await this.store.blobs.readBytes(t.digest, MAX_DOCUMENT_BYTES));
      return { digest: t.digest, mediaType: t.mediaType, bytes };
    }
    if (!t.ref?.tag) {
      throw new KilnError("INVALID_ARGUMENT", "a store source needs a digest or a tagged reference");
    }
    const found = await findTagged(this.store, refName(t.ref), t.ref.tag);
    if (!found) throw new KilnError("NOT_FOUND", `no image ${this.origin} in the store`);
    const bytes = await this.store.blobs.readBytes(found.digest, MAX_DOCUMENT_BYTES);
    return { digest: found.digest, mediaType: found.mediaType, bytes };
  }

  /** A blob named by a descriptor, whole, checked against the descriptor's size. */
  private async document(desc: Descriptor): Promise<Buffer> {
    const bytes = await this.store.blobs.readBytes(desc.digest, MAX_DOCUMENT_BYTES);
    if (bytes.length !== desc.size) {
      throw new KilnError(
        "SIZE_MISMATCH",
        `${this.origin}: blob ${desc.digest} is ${bytes.length} bytes, its descriptor says ${desc.size}`,
      );
    }
    return bytes;
  }

  private async childManifest(desc: Descriptor): Promise<RawDocument<ImageManifest>> {
    const bytes = await this.document(desc);
    const parsed = parseManifest(bytes, desc.mediaType);
    if (parsed.kind !== "manifest") {
      throw new KilnError(
        "UNSUPPORTED_MEDIA_TYPE",
        `${this.origin}: the index entry ${desc.digest} is itself an index (nested indexes are not supported)`,
      );
    }
    return { digest: desc.digest, mediaType: parsed.mediaType, bytes, parsed };
  }
}
