/**
 * The documents of one platform's image, from its top document (index or manifest): the shared
 * part of every source that reads manifests and configs by digest (registry, store).
 */
import { KilnError } from "../errors.js";
import {
  type Descriptor,
  type ImageIndex,
  type ImageManifest,
  layerCompression,
  MediaType,
  parseConfig,
  parseManifest,
  selectPlatform,
} from "../registry/manifest.js";
import { hostPlatform, type Platform } from "../registry/platform.js";
import type { RawDocument, ResolvedImage } from "./types.js";

const CONFIG_TYPES = new Set<string>([MediaType.OCI_CONFIG, MediaType.DOCKER_CONFIG]);

export interface ImageDocuments {
  index: RawDocument<ImageIndex> | undefined;
  manifest: RawDocument<ImageManifest>;
  config: ResolvedImage["config"];
  /** The index entry's platform, when the top document was an index. */
  chosen: Platform | undefined;
}

/**
 * Picks `want` (default: the host's) from an index, checks the manifest is a container image with
 * layers kiln can read, and reads its config. `fetchManifest` and `fetchConfig` verify what they return.
 */
export async function resolveDocuments(
  top: { digest: string; mediaType: string | undefined; bytes: Buffer },
  origin: string,
  want: Platform | undefined,
  fetchManifest: (desc: Descriptor) => Promise<RawDocument<ImageManifest>>,
  fetchConfig: (desc: Descriptor) => Promise<Buffer>,
): Promise<ImageDocuments> {
  const parsed = parseManifest(top.bytes, top.mediaType);
  let index: RawDocument<ImageIndex> | undefined;
  let manifest: RawDocument<ImageManifest>;
  let chosen: Platform | undefined;
  if (parsed.kind === "index") {
    index = { digest: top.digest, mediaType: parsed.mediaType, bytes: top.bytes, parsed };
    const desc = selectPlatform(parsed, want ?? hostPlatform(), origin);
    chosen = desc.platform;
    manifest = await fetchManifest(desc);
  } else {
    manifest = { digest: top.digest, mediaType: parsed.mediaType, bytes: top.bytes, parsed };
  }

  const configDesc = manifest.parsed.config;
  if (!CONFIG_TYPES.has(configDesc.mediaType)) {
    throw new KilnError(
      "UNSUPPORTED_MEDIA_TYPE",
      `${origin} is not a container image: its config has media type "${configDesc.mediaType}"`,
    );
  }
  for (const layer of manifest.parsed.layers) layerCompression(layer.mediaType);
  const bytes = await fetchConfig(configDesc);
  const config = {
    digest: configDesc.digest,
    mediaType: configDesc.mediaType,
    bytes,
    parsed: parseConfig(bytes),
  };
  return { index, manifest, config, chosen };
}
