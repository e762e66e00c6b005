/**
 * kiln as a library: the same operations as the CLI, as typed functions.
 *
 *   import { pull, inspectImage } from "kiln";
 *   await pull("alpine:3.20", { root: "/var/lib/kiln" });
 */

export type { ExportFormat } from "./build/formats.js";
export {
  type CreateImageRequest,
  ImageManager,
  type ManagerOptions,
  type ServiceImage,
} from "./build/manager.js";
export { type ErrorCode, isKilnError, KilnError } from "./errors.js";
export {
  createDisk,
  describeImage,
  type ExportImageOptions,
  type ExportImageResult,
  exportImage,
  findImage,
  type GcOptions,
  type GcReport,
  gc,
  type ImageInspect,
  type ImageRecord,
  type ImportOptions,
  type IngestProgress,
  type IngestResult,
  importArchive,
  inspectImage,
  type LookupOptions,
  listImages,
  listImagesAndBuilds,
  type PullExportOptions,
  type PullOptions,
  pull,
  pullAndExport,
  type RemoveResult,
  removeImages,
  type StoreOptions,
} from "./images.js";
export { type Digest, parseDigest } from "./reference/digest.js";
export { formatReference, type ImageRef, parseReference } from "./reference/reference.js";
export { formatPlatform, hostPlatform, type Platform, parsePlatform } from "./registry/platform.js";
export { buildServer, type ServerOptions } from "./server/app.js";
export type { ImageSource, ResolvedImage } from "./source/types.js";
export { defaultRoot } from "./store/root.js";
