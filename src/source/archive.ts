/**
 * `kiln import FILE [--tag REF]`: image archives on the local disk. Detects the kind (OCI layout
 * directory, OCI archive tar, docker-archive tar, old or docker 25+ layout) and gives one
 * ImageSource per image and name it holds. Tars are indexed once and read in place: nothing is
 * extracted (a gzip-compressed archive is decompressed to one temporary file, under opts.tmpDir).
 */
import { createReadStream, createWriteStream } from "node:fs";
import { mkdtemp, open, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import type { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { createGunzip } from "node:zlib";
import { KilnError } from "../errors.js";
import { formatReference, type ImageRef, parseReference } from "../reference/reference.js";
import type { Descriptor } from "../registry/manifest.js";
import type { Platform } from "../registry/platform.js";
import { scanTar } from "../tar/scan.js";
import { type ArchiveFiles, DirFiles, TarFiles } from "./archive-files.js";
import type { ArchiveImage } from "./archive-image.js";
import {
  DOCKER_MANIFEST_FILE,
  type DockerImage,
  dockerImages,
  readDockerManifest,
} from "./docker-archive.js";
import { OCI_INDEX_FILE, OCI_LAYOUT_FILE, ociImages, readOciIndex } from "./oci-layout.js";
import type { ImageSource, OpenBlobOptions, ResolvedImage } from "./types.js";

export interface OpenArchiveOptions {
  /**
   * Names the imported image (`--tag`). With several images in the archive it must be one of
   * their names (or, for OCI bare tags like `1.0`, have that tag): it then picks that image.
   */
  readonly tag?: string | undefined;
  /**
   * A directory where a gzip-compressed archive may be decompressed to a temporary copy (deleted
   * when the last source is closed). Without it, compressed archives are refused.
   */
  readonly tmpDir?: string | undefined;
}

/** Detects the archive kind and returns one ImageSource per image (and name) it holds. */
export async function openArchive(path: string, opts: OpenArchiveOptions = {}): Promise<ImageSource[]> {
  const tag = opts.tag === undefined ? undefined : parseTag(opts.tag);
  let isDir: boolean;
  try {
    isDir = (await stat(path)).isDirectory();
  } catch (err) {
    if (
      (err as NodeJS.ErrnoException).code === "ENOENT" ||
      (err as NodeJS.ErrnoException).code === "ENOTDIR"
    ) {
      throw new KilnError("NOT_FOUND", `no such archive: ${path}`, { cause: err });
    }
    throw err;
  }
  const files = isDir ? new DirFiles(path) : await openTar(path, opts.tmpDir);
  try {
    const { origin, images } = await loadImages(files, isDir);
    if (images.length === 0) throw new KilnError("INVALID_ARCHIVE", `${path}: the archive holds no image`);
    const shared = new SharedFiles(files);
    return nameSources(origin, images, tag).map(
      ({ image, ref, label }) => new ArchiveImageSource(label, image, ref, shared),
    );
  } catch (err) {
    await files.close();
    throw err;
  }
}

function parseTag(text: string): ImageRef {
  const ref = parseReference(text);
  if (ref.digest !== undefined) {
    throw new KilnError(
      "INVALID_ARGUMENT",
      `--tag ${text}: a name cannot carry a digest; the image's digest comes from the archive`,
    );
  }
  return ref;
}

const COMPRESSED: [string, number[]][] = [
  ["zstd", [0x28, 0xb5, 0x2f, 0xfd]],
  ["xz", [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]],
  ["bzip2", [0x42, 0x5a, 0x68]],
];

/** Indexes a tar file, decompressing a gzip one to a temporary copy when the caller allows it. */
async function openTar(path: string, tmpDir: string | undefined): Promise<TarFiles> {
  const head = Buffer.alloc(6);
  const fh = await open(path, "r");
  try {
    await fh.read(head, 0, head.length, 0);
  } finally {
    await fh.close();
  }
  for (const [kind, magic] of COMPRESSED) {
    if (magic.every((b, i) => head[i] === b)) {
      throw new KilnError("INVALID_ARCHIVE", `${path}: compressed archive (${kind}): decompress it first`);
    }
  }
  if (head[0] !== 0x1f || head[1] !== 0x8b) return new TarFiles(path, await scanTar(path));
  if (tmpDir === undefined) {
    throw new KilnError("INVALID_ARCHIVE", `${path}: compressed archive (gzip): decompress it first`);
  }
  const dir = await mkdtemp(join(tmpDir, "kiln-import-"));
  const cleanup = () => rm(dir, { recursive: true, force: true });
  try {
    const copy = join(dir, "archive.tar");
    try {
      await pipeline(createReadStream(path), createGunzip(), createWriteStream(copy));
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? "";
      if (code.startsWith("Z_") || code === "ERR_INVALID_ARG_TYPE") {
        throw new KilnError(
          "INVALID_ARCHIVE",
          `${path}: corrupt or truncated gzip: ${(err as Error).message}`,
          { cause: err },
        );
      }
      throw err;
    }
    return new TarFiles(path, await scanTar(copy, { label: path }), copy, cleanup);
  } catch (err) {
    await cleanup();
    throw err;
  }
}

interface Loaded {
  readonly origin: string;
  readonly images: ArchiveImage[];
}

/**
 * An OCI layout (`oci-layout` + `index.json`) is read as such, even in a docker 25+ save, whose
 * real manifests it holds; its `manifest.json` then only adds RepoTags. Otherwise `manifest.json`
 * makes a docker archive.
 */
async function loadImages(files: ArchiveFiles, isDir: boolean): Promise<Loaded> {
  const has = async (name: string) => (await files.size(name)) !== undefined;
  const isOci = (await has(OCI_LAYOUT_FILE)) && (await has(OCI_INDEX_FILE));
  const isDocker = await has(DOCKER_MANIFEST_FILE);
  const origin = `${isDocker ? "docker-archive" : isDir ? "oci" : "oci-archive"}:${files.path}`;
  if (!isOci && !isDocker) {
    const why = (await has(OCI_INDEX_FILE))
      ? `${OCI_INDEX_FILE} without an ${OCI_LAYOUT_FILE} file`
      : `neither ${DOCKER_MANIFEST_FILE} (docker save) nor ${OCI_INDEX_FILE} (OCI layout)`;
    throw new KilnError("INVALID_ARCHIVE", `${files.path}: not an image archive: ${why}`);
  }
  const entries = isDocker ? await readDockerManifest(files) : [];
  if (!isOci) return { origin, images: dockerImages(files, entries) };

  const oci = ociImages(files, await readOciIndex(files));
  const images: ArchiveImage[] = [...oci];
  if (entries.length > 0) {
    // Match each manifest.json entry to the OCI image with its config; unmatched ones are read the docker way.
    const dockers = dockerImages(files, entries);
    const byConfig = new Map<string, DockerImage>();
    for (const d of dockers) byConfig.set(await d.configDigest(), d);
    const matched = new Set<DockerImage>();
    for (const image of oci) {
      for (const configDigest of await image.configDigests()) {
        const d = byConfig.get(configDigest);
        if (d === undefined) continue;
        matched.add(d);
        for (const name of d.names) image.addName(name);
      }
    }
    for (const d of dockers) if (!matched.has(d)) images.push(d);
  }
  return { origin, images };
}

interface Named {
  readonly image: ArchiveImage;
  readonly ref: ImageRef | undefined;
  readonly label: string;
}

function describe(image: ArchiveImage): string {
  const names = [...image.names.map(formatReference), ...image.tags];
  return names.length ? names.join(", ") : `${image.label}, untagged`;
}

/**
 * Without --tag: one source per name of each image, one unnamed source for an image without any.
 * With --tag: the one image (under that name only); with several, the one it names.
 */
function nameSources(origin: string, images: ArchiveImage[], tag: ImageRef | undefined): Named[] {
  const several = images.length > 1;
  const at = (image: ArchiveImage) => (several ? `${origin}:@${images.indexOf(image)}` : origin);
  if (tag !== undefined) {
    let pick = images;
    if (several) {
      const wanted = formatReference(tag);
      pick = images.filter((i) => i.names.some((n) => formatReference(n) === wanted));
      if (pick.length === 0) pick = images.filter((i) => tag.tag !== undefined && i.tags.includes(tag.tag));
    }
    if (pick.length !== 1) {
      throw new KilnError(
        "INVALID_ARGUMENT",
        `${origin} holds ${images.length} images (${images.map(describe).join("; ")}): --tag ${formatReference(tag)} does not name exactly one of them; give a name one of them holds to pick it`,
        { details: { images: images.map(describe) } },
      );
    }
    return [{ image: pick[0]!, ref: tag, label: at(pick[0]!) }];
  }
  return images.flatMap<Named>((image) =>
    image.names.length === 0
      ? [{ image, ref: undefined, label: at(image) }]
      : image.names.map((ref) => ({ image, ref, label: `${origin}:${formatReference(ref)}` })),
  );
}

/** The archive's files, closed when the last source using them is. */
class SharedFiles {
  private refs = 0;
  constructor(private readonly files: ArchiveFiles) {}
  acquire(): void {
    this.refs++;
  }
  async release(): Promise<void> {
    if (--this.refs === 0) await this.files.close();
  }
}

class ArchiveImageSource implements ImageSource {
  private closed = false;

  constructor(
    readonly origin: string,
    private readonly image: ArchiveImage,
    private readonly ref: ImageRef | undefined,
    private readonly shared: SharedFiles,
  ) {
    shared.acquire();
  }

  async resolve(opts: {
    platform?: Platform | undefined;
    signal?: AbortSignal | undefined;
  }): Promise<ResolvedImage> {
    this.checkOpen();
    return { ref: this.ref, ...(await this.image.resolve(opts)) };
  }

  async openBlob(desc: Descriptor, opts?: OpenBlobOptions): Promise<Readable> {
    this.checkOpen();
    return this.image.openBlob(desc, opts);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.shared.release();
  }

  private checkOpen(): void {
    if (this.closed) throw new KilnError("INTERNAL", `${this.origin}: source used after close`);
  }
}
