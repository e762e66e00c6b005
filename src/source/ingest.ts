import type { Readable } from "node:stream";
import { KilnError, toKilnError } from "../errors.js";
import { pieces } from "../pieces.js";
import { formatReference, refName } from "../reference/reference.js";
import type { Descriptor } from "../registry/manifest.js";
import { layerCompression } from "../registry/manifest.js";
import { formatPlatform, type Platform } from "../registry/platform.js";
import type { ImageRecord } from "../store/catalog.js";
import { withLease } from "../store/leases.js";
import type { Store } from "../store/store.js";
import type { ImageSource, ResolvedImage } from "./types.js";

/** Largest manifest or config read back from the store. */
const MAX_DOCUMENT_BYTES = 16 * 1024 * 1024;

/** What a long download reports, for progress bars and logs. Every callback is optional. */
export interface IngestProgress {
  /** The plan: every layer with whether it is already in the store. */
  start?(plan: { origin: string; layers: { digest: string; size: number; present: boolean }[] }): void;
  /** `n` more bytes of a blob arrived. */
  bytes?(digest: string, n: number): void;
  /** A layer is verified and staged. */
  layerDone?(digest: string): void;
}

/** Where a pull also hands a layer's compressed bytes, chunk by chunk, in order (see layers/prefetch.ts). */
export interface BlobTap {
  /** Resolves once the tap has room for more (back-pressure on the download). */
  write(chunk: Buffer): Promise<void>;
  /** The whole blob went through (the store verifies it separately). */
  end(): void;
  /** The download failed or stopped. */
  abort(err: unknown): void;
}

export interface TappedLayer {
  digest: string;
  diffId: string | null;
  /** 0-based position in the image, and the image's layer count (for labels). */
  index: number;
  count: number;
}

export interface IngestOptions {
  platform?: Platform | undefined;
  /** Layers downloaded at once (default 3). */
  concurrency?: number | undefined;
  signal?: AbortSignal | undefined;
  progress?: IngestProgress | undefined;
  /** Also gives each layer fetched to a tap (undefined: not this one). */
  tap?: ((layer: TappedLayer) => BlobTap | undefined) | undefined;
}

export interface IngestResult {
  image: ImageRecord;
  /** Layer blobs fetched by this call. */
  downloaded: number;
  /** Layer blobs already in the store. */
  present: number;
  /** Compressed bytes fetched. */
  bytes: number;
}

/**
 * Brings one image from a source into the store: resolve, fetch the blobs it lacks into a staging
 * area, verify each, publish them, and only then record the image. A failure leaves the store as it
 * was (the staging area is discarded).
 */
export async function ingestImage(
  store: Store,
  source: ImageSource,
  opts: IngestOptions = {},
): Promise<IngestResult> {
  const resolved = await source.resolve({
    platform: opts.platform,
    signal: opts.signal,
    // Manifests and configs already in the store were verified when they were stored.
    known: async (digest) =>
      (await store.blobs.has(digest)) ? store.blobs.readBytes(digest, MAX_DOCUMENT_BYTES) : undefined,
  });
  const diffIds = checkConsistency(resolved);
  // Pinned before looking at which blobs are present and until the image is recorded: GC and
  // `kiln rm` leave a pinned blob alone, so one found present here is still there at the end.
  return withLease(store.catalog, "pull", async (pin) => {
    pin(
      [
        resolved.index?.digest,
        resolved.manifest.digest,
        resolved.config.digest,
        ...resolved.layers.map((l) => l.digest),
      ].filter((d) => d !== undefined),
    );
    return fetchAndRecord(store, source, resolved, diffIds, opts);
  });
}

