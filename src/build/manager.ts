/**
 * The image manager behind `kiln serve`: a persistent FIFO build queue over the store. A request
 * names an image and a format; a build pulls the image (unless the store has it) and exports it
 * into the store's artifact cache. Builds live in the catalog (src/store/builds.ts), so a pending
 * image is visible at once, a restart re-queues what a crash interrupted, and an artifact is only
 * ever `ready` once it was published whole (exportArtifact renames it into place before recording).
 */
import { EventEmitter } from "node:events";
import { rm } from "node:fs/promises";
import { cpus } from "node:os";
import { join } from "node:path";
import { KilnError, toKilnError } from "../errors.js";
import { formatReference, parseReference } from "../reference/reference.js";
import { parseConfig } from "../registry/manifest.js";
import { formatPlatform, hostPlatform, parsePlatform } from "../registry/platform.js";
import { pullInto, type RegistryPullOptions } from "../source/pull.js";
import { type BuildRow, type BuildStatus, Builds, UNFINISHED } from "../store/builds.js";
import type { ImageRecord } from "../store/catalog.js";
import { openStore, removeImages, type Store } from "../store/store.js";
import {
  canonicalOptions,
  type ExportOptions,
  type ExportPrefetch,
  exportArtifact,
  prefetchFor,
} from "./export.js";
import { EXPORT_FORMATS, type ExportFormat } from "./formats.js";
import { acquireServiceLock, type ServiceLock } from "./lock.js";

/** An image as the service reports it: one requested (name, format, platform) and its build. */
export interface ServiceImage {
  id: number;
  /** Normalized reference, e.g. `docker.io/library/alpine:3.20`. */
  name: string;
  /** Manifest digest, once known. */
  digest: string | null;
  format: ExportFormat;
  platform: string;
  status: BuildStatus;
  /** Pending: 1 + unfinished builds requested before it (1: next); 0 while building; null once ended. */
  queuePosition: number | null;
  error: { code: string; message: string } | null;
  /** Artifact bytes once ready. */
  size: number | null;
  entrypoint: string[] | null;
  cmd: string[] | null;
  env: string[];
  workingDir: string;
  /** When it was requested (ISO). */
  created: string;
  updatedAt: string;
  /** Absolute path of the artifact (a file; a directory for erofs-layers) once ready. */
  artifact: string | null;
}

export interface ManagerOptions extends RegistryPullOptions {
  /** Store directory (default: KILN_ROOT, $XDG_DATA_HOME/kiln, ~/.local/share/kiln). */
  root?: string | undefined;
  /** Builds at once (default: one per two cores, at least 1). */
  concurrency?: number | undefined;
  /** Format of a request that names none, and of images pushed into the embedded registry. */
  defaultFormat?: ExportFormat | undefined;
  /** Convert images pushed into the embedded registry at once (in defaultFormat). */
  convertOnPush?: boolean | undefined;
  /**
   * `missing` (default): use the image the store holds for the name, pull only when absent (as
   * `docker run`); `always`: resolve the tag at the registry for every new build.
   */
  pullPolicy?: "missing" | "always" | undefined;
  /** Called as a build enters each phase; a returned promise holds the build there (tests, tracing). */
  onPhase?: ((image: ServiceImage) => void | Promise<void>) | undefined;
}

export interface CreateImageRequest {
  name: string;
  format?: string | undefined;
  /** `os/arch[/variant]`; default the host's. */
  platform?: string | undefined;
}

/** Events for metrics and logs. */
export interface ManagerEvents {
  finished: [{ image: ServiceImage; seconds: number }];
  pulled: [{ name: string; ok: boolean }];
}

export const defaultConcurrency = (): number => Math.max(1, Math.floor(cpus().length / 2));

export class ImageManager extends EventEmitter<ManagerEvents> {
  readonly store: Store;
  readonly concurrency: number;
  readonly defaultFormat: ExportFormat;
  readonly #builds: Builds;
  readonly #opts: ManagerOptions;
  readonly #lock: ServiceLock | undefined;
  /** Build id → abort controller of builds running in this process. */
  readonly #running = new Map<number, AbortController>();
  readonly #idle = new Set<() => void>();
  #started = false;
  #stopping = false;

