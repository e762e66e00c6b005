import type { Readable } from "node:stream";
import type { ImageRef } from "../reference/reference.js";
import type { Descriptor, ImageConfig, ImageIndex, ImageManifest } from "../registry/manifest.js";
import type { Platform } from "../registry/platform.js";

/** A document (index, manifest or config) with the exact bytes its digest was computed over. */
export interface RawDocument<T> {
  readonly digest: string;
  readonly mediaType: string;
  readonly bytes: Buffer;
  readonly parsed: T;
}

/** One platform's image, resolved: everything but the layer data, which is streamed on demand. */
export interface ResolvedImage {
  /** The name the image is known by (registry ref, RepoTag, ref.name annotation, --tag); none for an untagged archive entry. */
  readonly ref: ImageRef | undefined;
  /** The index (manifest list) the manifest was chosen from, if any; its bytes are stored too. */
  readonly index: RawDocument<ImageIndex> | undefined;
  readonly manifest: RawDocument<ImageManifest>;
  readonly config: RawDocument<ImageConfig>;
  readonly platform: Platform;
  /** Layer descriptors in order, bottom first. */
  readonly layers: readonly Descriptor[];
}

export interface OpenBlobOptions {
  readonly signal?: AbortSignal | undefined;
  /** Called with the count of bytes received as they arrive (including re-sent ones after a resume). */
  readonly onBytes?: ((n: number) => void) | undefined;
}

export interface ResolveOptions {
  readonly platform?: Platform | undefined;
  readonly signal?: AbortSignal | undefined;
  /**
   * The verified bytes of a blob the caller already holds (the store), or undefined. A source may
   * use it to skip fetching a manifest or config by digest: a warm pull then costs one request.
   */
  readonly known?: ((digest: string) => Promise<Buffer | undefined>) | undefined;
}

/**
 * Where images come from: a registry, a docker-archive tar, an OCI layout or archive. Later stages
 * (store, writers) see only this interface, in the style of go-containerregistry's v1.Image.
 */
export interface ImageSource {
  /** For messages: `docker.io/library/alpine:3.20`, `docker-archive:/tmp/a.tar`. */
  readonly origin: string;
  /** Resolves one platform's image; the verified index, manifest and config bytes come with it. */
  resolve(opts: ResolveOptions): Promise<ResolvedImage>;
  /**
   * Streams a blob's bytes. The stream yields exactly the blob (resuming transparently where the
   * transport allows); digest and size are checked by the consumer (the blob store).
   */
  openBlob(desc: Descriptor, opts?: OpenBlobOptions): Promise<Readable>;
  close(): Promise<void>;
}
