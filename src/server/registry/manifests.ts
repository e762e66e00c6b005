/**
 * Manifest routes. A PUT by tag records the image in the catalog through the normal ingest path (a
 * StoreSource over the blobs already pushed), one record per platform of an index; a PUT by digest
 * only stores the document (the children of an index to come, or anything pinned by digest).
 */
import { createHash } from "node:crypto";
import type { IncomingMessage } from "node:http";
import type { FastifyReply, FastifyRequest } from "fastify";
import { isKilnError } from "../../errors.js";
import { isDigest, parseDigest } from "../../reference/digest.js";
import { formatReference, type ImageRef } from "../../reference/reference.js";
import {
  type Descriptor,
  type ImageIndex,
  type ImageManifest,
  isAttestation,
  MediaType,
  parseManifest,
} from "../../registry/manifest.js";
import { formatPlatform, type Platform } from "../../registry/platform.js";
import { ingestImage } from "../../source/ingest.js";
import { findTagged, StoreSource, taggedRows } from "../../source/store-source.js";
import type { ImageRecord } from "../../store/catalog.js";
import { leasedDigests } from "../../store/leases.js";
import { leaseForPush, type RegistryContext, serialized } from "./context.js";
import { RegistryError } from "./errors.js";
import type { RepoName } from "./names.js";

/** Largest manifest accepted (the distribution spec asks registries for at least 4 MiB). */
export const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;
/** Largest stored document served back. */
const MAX_SERVED_BYTES = 16 * 1024 * 1024;
const TAG = /^[\w][\w.-]{0,127}$/;
const MANIFEST_TYPES = new Set<string>([MediaType.OCI_MANIFEST, MediaType.DOCKER_MANIFEST]);

function manifestUnknown(repo: RepoName, reference: string): RegistryError {
  return new RegistryError(
    "MANIFEST_UNKNOWN",
    `manifest ${reference} is not known in repository ${repo.path}`,
    {
      detail: { name: repo.path, reference },
    },
  );
}

/** HEAD/GET /v2/<name>/manifests/<tag|digest>. */
export async function getManifest(
  ctx: RegistryContext,
  repo: RepoName,
  reference: string,
  req: FastifyRequest,
  reply: FastifyReply,
): Promise<FastifyReply> {
  let found: { digest: string; mediaType: string | undefined } | undefined;
  if (reference.includes(":")) {
    if (!isDigest(reference)) throw new RegistryError("DIGEST_INVALID", `invalid digest "${reference}"`);
    found = await knownManifest(ctx, repo.name, parseDigest(reference).value);
  } else {
    found = await findTagged(ctx.store, repo.name, reference);
  }
  if (!found) throw manifestUnknown(repo, reference);
  let bytes: Buffer;
  try {
    bytes = await ctx.store.blobs.readBytes(found.digest, MAX_SERVED_BYTES);
  } catch (err) {
    if (isKilnError(err, "NOT_FOUND") || isKilnError(err, "INVALID_REFERENCE"))
      throw manifestUnknown(repo, reference);
    throw err;
  }
  const mediaType = found.mediaType ?? parseManifest(bytes).mediaType;
  reply
    .code(200)
    .header("content-type", mediaType)
    .header("docker-content-digest", found.digest)
    .header("content-length", String(bytes.length));
  return req.method === "HEAD" ? reply.send() : reply.send(bytes);
}

/**
 * A manifest or index the repository may serve by digest: one its images were recorded with, a
 * child of an index recorded for it (attestations too), or one pushed to it by digest in this
 * process's lifetime and still leased. Returns its media type when known.
 */
async function knownManifest(
  ctx: RegistryContext,
  name: string,
  digest: string,
): Promise<{ digest: string; mediaType: string | undefined } | undefined> {
  const rows = ctx.store.catalog.list().filter((r) => r.repository === name);
  const own = rows.find((r) => r.manifestDigest === digest);
  if (own) return { digest, mediaType: own.manifestMediaType };
  if (rows.some((r) => r.indexDigest === digest)) return { digest, mediaType: undefined };
  const pushed = ctx.pushed.get(name)?.get(digest);
  if (pushed !== undefined) {
    if (leasedDigests(ctx.store.catalog).has(digest)) return { digest, mediaType: pushed };
    ctx.pushed.get(name)?.delete(digest);
  }
  for (const index of new Set(rows.map((r) => r.indexDigest))) {
    if (index === null || !(await ctx.store.blobs.has(index))) continue;
    const doc = parseManifest(await ctx.store.blobs.readBytes(index, MAX_SERVED_BYTES));
    const child = doc.kind === "index" ? doc.manifests.find((m) => m.digest === digest) : undefined;
    if (child) return { digest, mediaType: child.mediaType };
  }
  return undefined;
}