  private constructor(store: Store, opts: ManagerOptions, lock: ServiceLock | undefined) {
    super();
    this.store = store;
    this.#opts = opts;
    this.#lock = lock;
    this.#builds = new Builds(store.catalog);
    this.concurrency = opts.concurrency ?? defaultConcurrency();
    this.defaultFormat = opts.defaultFormat ?? "ext4";
  }

  /**
   * Opens the store and takes its service lock (one manager runs builds per store: another
   * process's `kiln serve` on the same store → STORE error). Call `start()` to run builds.
   */
  static async open(opts: ManagerOptions = {}): Promise<ImageManager> {
    const store = await openStore(opts.root);
    try {
      const lock = await acquireServiceLock(store.root);
      return new ImageManager(store, opts, lock);
    } catch (err) {
      store.close();
      throw err;
    }
  }

  /** Re-queues what a crash interrupted and starts taking builds. */
  start(): ServiceImage[] {
    const recovered = this.recoverInterruptedBuilds();
    this.#started = true;
    this.#pump();
    return recovered;
  }

  /** Builds left `pulling` or `converting` by a process that died go back to the queue, in place. */
  recoverInterruptedBuilds(): ServiceImage[] {
    return this.#builds.recover().map((b) => this.#view({ ...b, status: "pending" }));
  }

