/** An image in a registry, as an ImageSource: index → platform → manifest → config, all verified. */
import type { Readable } from "node:stream";
import { KilnError } from "../errors.js";
import { formatReference, type ImageRef, refIdentifier } from "../reference/reference.js";
import type { RegistryClient } from "../registry/client.js";
import { type Descriptor, type ImageManifest, parseManifest } from "../registry/manifest.js";
import {
  formatPlatform,
  hostPlatform,
  normalizePlatform,
  type Platform,
  platformMatches,
} from "../registry/platform.js";
import { resolveDocuments } from "./resolve.js";
import type { ImageSource, OpenBlobOptions, RawDocument, ResolvedImage, ResolveOptions } from "./types.js";

/** Largest image config accepted. */
export const MAX_CONFIG_BYTES = 8 * 1024 * 1024;

export class RegistrySource implements ImageSource {
  readonly origin: string;
  /** Things worth telling the user that did not stop the pull (a single-platform image for another platform). */
  readonly warnings: string[] = [];

  constructor(
    readonly ref: ImageRef,
    private readonly client: RegistryClient,
  ) {
    this.origin = formatReference(ref);
  }

  async resolve(opts: ResolveOptions = {}): Promise<ResolvedImage> {
    const signal = opts.signal;
    const top = await this.client.getManifest(this.ref, refIdentifier(this.ref), { signal });
    const { index, manifest, config, chosen } = await resolveDocuments(
      top,
      this.origin,
      opts.platform,
      (desc) => this.fetchManifest(desc, signal, opts.known),
      async (desc) =>
        (await opts.known?.(desc.digest)) ??
        (await this.client.getBlob(this.ref, desc, MAX_CONFIG_BYTES, { signal })),
    );

    const c = config.parsed;
    const declared =
      typeof c.os === "string" && typeof c.architecture === "string" && c.os && c.architecture
        ? normalizePlatform({ os: c.os, architecture: c.architecture, variant: c.variant })
        : undefined;
    let platform: Platform;
    if (chosen) {
      platform = chosen;
    } else if (!declared) {
      platform = opts.platform ? normalizePlatform(opts.platform) : hostPlatform();
      this.warnings.push(
        `${this.origin}: the image config names no platform; assuming ${formatPlatform(platform)}`,
      );
    } else {
      platform = declared;
      if (opts.platform && !platformMatches(opts.platform, declared)) {
        throw new KilnError(
          "PLATFORM_MISMATCH",
          `image ${this.origin} is ${formatPlatform(declared)}, not ${formatPlatform(normalizePlatform(opts.platform))}`,
          {
            details: {
              wanted: formatPlatform(normalizePlatform(opts.platform)),
              actual: formatPlatform(declared),
            },
          },
        );
      }
      if (!opts.platform && !platformMatches(hostPlatform(), declared)) {
        this.warnings.push(
          `image ${this.origin} is ${formatPlatform(declared)}, not the host's ${formatPlatform(hostPlatform())}`,
        );
      }
    }

    return {
      ref: this.ref,
      index,
      manifest,
      config,
      platform,
      layers: manifest.parsed.layers,
    };
  }

  openBlob(desc: Descriptor, opts: OpenBlobOptions = {}): Promise<Readable> {
    return this.client.openBlob(this.ref, desc, { signal: opts.signal, onBytes: opts.onBytes });
  }

  /** The client belongs to whoever made it; closing the source leaves it open. */
  async close(): Promise<void> {}

  /** A platform's manifest from an index, checked against the index entry's digest and size. */
  private async fetchManifest(
    desc: Descriptor,
    signal: AbortSignal | undefined,
    known: ResolveOptions["known"],
  ): Promise<RawDocument<ImageManifest>> {
    const held = await known?.(desc.digest);
    const m = held
      ? { digest: desc.digest, mediaType: desc.mediaType, bytes: held }
      : await this.client.getManifest(this.ref, desc.digest, { signal });
    if (m.bytes.length !== desc.size) {
      throw new KilnError(
        "SIZE_MISMATCH",
        `manifest ${desc.digest} of ${this.origin} is ${m.bytes.length} bytes, the index says ${desc.size}`,
      );
    }
    const parsed = parseManifest(m.bytes, m.mediaType || desc.mediaType);
    if (parsed.kind !== "manifest") {
      throw new KilnError(
        "UNSUPPORTED_MEDIA_TYPE",
        `${this.origin}: the index entry ${desc.digest} is itself an index (nested indexes are not supported)`,
      );
    }
    return { digest: m.digest, mediaType: parsed.mediaType, bytes: m.bytes, parsed };
  }
}
