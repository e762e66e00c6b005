/** Blob routes: HEAD/GET of a blob, and uploads (monolithic, chunked, resumable, cross-repository mount). */
import { type FileHandle, open } from "node:fs/promises";
import type { FastifyReply, FastifyRequest } from "fastify";
import { type Digest, parseDigest } from "../../reference/digest.js";
import { hasBody, leaseForPush, queryParam, type RegistryContext } from "./context.js";
import { RegistryError } from "./errors.js";
import type { RepoName } from "./names.js";
import { parseContentRange, rangeHeader } from "./uploads.js";

/** A digest from a URL: malformed → DIGEST_INVALID; the store keeps sha256 only. */
export function sha256Param(text: string | undefined, what: string): Digest {
  if (text === undefined || text === "")
    throw new RegistryError("DIGEST_INVALID", `${what}: no digest given`);
  let d: Digest;
  try {
    d = parseDigest(text);
  } catch (err) {
    throw new RegistryError("DIGEST_INVALID", `${what}: ${(err as Error).message}`, { cause: err });
  }
  if (d.algorithm !== "sha256") {
    throw new RegistryError(
      "DIGEST_INVALID",
      `${what}: unsupported digest "${text}": kiln stores sha256 blobs only`,
    );
  }
  return d;
}

function blobLocation(repo: RepoName, digest: string): string {
  return `/v2/${repo.path}/blobs/${digest}`;
}

function uploadLocation(repo: RepoName, uuid: string): string {
  return `/v2/${repo.path}/blobs/uploads/${uuid}`;
}

/** HEAD/GET /v2/<name>/blobs/<digest>; GET honours a single byte range (206). */
export async function getBlob(
  ctx: RegistryContext,
  repo: RepoName,
  ref: string,
  req: FastifyRequest,
  reply: FastifyReply,
): Promise<FastifyReply> {
  let digest: Digest;
  try {
    digest = parseDigest(ref);
  } catch (err) {
    throw new RegistryError("DIGEST_INVALID", `invalid digest "${ref}"`, { cause: err });
  }
  const unknown = () =>
    new RegistryError("BLOB_UNKNOWN", `blob ${digest.value} is not in the store`, {
      detail: { digest: digest.value },
    });
  if (digest.algorithm !== "sha256") throw unknown();
  let fh: FileHandle;
  try {
    fh = await open(ctx.store.blobs.path(digest.value), "r");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") throw unknown();
    throw err;
  }
  let size: number;
  try {
    size = (await fh.stat()).size;
  } catch (err) {
    await fh.close();
    throw err;
  }
  reply.header("docker-content-digest", digest.value).header("accept-ranges", "bytes");
  reply.header("content-type", "application/octet-stream");
  if (req.method === "HEAD") {
    await fh.close();
    // A pusher that finds the blob here will not upload it: pin it until its manifest arrives.
    leaseForPush(ctx, repo.name, [digest.value]);
    return reply.header("content-length", String(size)).code(200).send();
  }
  const range = byteRange(req.headers.range, size);
  if (range === "unsatisfiable") {
    await fh.close();
    throw new RegistryError(
      "RANGE_INVALID",
      `range ${req.headers.range} is outside blob ${digest.value} (${size} bytes)`,
      {
        headers: { "content-range": `bytes */${size}` },
      },
    );
  }
  if (range === undefined) {
    return reply.code(200).header("content-length", String(size)).send(fh.createReadStream());
  }
  return reply
    .code(206)
    .header("content-length", String(range.end - range.start + 1))
    .header("content-range", `bytes ${range.start}-${range.end}/${size}`)
    .send(fh.createReadStream({ start: range.start, end: range.end }));
}

/**
 * A single `bytes=a-b`, `bytes=a-` or `bytes=-n` range, clamped to the blob; undefined to send the
 * whole blob (no header, several ranges, another unit).
 */