  /** Queues a build (or joins the one already asked for) and returns at once. */
  createImage(req: CreateImageRequest): ServiceImage {
    this.#checkOpen();
    const name = normalizeName(req.name);
    const format = parseFormat(req.format ?? this.defaultFormat);
    const platform = formatPlatform(req.platform ? parsePlatform(req.platform) : hostPlatform());
    const options = canonicalOptions({ format });
    let { build } = this.#builds.request({ name, format, options, platform });
    if (build.status === "ready" && this.#stale(build)) build = this.#builds.requeue(build.id) ?? build;
    this.#pump();
    // Read again: the pump may have started it.
    return this.#view(this.#builds.get(build.id) ?? build);
  }

  /** Images pushed into the embedded registry: queued for conversion when convertOnPush is set. */
  importLocalImage(images: readonly ImageRecord[], opts: { format?: string } = {}): ServiceImage[] {
    if (!this.#opts.convertOnPush && opts.format === undefined) return [];
    return images
      .filter((i) => i.ref !== null)
      .map((i) => this.createImage({ name: i.ref!, format: opts.format, platform: i.platform }));
  }

  /** One image by name (as given or normalized) or manifest digest prefix; `format` picks among several. */
  getImage(ref: string, opts: { format?: string; platform?: string } = {}): ServiceImage {
    const matches = this.#find(ref, opts);
    if (matches.length === 1) return this.#view(matches[0]!);
    const preferred = matches.filter((b) => b.format === this.defaultFormat);
    if (opts.format === undefined && preferred.length === 1) return this.#view(preferred[0]!);
    throw new KilnError(
      "AMBIGUOUS_REF",
      `${ref} names ${matches.length} images: ${matches.map((b) => `${b.format} ${b.platform}`).join(", ")}; say which format (and platform)`,
    );
  }

  listImages(): ServiceImage[] {
    return this.#builds.list().map((b) => this.#view(b));
  }

  /**
   * Deletes an image's builds and artifacts; running ones are cancelled. Without a format, the image
   * itself leaves the store too (as `kiln rm`), along with blobs no other image uses.
   */
  async deleteImage(ref: string, opts: { format?: string; platform?: string } = {}): Promise<ServiceImage[]> {
    const matches = this.#find(ref, opts);
    const views = matches.map((b) => this.#view(b));
    for (const b of matches) {
      this.#running.get(b.id)?.abort(new KilnError("NOT_FOUND", `image ${b.name} was deleted`));
      this.#builds.delete(b.id);
    }
    const stillNeeded = this.#builds.artifactKeys();
    for (const b of matches) {
      if (b.artifactKey === null || stillNeeded.has(b.artifactKey)) continue;
      const artifact = this.store.catalog.getArtifact(b.artifactKey);
      if (!artifact) continue;
      this.store.catalog.removeArtifact(artifact.key);
      await rm(join(this.store.root, artifact.path), { recursive: true, force: true });
    }
    if (opts.format === undefined) {
      const digests = new Set(matches.map((b) => b.manifestDigest).filter((d) => d !== null));
      const images = this.store.catalog
        .list()
        .filter((i) => digests.has(i.manifestDigest) && matches.some((b) => b.name === i.ref));
      await removeImages(this.store, images);
    }
    return views;
  }

  /** Bytes of every exported filesystem in the store. */
  totalImageBytes(): number {
    return this.store.catalog.artifactBytes();
  }

  /** Bytes of every blob in the store. */
  async totalBlobBytes(): Promise<number> {
    let total = 0;
    for await (const b of this.store.blobs.list()) total += b.size;
    return total;
  }

  /** Builds queued (pending) and running. */
  queueLength(): number {
    return this.#builds.list().filter((b) => b.status === "pending").length;
  }

  /** Resolves once no build runs here and none is pending (tests, shutdown). */
  async idle(): Promise<void> {
    while (this.#running.size > 0 || (this.#started && !this.#stopping && this.queueLength() > 0)) {
      await new Promise<void>((resolve) => this.#idle.add(resolve));
    }
  }

  /**
   * Stops taking builds; waits up to `timeoutMs` for running ones, then cancels the rest, which stay
   * `pulling`/`converting` in the catalog for the next start to re-queue. Then closes the store.
   */
  async shutdown(timeoutMs = 30_000): Promise<void> {
    if (this.#stopping) return;
    this.#stopping = true;
    if (this.#running.size > 0) {
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<void>((resolve) => {
        timer = setTimeout(resolve, timeoutMs);
      });
      await Promise.race([this.idle(), timeout]);
      clearTimeout(timer);
      for (const ac of this.#running.values()) ac.abort(new KilnError("INTERNAL", "service shutting down"));
      await this.idle();
    }
    this.#lock?.release();
    this.store.close();
  }

  #checkOpen(): void {
    if (this.#stopping) throw new KilnError("STORE", "the service is shutting down");
  }

  #find(ref: string, opts: { format?: string; platform?: string }): BuildRow[] {
    let rows: BuildRow[] = [];
    try {
      rows = this.#builds.byName(normalizeName(ref));
    } catch (err) {
      if (!(err instanceof KilnError) || !/^(sha256:)?[0-9a-f]{4,64}$/.test(ref)) throw err;
    }
    if (rows.length === 0 && /^(sha256:)?[0-9a-f]{4,64}$/.test(ref)) rows = this.#builds.byDigestPrefix(ref);
    const format = opts.format === undefined ? undefined : parseFormat(opts.format);
    const platform = opts.platform === undefined ? undefined : formatPlatform(parsePlatform(opts.platform));
    rows = rows.filter(
      (b) =>
        (format === undefined || b.format === format) && (platform === undefined || b.platform === platform),
    );
    if (rows.length === 0) {
      const what = [opts.format, opts.platform].filter(Boolean).join(" ");
      throw new KilnError("NOT_FOUND", `no image ${ref}${what ? ` (${what})` : ""} in the service`);
    }
    return rows;
  }

  /** A ready build whose image moved on (tag re-pushed or re-pulled) or whose artifact is gone. */
  #stale(b: BuildRow): boolean {
    if (b.artifactKey === null || !this.store.catalog.getArtifact(b.artifactKey)) return true;
    const current = this.#localImage(b);
    return current !== undefined && current.manifestDigest !== b.manifestDigest;
  }

  #localImage(b: BuildRow): ImageRecord | undefined {
    try {
      return this.store.catalog.resolve(b.name, {
        platform: b.platform,
        hostPlatform: formatPlatform(hostPlatform()),
      });
    } catch (err) {
      if (err instanceof KilnError && (err.code === "NOT_FOUND" || err.code === "PLATFORM_NOT_FOUND")) {
        return undefined;
      }
      throw err;
    }
  }

  #pump(): void {
    if (!this.#started || this.#stopping) return;
    while (this.#running.size < this.concurrency) {
      const build = this.#builds.claimNext();
      if (!build) break;
      const ac = new AbortController();
      this.#running.set(build.id, ac);
      void this.#run(build, ac.signal).finally(() => {
        this.#running.delete(build.id);
        this.#pump();
        for (const wake of this.#idle) wake();
        this.#idle.clear();
      });
    }
  }

  async #run(build: BuildRow, signal: AbortSignal): Promise<void> {
    const started = process.hrtime.bigint();
    let row: BuildRow | undefined = build;
    let prefetch: ExportPrefetch | undefined;
    try {
      await this.#opts.onPhase?.(this.#view(build));
      let image = this.#opts.pullPolicy === "always" ? undefined : this.#localImage(build);
      if (!image) {
        // The conversion's first pass runs on each layer as it downloads.
        prefetch = prefetchFor(this.store, exportOptions(build).format);
        try {
          image = (
            await pullInto(this.store, parseReference(build.name), {
              ...this.#opts,
              platform: parsePlatform(build.platform),
              signal,
              tap: prefetch?.tap,
            })
          ).image;
          this.emit("pulled", { name: build.name, ok: true });
        } catch (err) {
          this.emit("pulled", { name: build.name, ok: false });
          throw err;
        }
      }
      signal.throwIfAborted();
      row = this.#builds.update(build.id, { status: "converting", manifestDigest: image.manifestDigest });
      if (!row) return; // deleted meanwhile
      await this.#opts.onPhase?.(this.#view(row));
      signal.throwIfAborted();
      // No output: the artifact is always the store's.
      const { artifact } = await exportArtifact(this.store, image, exportOptions(row), { prefetch });
      if (!artifact) throw new KilnError("INTERNAL", "an export without an output was not stored");
      row = this.#builds.update(build.id, {
        status: "ready",
        artifactKey: artifact.key,
        size: artifact.size,
      });
    } catch (err) {
      // Cancelled by shutdown: left as it is for the next start. Deleted: the row is gone.
      if (signal.aborted) return;
      const e = toKilnError(err);
      row = this.#builds.update(build.id, {
        status: "failed",
        errorCode: e.code,
        errorMessage: e.message.split("\n")[0]!,
      });
    } finally {
      await prefetch?.close();
    }
    if (row) {
      const seconds = Number(process.hrtime.bigint() - started) / 1e9;
      this.emit("finished", { image: this.#view(row), seconds });
    }
  }

  #view(b: BuildRow): ServiceImage {
    const config = b.manifestDigest ? this.store.catalog.configOf(b.manifestDigest) : undefined;
    const c = config ? (parseConfig(Buffer.from(config, "utf8")).config ?? {}) : {};
    let status = b.status;
    let error = b.errorCode ? { code: b.errorCode, message: b.errorMessage ?? "" } : null;
    let artifact: string | null = null;
    if (status === "ready") {
      const record = b.artifactKey ? this.store.catalog.getArtifact(b.artifactKey) : undefined;
      if (record) artifact = join(this.store.root, record.path);
      else {
        // Removed behind the service's back (kiln rm, gc): say so rather than point at nothing.
        status = "failed";
        error = { code: "NOT_FOUND", message: "the artifact was removed from the store; request it again" };
      }
    }
    return {
      id: b.id,
      name: b.name,
      digest: b.manifestDigest,
      format: b.format as ExportFormat,
      platform: b.platform,
      status,
      queuePosition: UNFINISHED.includes(status) ? this.#builds.position(b) : null,
      error,
      size: status === "ready" ? b.size : null,
      entrypoint: c.Entrypoint ?? null,
      cmd: c.Cmd ?? null,
      env: c.Env ?? [],
      workingDir: c.WorkingDir ?? "",
      created: b.createdAt,
      updatedAt: b.updatedAt,
      artifact,
    };
  }
}

function normalizeName(name: string): string {
  if (typeof name !== "string" || name === "") {
    throw new KilnError("INVALID_REFERENCE", "an image name is required");
  }
  return formatReference(parseReference(name));
}

function parseFormat(v: string): ExportFormat {
  if (!(EXPORT_FORMATS as readonly string[]).includes(v)) {
    throw new KilnError("INVALID_ARGUMENT", `unknown format "${v}"; expected ${EXPORT_FORMATS.join(", ")}`);
  }
  return v as ExportFormat;
}

/** The export options a build row keeps as canonical JSON (nulls stand for defaults). */
function exportOptions(b: BuildRow): ExportOptions {
  const o = JSON.parse(b.options) as Record<string, unknown>;
  const opts: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(o)) if (v !== null) opts[k] = v;
  return { ...opts, format: b.format as ExportFormat };
}