/** PUT /v2/<name>/manifests/<tag|digest>. */
export async function putManifest(
  ctx: RegistryContext,
  repo: RepoName,
  reference: string,
  req: FastifyRequest,
  reply: FastifyReply,
): Promise<FastifyReply> {
  const bytes = await readManifestBody(req.raw);
  const digest = `sha256:${createHash("sha256").update(bytes).digest("hex")}`;
  let tag: string | undefined;
  if (reference.includes(":")) {
    let want: string;
    try {
      want = parseDigest(reference).value;
    } catch (err) {
      throw new RegistryError("DIGEST_INVALID", `invalid digest "${reference}"`, { cause: err });
    }
    if (want !== digest) {
      throw new RegistryError(
        "DIGEST_INVALID",
        `the manifest has digest ${digest}, not ${want} as its URL says`,
        {
          detail: { expected: want, actual: digest },
        },
      );
    }
  } else {
    if (!TAG.test(reference)) throw new RegistryError("MANIFEST_INVALID", `invalid tag "${reference}"`);
    tag = reference;
  }

  let doc: ImageIndex | ImageManifest;
  try {
    doc = parseManifest(bytes, req.headers["content-type"]);
  } catch (err) {
    if (isKilnError(err)) throw new RegistryError("MANIFEST_INVALID", err.message, { cause: err });
    throw err;
  }
  const referenced = doc.kind === "manifest" ? [doc.config, ...doc.layers] : doc.manifests;
  await checkReferenced(ctx, referenced);
  leaseForPush(ctx, repo.name, [digest, ...referenced.map((d) => d.digest)]);

  const pushRef: ImageRef | undefined = tag === undefined ? undefined : { ...repo.ref, tag };
  // Checked before anything is stored or recorded: a tag is for container images kiln can export.
  const platforms = pushRef ? await checkImages(ctx, pushRef, digest, doc, bytes) : [];

  if (!(await ctx.store.blobs.has(digest))) {
    const staging = await ctx.store.blobs.stage();
    try {
      await staging.writeBytes(bytes, digest);
      await staging.commit();
    } catch (err) {
      await staging.discard();
      throw err;
    }
  }
  const perRepo = ctx.pushed.get(repo.name) ?? new Map<string, string>();
  ctx.pushed.set(repo.name, perRepo);
  perRepo.set(digest, doc.mediaType);

  if (pushRef) {
    const records = await serialized(ctx.tagLocks, formatReference(pushRef), () =>
      record(ctx, pushRef, digest, doc, bytes, platforms),
    );
    ctx.log.info(
      { ref: formatReference(pushRef), digest, platforms: records.map((r) => r.platform) },
      "registry: image pushed",
    );
    if (ctx.onPushed) {
      try {
        await ctx.onPushed(records);
      } catch (err) {
        // The push itself succeeded: what follows it (a conversion) reports its own failure.
        ctx.log.warn({ err, ref: formatReference(pushRef) }, "registry: onPushed failed");
      }
    }
  }
  return reply
    .code(201)
    .header("location", `/v2/${repo.path}/manifests/${digest}`)
    .header("docker-content-digest", digest)
    .header("content-length", "0")
    .send();
}

/** Reads a manifest body whole; over MAX_MANIFEST_BYTES → 413 MANIFEST_INVALID (the rest is not read). */
async function readManifestBody(input: IncomingMessage): Promise<Buffer> {
  const tooLarge = () =>
    new RegistryError("MANIFEST_INVALID", `manifest larger than ${MAX_MANIFEST_BYTES} bytes`, {
      status: 413,
      headers: { connection: "close" },
    });
  const length = Number(input.headers["content-length"] ?? 0);
  if (length > MAX_MANIFEST_BYTES) throw tooLarge();
  return new Promise<Buffer>((resolve, reject) => {
    const chunks: Buffer[] = [];
    let n = 0;
    const onData = (chunk: Buffer) => {
      n += chunk.length;
      if (n > MAX_MANIFEST_BYTES) {
        cleanup();
        // Stop reading; the reply closes the connection.
        input.pause();
        reject(tooLarge());
        return;
      }
      chunks.push(chunk);
    };
    const onEnd = () => {
      cleanup();
      resolve(Buffer.concat(chunks, n));
    };
    const onError = (err: Error) => {
      cleanup();
      reject(err);
    };
    const cleanup = () => {
      input.off("data", onData);
      input.off("end", onEnd);
      input.off("error", onError);
    };
    input.on("data", onData);
    input.on("end", onEnd);
    input.on("error", onError);
  });
}