function byteRange(
  header: string | undefined,
  size: number,
): { start: number; end: number } | "unsatisfiable" | undefined {
  if (header === undefined) return undefined;
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!m || (m[1] === "" && m[2] === "")) return undefined;
  let start: number;
  let end: number;
  if (m[1] === "") {
    const n = Number(m[2]);
    if (n === 0) return "unsatisfiable";
    start = Math.max(0, size - n);
    end = size - 1;
  } else {
    start = Number(m[1]);
    end = m[2] === "" ? size - 1 : Math.min(Number(m[2]), size - 1);
  }
  if (start >= size || end < start) return "unsatisfiable";
  return { start, end };
}

/** POST /v2/<name>/blobs/uploads/: `?digest=` (monolithic), `?mount=&from=`, else a new upload. */
export async function startUpload(
  ctx: RegistryContext,
  repo: RepoName,
  req: FastifyRequest,
  reply: FastifyReply,
): Promise<FastifyReply> {
  const mount = queryParam(req, "mount");
  if (mount !== undefined) {
    const d = sha256Param(mount, "cross-repository mount");
    // The store is content-addressed and shared by every repository: a blob held is mountable.
    if (await ctx.store.blobs.has(d.value)) {
      leaseForPush(ctx, repo.name, [d.value]);
      return reply
        .code(201)
        .header("location", blobLocation(repo, d.value))
        .header("docker-content-digest", d.value)
        .header("content-length", "0")
        .send();
    }
  }
  const monolithic = queryParam(req, "digest");
  if (monolithic !== undefined) {
    const d = sha256Param(monolithic, "monolithic upload");
    leaseForPush(ctx, repo.name, [d.value]);
    const length = req.headers["content-length"];
    const staging = await ctx.store.blobs.stage();
    try {
      await staging.write(
        {
          digest: d.value,
          size: length === undefined ? undefined : Number(length),
          what: `upload of ${d.value}`,
        },
        req.raw,
      );
      await staging.commit();
    } catch (err) {
      await staging.discard();
      throw err;
    }
    return reply
      .code(201)
      .header("location", blobLocation(repo, d.value))
      .header("docker-content-digest", d.value)
      .header("content-length", "0")
      .send();
  }
  const { uuid } = await ctx.uploads.start(repo.name);
  return uploadReply(reply.code(202), repo, uuid, 0);
}

function uploadReply(reply: FastifyReply, repo: RepoName, uuid: string, offset: number): FastifyReply {
  return reply
    .header("location", uploadLocation(repo, uuid))
    .header("range", rangeHeader(offset))
    .header("docker-upload-uuid", uuid)
    .header("content-length", "0")
    .send();
}

/** GET (status), PATCH (chunk), PUT (finish) and DELETE (cancel) of /v2/<name>/blobs/uploads/<uuid>. */
export async function upload(
  ctx: RegistryContext,
  repo: RepoName,
  uuid: string,
  req: FastifyRequest,
  reply: FastifyReply,
): Promise<FastifyReply> {
  switch (req.method) {
    case "GET":
    case "HEAD": {
      const offset = await ctx.uploads.status(uuid, repo.name);
      return uploadReply(reply.code(204), repo, uuid, offset);
    }
    case "PATCH": {
      const range = parseContentRange(req.headers["content-range"]);
      const offset = await ctx.uploads.append(uuid, repo.name, req.raw, range);
      return uploadReply(reply.code(202), repo, uuid, offset);
    }
    case "PUT": {
      const d = sha256Param(queryParam(req, "digest"), `upload ${uuid}`);
      const last = hasBody(req)
        ? { input: req.raw, range: parseContentRange(req.headers["content-range"]) }
        : undefined;
      // Pinned before it is published, so no GC pass sees it unreferenced in between.
      leaseForPush(ctx, repo.name, [d.value]);
      const size = await ctx.uploads.finish(uuid, repo.name, d.value, last);
      ctx.log.debug({ repository: repo.name, digest: d.value, size }, "registry: blob uploaded");
      return reply
        .code(201)
        .header("location", blobLocation(repo, d.value))
        .header("docker-content-digest", d.value)
        .header("content-length", "0")
        .send();
    }
    case "DELETE":
      await ctx.uploads.cancel(uuid, repo.name);
      return reply.code(204).send();
    default:
      throw unsupported(req.method, "an upload");
  }
}

export function unsupported(method: string, what: string): RegistryError {
  return new RegistryError("UNSUPPORTED", `${method} is not supported on ${what}`);
}
