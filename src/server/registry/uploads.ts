/**
 * Blob uploads of the embedded registry. Each upload is a directory `tmp/upload-<uuid>/` holding
 * the bytes received so far (`data`) and who it belongs to (`state.json`), so its status survives
 * a restart of the service. Bytes are hashed as they arrive; a finished upload whose sha256 matches
 * is renamed into blobs/sha256 (no copy), anything else is dropped.
 */
import { createHash, type Hash, randomUUID } from "node:crypto";
import { createReadStream, createWriteStream } from "node:fs";
import { mkdir, readdir, readFile, rm, stat, truncate, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import type { Store } from "../../store/store.js";
import { RegistryError } from "./errors.js";

/** Uploads nobody touched for this long are removed when the registry starts. */
export const STALE_UPLOAD_MS = 24 * 60 * 60 * 1000;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const PREFIX = "upload-";

/** An inclusive byte range from a Content-Range header. */
export interface ByteRange {
  start: number;
  end: number;
}

interface UploadState {
  readonly uuid: string;
  /** The repository (`docker.io/library/myapp`) the upload was started for. */
  readonly name: string;
  offset: number;
  /** The sha256 of bytes [0, offset); undefined after a restart until rebuilt from the file. */
  hash: Hash | undefined;
}

export class Uploads {
  readonly #store: Store;
  readonly #live = new Map<string, UploadState>();
  /** One request at a time per upload: a chunk's offset is only known once the previous one ended. */
  readonly #locks = new Map<string, Promise<unknown>>();

  constructor(store: Store) {
    this.#store = store;
  }

  async start(name: string): Promise<{ uuid: string; offset: number }> {
    const uuid = randomUUID();
    const dir = this.#dir(uuid);
    await mkdir(dir, { recursive: true });
    await writeFile(join(dir, "data"), "");
    await writeFile(join(dir, "state.json"), JSON.stringify({ name, startedAt: new Date().toISOString() }));
    this.#live.set(uuid, { uuid, name, offset: 0, hash: createHash("sha256") });
    return { uuid, offset: 0 };
  }

  /** Bytes received so far. */
  status(uuid: string, name: string): Promise<number> {
    return this.#locked(uuid, async () => (await this.#load(uuid, name)).offset);
  }

  /** Appends a chunk; `range`, when given, must start where the upload is (else 416). Returns the new offset. */
  append(uuid: string, name: string, input: Readable, range: ByteRange | undefined): Promise<number> {
    return this.#locked(uuid, async () => {
      const st = await this.#load(uuid, name);
      await this.#append(st, input, range);
      return st.offset;
    });
  }

  /**
   * Ends an upload (after a last chunk, if any): the bytes must hash to `digest` (sha256), else
   * DIGEST_INVALID and the upload is dropped. The blob is published into the store; the caller
   * leases it first. Returns its size.
   */
  finish(
    uuid: string,
    name: string,
    digest: string,
    last: { input: Readable; range: ByteRange | undefined } | undefined,
  ): Promise<number> {
    return this.#locked(uuid, async () => {
      const st = await this.#load(uuid, name);
      if (last) await this.#append(st, last.input, last.range);
      const data = join(this.#dir(uuid), "data");
      const { size } = await stat(data);
      // Another writer (or a crash mid-chunk before a restart) would make the running hash wrong.
      if (st.hash === undefined || size !== st.offset) await this.#rehash(st);
      const actual = `sha256:${st.hash!.copy().digest("hex")}`;
      if (actual !== digest) {
        await this.#remove(uuid);
        throw new RegistryError(
          "DIGEST_INVALID",
          `upload ${uuid}: content (${st.offset} bytes) has digest ${actual}, not ${digest}`,
          { detail: { expected: digest, actual, size: st.offset } },
        );
      }
      await this.#store.blobs.publishFile(data, digest, st.offset);
      await this.#remove(uuid);
      return st.offset;
    });
  }

  cancel(uuid: string, name: string): Promise<void> {
    return this.#locked(uuid, async () => {
      await this.#load(uuid, name);
      await this.#remove(uuid);
    });
  }

  /** Removes uploads whose data has not changed for `maxAgeMs` (abandoned by their client). */
  async sweep(maxAgeMs: number = STALE_UPLOAD_MS, now: number = Date.now()): Promise<number> {
    let entries: string[];
    try {
      entries = await readdir(this.#store.tmpDir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return 0;
      throw err;
    }
    let removed = 0;
    for (const entry of entries) {
      if (!entry.startsWith(PREFIX) || this.#live.has(entry.slice(PREFIX.length))) continue;
      const dir = join(this.#store.tmpDir, entry);
      const mtime = await stat(join(dir, "data")).then(
        (s) => s.mtimeMs,
        () => 0,
      );
      if (now - mtime > maxAgeMs) {
        await rm(dir, { recursive: true, force: true });
        removed++;
      }
    }
    return removed;
  }

  #dir(uuid: string): string {
    return join(this.#store.tmpDir, `${PREFIX}${uuid}`);
  }

  async #locked<T>(uuid: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.#locks.get(uuid) ?? Promise.resolve();
    const run = prev.then(fn, fn);
    const tail = run.catch(() => {});
    this.#locks.set(uuid, tail);
    try {
      return await run;
    } finally {
      if (this.#locks.get(uuid) === tail) this.#locks.delete(uuid);
    }
  }

  /** The upload's state, from memory or (after a restart) from its directory. */
  async #load(uuid: string, name: string): Promise<UploadState> {
    const unknown = () =>
      new RegistryError("BLOB_UPLOAD_UNKNOWN", `no upload ${uuid} for repository ${name}`, {
        detail: { uuid },
      });
    if (!UUID.test(uuid)) throw unknown();
    let st = this.#live.get(uuid);
    if (!st) {
      let owner: unknown;
      let offset: number;
      try {
        owner = (
          JSON.parse(await readFile(join(this.#dir(uuid), "state.json"), "utf8")) as { name?: unknown }
        ).name;
        offset = (await stat(join(this.#dir(uuid), "data"))).size;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === "ENOENT" || err instanceof SyntaxError) throw unknown();
        throw err;
      }
      if (typeof owner !== "string") throw unknown();
      st = { uuid, name: owner, offset, hash: undefined };
      this.#live.set(uuid, st);
    }
    if (st.name !== name) throw unknown();
    return st;
  }

  async #append(st: UploadState, input: Readable, range: ByteRange | undefined): Promise<void> {
    if (range !== undefined && (range.start !== st.offset || range.end < range.start)) {
      throw new RegistryError(
        "RANGE_INVALID",
        `upload ${st.uuid}: chunk ${range.start}-${range.end} does not start at the ${st.offset} bytes received so far`,
        { headers: { range: rangeHeader(st.offset) }, detail: { offset: st.offset } },
      );
    }
    if (st.hash === undefined) await this.#rehash(st);
    const hash = st.hash!;
    const before = hash.copy();
    const start = st.offset;
    const expected = range === undefined ? undefined : range.end - range.start + 1;
    const data = join(this.#dir(st.uuid), "data");
    let n = 0;
    try {
      await pipeline(
        input,
        async function* (source: AsyncIterable<Uint8Array>) {
          for await (const chunk of source) {
            n += chunk.length;
            if (expected !== undefined && n > expected) throw sizeInvalid(st.uuid, expected, n);
            hash.update(chunk);
            yield chunk;
          }
        },
        createWriteStream(data, { flags: "a", highWaterMark: 4 << 20 }),
      );
      if (expected !== undefined && n !== expected) throw sizeInvalid(st.uuid, expected, n);
      st.offset = start + n;
    } catch (err) {
      // The chunk counts whole or not at all: the client resumes from the status it asks for.
      st.hash = before;
      st.offset = start;
      await truncate(data, start).catch(() => {});
      throw err;
    }
  }

  /** Rebuilds the running hash from the bytes on disk (after a restart). */
  async #rehash(st: UploadState): Promise<void> {
    const hash = createHash("sha256");
    let n = 0;
    for await (const chunk of createReadStream(join(this.#dir(st.uuid), "data"))) {
      hash.update(chunk as Buffer);
      n += (chunk as Buffer).length;
    }
    st.hash = hash;
    st.offset = n;
  }

  async #remove(uuid: string): Promise<void> {
    this.#live.delete(uuid);
    await rm(this.#dir(uuid), { recursive: true, force: true });
  }
}

/** The `Range` header of an upload status: the inclusive range received, `0-0` when empty (as distribution). */
export function rangeHeader(offset: number): string {
  return `0-${Math.max(0, offset - 1)}`;
}

/** `start-end` (docker) or `bytes start-end/total`; undefined when absent; malformed → 416. */
export function parseContentRange(header: string | undefined): ByteRange | undefined {
  if (header === undefined || header.trim() === "") return undefined;
  const m = /^(?:bytes[ =])?(\d+)-(\d+)(?:\/(?:\d+|\*))?$/.exec(header.trim());
  if (!m) throw new RegistryError("RANGE_INVALID", `invalid Content-Range "${header}"`);
  return { start: Number(m[1]), end: Number(m[2]) };
}

function sizeInvalid(uuid: string, expected: number, got: number): RegistryError {
  return new RegistryError(
    "SIZE_INVALID",
    `upload ${uuid}: the chunk's Content-Range announces ${expected} bytes, ${got > expected ? "more" : `${got}`} arrived`,
  );
}