/** Every blob (config, layer) or child manifest a document names must be in the store, at its size. */
async function checkReferenced(ctx: RegistryContext, referenced: readonly Descriptor[]): Promise<void> {
  for (const d of referenced) {
    const digest = parseDigest(d.digest);
    if (digest.algorithm !== "sha256") {
      throw new RegistryError(
        "MANIFEST_INVALID",
        `unsupported digest ${d.digest}: kiln stores sha256 blobs only`,
      );
    }
    if (!(await ctx.store.blobs.has(d.digest))) {
      throw new RegistryError(
        "MANIFEST_BLOB_UNKNOWN",
        `blob ${d.digest} is not in the store: push it first`,
        {
          detail: { digest: d.digest },
        },
      );
    }
    if (!(await ctx.store.blobs.has(d.digest, d.size))) {
      throw new RegistryError(
        "MANIFEST_INVALID",
        `blob ${d.digest} is not ${d.size} bytes as the manifest says`,
        {
          detail: { digest: d.digest, size: d.size },
        },
      );
    }
  }
}

/**
 * The platforms a tag push records (one for a manifest, the runnable entries of an index:
 * attestations and nested indexes are skipped), each resolved once to refuse what kiln cannot
 * export (a config that is no image config, unknown layer types) before anything is recorded.
 */
async function checkImages(
  ctx: RegistryContext,
  ref: ImageRef,
  digest: string,
  doc: ImageIndex | ImageManifest,
  bytes: Buffer,
): Promise<(Platform | undefined)[]> {
  let platforms: (Platform | undefined)[] = [undefined];
  if (doc.kind === "index") {
    const seen = new Map<string, Platform>();
    for (const m of doc.manifests) {
      if (isAttestation(m) || !m.platform || !MANIFEST_TYPES.has(m.mediaType)) continue;
      const key = formatPlatform(m.platform);
      if (!seen.has(key)) seen.set(key, m.platform);
    }
    if (seen.size === 0) {
      throw new RegistryError("MANIFEST_INVALID", `index ${digest} names no platform image kiln can record`);
    }
    platforms = [...seen.values()];
  }
  for (const platform of platforms) {
    const source = new StoreSource(ctx.store, { ref, digest, mediaType: doc.mediaType, bytes });
    try {
      const image = await source.resolve({ platform });
      const diffIds = image.config.parsed.rootfs?.diff_ids ?? [];
      if (diffIds.length !== image.layers.length) {
        throw new RegistryError(
          "MANIFEST_INVALID",
          `image config ${image.config.digest} lists ${diffIds.length} layer diff IDs but manifest ${image.manifest.digest} has ${image.layers.length} layers`,
        );
      }
    } catch (err) {
      if (isKilnError(err))
        throw new RegistryError("MANIFEST_INVALID", err.message, { cause: err, detail: err.details });
      throw err;
    }
  }
  return platforms;
}

/** Records each platform's image under the tag, and drops platforms the tag held before but not now. */
async function record(
  ctx: RegistryContext,
  ref: ImageRef,
  digest: string,
  doc: ImageIndex | ImageManifest,
  bytes: Buffer,
  platforms: readonly (Platform | undefined)[],
): Promise<ImageRecord[]> {
  const records: ImageRecord[] = [];
  for (const platform of platforms) {
    const source = new StoreSource(ctx.store, { ref, digest, mediaType: doc.mediaType, bytes });
    const result = await ingestImage(ctx.store, source, { platform });
    records.push(result.image);
  }
  const formatted = formatReference(ref);
  const kept = new Set(records.map((r) => r.id));
  for (const stale of taggedRows(ctx.store.catalog, refNameOf(ref), ref.tag!)) {
    // Only rows of this exact ref: `name:tag@digest` pins stay. Their blobs are left to GC.
    if (stale.ref === formatted && !kept.has(stale.id)) ctx.store.catalog.remove(stale.id);
  }
  return records;
}

function refNameOf(ref: ImageRef): string {
  return `${ref.registry}/${ref.repository}`;
}