async function fetchAndRecord(
  store: Store,
  source: ImageSource,
  resolved: ResolvedImage,
  diffIds: string[],
  opts: IngestOptions,
): Promise<IngestResult> {
  const unique = new Map<string, Descriptor>();
  for (const layer of resolved.layers) if (!unique.has(layer.digest)) unique.set(layer.digest, layer);
  const missing: Descriptor[] = [];
  const plan: { digest: string; size: number; present: boolean }[] = [];
  for (const layer of unique.values()) {
    const present = await store.blobs.has(layer.digest, layer.size);
    plan.push({ digest: layer.digest, size: layer.size, present });
    if (!present) missing.push(layer);
  }
  opts.progress?.start?.({ origin: source.origin, layers: plan });

  const staging = await store.blobs.stage();
  const abort = new AbortController();
  const onOuterAbort = () => abort.abort(opts.signal?.reason);
  opts.signal?.addEventListener("abort", onOuterAbort, { once: true });
  let bytes = 0;
  try {
    for (const doc of [resolved.index, resolved.manifest, resolved.config]) {
      if (doc && !(await store.blobs.has(doc.digest))) await staging.writeBytes(doc.bytes, doc.digest);
    }
    const total = resolved.layers.length;
    await forEachLimited(missing, opts.concurrency ?? 3, abort, async (layer) => {
      const index = resolved.layers.indexOf(layer);
      const what = `layer ${index + 1}/${total} (${layer.digest}) of ${source.origin}`;
      const stream: Readable = await source.openBlob(layer, {
        signal: abort.signal,
        onBytes: (n) => opts.progress?.bytes?.(layer.digest, n),
      });
      const tap = opts.tap?.({ digest: layer.digest, diffId: diffIds[index] ?? null, index, count: total });
      // Network-sized chunks joined: fewer writes, hash updates and tap hand-overs (pieces.ts).
      const input = tap ? tapped(pieces(stream), tap) : pieces(stream);
      bytes += await staging.write({ digest: layer.digest, size: layer.size, what }, input);
      opts.progress?.layerDone?.(layer.digest);
    });
    await staging.commit();
  } catch (err) {
    abort.abort(err);
    await staging.discard();
    throw toKilnError(err);
  } finally {
    opts.signal?.removeEventListener("abort", onOuterAbort);
  }

  const image = store.catalog.putImage({
    ref: resolved.ref ? formatReference(resolved.ref) : null,
    repository: resolved.ref ? refName(resolved.ref) : null,
    tag: resolved.ref?.tag ?? null,
    indexDigest: resolved.index?.digest ?? null,
    manifestDigest: resolved.manifest.digest,
    manifestMediaType: resolved.manifest.mediaType,
    configDigest: resolved.config.digest,
    platform: formatPlatform(resolved.platform),
    config: resolved.config.bytes.toString("utf8"),
    size:
      resolved.manifest.bytes.length +
      resolved.config.bytes.length +
      resolved.layers.reduce((sum, l) => sum + l.size, 0),
    created: typeof resolved.config.parsed.created === "string" ? resolved.config.parsed.created : null,
    layers: resolved.layers.map((l, i) => ({
      digest: l.digest,
      diffId: diffIds[i] ?? null,
      mediaType: l.mediaType,
      size: l.size,
    })),
  });
  return { image, downloaded: missing.length, present: unique.size - missing.length, bytes };
}

/** Passes `src` on, giving each chunk to `tap` first. */
async function* tapped(src: AsyncIterable<Buffer>, tap: BlobTap): AsyncGenerator<Buffer> {
  let whole = false;
  try {
    for await (const chunk of src) {
      await tap.write(chunk);
      yield chunk;
    }
    whole = true;
  } catch (err) {
    tap.abort(err);
    throw err;
  } finally {
    if (whole) tap.end();
    else tap.abort(new Error("the download stopped"));
  }
}

/** Refuses images whose parts disagree before anything is fetched; returns the config's diff IDs. */
function checkConsistency(image: ResolvedImage): string[] {
  for (const layer of image.layers) layerCompression(layer.mediaType);
  const diffIds = image.config.parsed.rootfs?.diff_ids ?? [];
  if (diffIds.length !== image.layers.length) {
    throw new KilnError(
      "INVALID_MANIFEST",
      `image config lists ${diffIds.length} layer diff IDs but the manifest has ${image.layers.length} layers (${image.manifest.digest})`,
    );
  }
  return diffIds;
}

/** Runs `work` over items with at most `limit` in flight; the first failure aborts the rest. */
async function forEachLimited<T>(
  items: readonly T[],
  limit: number,
  abort: AbortController,
  work: (item: T) => Promise<void>,
): Promise<void> {
  let next = 0;
  let failure: unknown;
  const worker = async () => {
    while (failure === undefined && next < items.length) {
      const item = items[next++]!;
      try {
        await work(item);
      } catch (err) {
        if (failure === undefined) failure = err;
        abort.abort(err);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, worker));
  if (failure !== undefined) throw failure;
}
