import Database from "better-sqlite3";
import { KilnError } from "../errors.js";
import { formatReference, parseReference, refName } from "../reference/reference.js";

export interface LayerRecord {
  digest: string;
  diffId: string | null;
  mediaType: string;
  size: number;
}

export interface ImageRecord {
  id: number;
  /** Normalized full reference (`docker.io/library/alpine:3.20`, `repo@sha256:…`); null for an untagged import. */
  ref: string | null;
  /** `registry/repository`, e.g. `docker.io/library/alpine`. */
  repository: string | null;
  tag: string | null;
  /** The manifest list / index the manifest came from. */
  indexDigest: string | null;
  manifestDigest: string;
  manifestMediaType: string;
  configDigest: string;
  /** `os/arch[/variant]` */
  platform: string;
  /** The raw config JSON. */
  config: string;
  /** Manifest + config + compressed layer bytes. */
  size: number;
  /** From config.created. */
  created: string | null;
  /** ISO time the image was recorded. */
  addedAt: string;
  /** Bottom first; diffId is config.rootfs.diff_ids[i], kept for verification on decompression. */
  layers: LayerRecord[];
}

const layerKey = (l: LayerRecord) => [l.digest, l.diffId, l.mediaType, l.size];

export type NewImage = Omit<ImageRecord, "id" | "addedAt"> & { addedAt?: string | undefined };

/** Several processes share one store: a writer waits this long for another's transaction. */
const BUSY_TIMEOUT_MS = 15_000;

/**
 * Schema migrations; MIGRATIONS[i] takes `PRAGMA user_version` from i to i+1.
 * layers holds what is known of each layer blob; image_layers also keeps each manifest's own
 * media type and diff ID for it, since two manifests may describe the same blob differently
 * (docker vs OCI media type) and a record must read back as it was put.
 */
const MIGRATIONS: readonly string[] = [
  `CREATE TABLE images (
     id INTEGER PRIMARY KEY,
     ref TEXT,
     repository TEXT,
     tag TEXT,
     index_digest TEXT,
     manifest_digest TEXT NOT NULL,
     manifest_media_type TEXT NOT NULL,
     config_digest TEXT NOT NULL,
     platform TEXT NOT NULL,
     config TEXT NOT NULL,
     size INTEGER NOT NULL,
     created TEXT,
     added_at TEXT NOT NULL
   );
   -- NULLs are distinct in a unique index: untagged imports are deduped by the next one.
   CREATE UNIQUE INDEX images_ref_platform ON images(ref, platform);
   CREATE UNIQUE INDEX images_untagged ON images(manifest_digest, platform) WHERE ref IS NULL;
   CREATE INDEX images_manifest_digest ON images(manifest_digest);
   CREATE INDEX images_index_digest ON images(index_digest);
   CREATE INDEX images_repository ON images(repository);
   CREATE TABLE layers (
     digest TEXT PRIMARY KEY,
     diff_id TEXT,
     media_type TEXT NOT NULL,
     size INTEGER NOT NULL
   ) WITHOUT ROWID;
   CREATE TABLE image_layers (
     image_id INTEGER NOT NULL REFERENCES images(id),
     position INTEGER NOT NULL,
     digest TEXT NOT NULL REFERENCES layers(digest),
     media_type TEXT NOT NULL,
     diff_id TEXT,
     PRIMARY KEY (image_id, position)
   ) WITHOUT ROWID;
   CREATE INDEX image_layers_digest ON image_layers(digest);`,
  // Exported filesystems, cached per (manifest digest, format, options): `key` names both.
  `CREATE TABLE artifacts (
     key TEXT PRIMARY KEY,
     manifest_digest TEXT NOT NULL,
     format TEXT NOT NULL,
     options TEXT NOT NULL,
     path TEXT NOT NULL,
     size INTEGER NOT NULL,
     created_at TEXT NOT NULL
   ) WITHOUT ROWID;
   CREATE INDEX artifacts_manifest ON artifacts(manifest_digest);`,
  // Service builds (kiln serve): one row per requested (name, format, options, platform), kept after
  // it ends so `kiln images` shows it; `seq` orders the FIFO queue. Leases pin blobs that an
  // operation in flight relies on but no image records yet, so GC leaves them alone.
  `CREATE TABLE builds (
     id INTEGER PRIMARY KEY,
     name TEXT NOT NULL,
     format TEXT NOT NULL,
     options TEXT NOT NULL,
     platform TEXT NOT NULL,
     status TEXT NOT NULL,
     seq INTEGER NOT NULL,
     manifest_digest TEXT,
     artifact_key TEXT,
     size INTEGER,
     error_code TEXT,
     error_message TEXT,
     created_at TEXT NOT NULL,
     updated_at TEXT NOT NULL
   );
   CREATE UNIQUE INDEX builds_request ON builds(name, format, options, platform);
   CREATE INDEX builds_status_seq ON builds(status, seq);
   CREATE TABLE leases (
     holder TEXT NOT NULL,
     digest TEXT NOT NULL,
     expires_at INTEGER NOT NULL,
     PRIMARY KEY (holder, digest)
   ) WITHOUT ROWID;
   CREATE INDEX leases_digest ON leases(digest);`,
];

/** An exported filesystem in the store's cache. */
export interface ArtifactRecord {
  /** Hex digest of (manifest digest, format, options); also its file name under artifacts/. */
  key: string;
  manifestDigest: string;
  format: string;
  /** The options, as canonical JSON. */
  options: string;
  /** Relative to the store root. */
  path: string;
  size: number;
  createdAt: string;
}

interface ImageRow {
  id: number;
  ref: string | null;
  repository: string | null;
  tag: string | null;
  index_digest: string | null;
  manifest_digest: string;
  manifest_media_type: string;
  config_digest: string;
  platform: string;
  config: string;
  size: number;
  created: string | null;
  added_at: string;
}

interface LayerRow {
  image_id: number;
  digest: string;
  diff_id: string | null;
  media_type: string;
  size: number;
}

const LAYERS_SQL = `SELECT il.image_id, il.digest, il.diff_id, il.media_type, l.size
  FROM image_layers il JOIN layers l ON l.digest = il.digest`;

/**
 * The image catalog: one SQLite file (WAL, so readers never wait for a writer) shared by every
 * kiln process using the store. Writes are short IMMEDIATE transactions; others wait up to
 * BUSY_TIMEOUT_MS for them.
 */
export class Catalog {
  readonly file: string;
  readonly #db: Database.Database;

  private constructor(file: string, db: Database.Database) {
    this.file = file;
    this.#db = db;
  }

  static open(file: string): Catalog {
    let db: Database.Database | undefined;
    try {
      db = new Database(file, { timeout: BUSY_TIMEOUT_MS });
      enableWal(db);
      db.pragma("foreign_keys = ON");
      migrate(db, file);
      return new Catalog(file, db);
    } catch (err) {
      db?.close();
      throw storeError(file, err);
    }
  }

  /**
   * Records an image in one transaction. A row with the same (ref, platform) — or, for an untagged
   * import, the same (manifestDigest, platform) — is replaced: the tag moved. Re-recording the same
   * manifest keeps the row's id.
   */
  putImage(input: NewImage): ImageRecord {
    const addedAt = input.addedAt ?? new Date().toISOString();
    // A warm pull records what is already there: answer from a read and skip the write (and its
    // fsyncs), which is most of what such a pull costs after start-up.
    const current = this.#sameImage(input);
    if (current) return current;
    return this.#guard(() =>
      this.#db
        .transaction(() => {
          const db = this.#db;
          const existing = (
            input.ref !== null
              ? db
                  .prepare("SELECT id, manifest_digest FROM images WHERE ref = ? AND platform = ?")
                  .get(input.ref, input.platform)
              : db
                  .prepare(
                    "SELECT id, manifest_digest FROM images WHERE ref IS NULL AND manifest_digest = ? AND platform = ?",
                  )
                  .get(input.manifestDigest, input.platform)
          ) as { id: number; manifest_digest: string } | undefined;
          const oldLayers = existing ? this.#dropLayers(existing.id) : [];
          const values = {
            ref: input.ref,
            repository: input.repository,
            tag: input.tag,
            index_digest: input.indexDigest,
            manifest_digest: input.manifestDigest,
            manifest_media_type: input.manifestMediaType,
            config_digest: input.configDigest,
            platform: input.platform,
            config: input.config,
            size: input.size,
            created: input.created,
            added_at: addedAt,
          };
          let id: number;
          if (existing && existing.manifest_digest === input.manifestDigest) {
            id = existing.id;
            db.prepare(
              `UPDATE images SET ref = @ref, repository = @repository, tag = @tag, index_digest = @index_digest,
                 manifest_digest = @manifest_digest, manifest_media_type = @manifest_media_type,
                 config_digest = @config_digest, platform = @platform, config = @config, size = @size,
                 created = @created, added_at = @added_at WHERE id = @id`,
            ).run({ ...values, id });
          } else {
            if (existing) db.prepare("DELETE FROM images WHERE id = ?").run(existing.id);
            const result = db
              .prepare(
                `INSERT INTO images (ref, repository, tag, index_digest, manifest_digest, manifest_media_type,
                   config_digest, platform, config, size, created, added_at)
                 VALUES (@ref, @repository, @tag, @index_digest, @manifest_digest, @manifest_media_type,
                   @config_digest, @platform, @config, @size, @created, @added_at)`,
              )
              .run(values);
            id = Number(result.lastInsertRowid);
          }
          const upsertLayer = db.prepare(
            `INSERT INTO layers (digest, diff_id, media_type, size) VALUES (?, ?, ?, ?)
             ON CONFLICT (digest) DO UPDATE SET diff_id = coalesce(layers.diff_id, excluded.diff_id)`,
          );
          const link = db.prepare(
            "INSERT INTO image_layers (image_id, position, digest, media_type, diff_id) VALUES (?, ?, ?, ?, ?)",
          );
          input.layers.forEach((l, i) => {
            upsertLayer.run(l.digest, l.diffId, l.mediaType, l.size);
            link.run(id, i, l.digest, l.mediaType, l.diffId);
          });
          this.#pruneLayers(oldLayers);
          return this.#get(id)!;
        })
        .immediate(),
    );
  }

  /** The stored record that `input` would write again unchanged, if there is one. */
  #sameImage(input: NewImage): ImageRecord | undefined {
    if (input.ref === null) return undefined;
    const row = this.#guard(
      () =>
        this.#db
          .prepare("SELECT id FROM images WHERE ref = ? AND platform = ? AND manifest_digest = ?")
          .get(input.ref, input.platform, input.manifestDigest) as { id: number } | undefined,
    );
    const current = row ? this.get(row.id) : undefined;
    if (!current) return undefined;
    const same =
      current.indexDigest === input.indexDigest &&
      current.manifestMediaType === input.manifestMediaType &&
      current.configDigest === input.configDigest &&
      current.repository === input.repository &&
      current.tag === input.tag &&
      current.config === input.config &&
      current.size === input.size &&
      current.created === input.created &&
      JSON.stringify(current.layers.map(layerKey)) === JSON.stringify(input.layers.map(layerKey));
    return same ? current : undefined;
  }
  /** Every image, sorted by ref (untagged last) then platform. */
  list(): ImageRecord[] {
    return this.#guard(() =>
      this.#db.transaction(() => {
        const rows = this.#db
          .prepare("SELECT * FROM images ORDER BY ref IS NULL, ref, platform, id")
          .all() as ImageRow[];
        const layers = this.#db
          .prepare(`${LAYERS_SQL} ORDER BY il.image_id, il.position`)
          .all() as LayerRow[];
        const byImage = new Map<number, LayerRecord[]>();
        for (const l of layers) {
          const list = byImage.get(l.image_id);
          if (list) list.push(toLayer(l));
          else byImage.set(l.image_id, [toLayer(l)]);
        }
        return rows.map((r) => toRecord(r, byImage.get(r.id) ?? []));
      })(),
    );
  }

  get(id: number): ImageRecord | undefined {
    return this.#guard(() => this.#db.transaction(() => this.#get(id))());
  }

  /**
   * Finds one image by (a) its stored ref, (b) a reference naming it (`alpine:3.20`, or
   * `repo@digest` matching its manifest or index digest), or (c) a unique manifest digest prefix
   * (`sha256:` optional). Several platforms of one ref: `platform`, else the host's if exactly one is.
   */
  resolve(
    arg: string,
    opts: { platform?: string | undefined; hostPlatform?: string | undefined } = {},
  ): ImageRecord {
    return this.#guard(() =>
      this.#db.transaction(() => {
        const db = this.#db;
        const found = new Map<number, ImageRow>();
        const add = (rows: unknown[]) => {
          for (const r of rows as ImageRow[]) found.set(r.id, r);
        };
        const byRef = db.prepare("SELECT * FROM images WHERE ref = ?");
        add(byRef.all(arg));
        let parseError: unknown;
        try {
          const ref = parseReference(arg);
          add(byRef.all(formatReference(ref)));
          if (ref.digest) {
            add(
              db
                .prepare(
                  "SELECT * FROM images WHERE repository = ? AND (manifest_digest = ? OR index_digest = ?)",
                )
                .all(refName(ref), ref.digest.value, ref.digest.value),
            );
          }
        } catch (err) {
          parseError = err;
        }
        if (found.size === 0) {
          const prefix = /^(?:sha256:)?([0-9a-f]{1,64})$/.exec(arg);
          if (prefix)
            add(db.prepare("SELECT * FROM images WHERE manifest_digest GLOB ?").all(`sha256:${prefix[1]}*`));
          else if (parseError !== undefined) throw parseError;
        }
        const row = choose(arg, [...found.values()], opts);
        return this.#get(row.id)!;
      })(),
    );
  }

  /** Removes an image's row (its blobs stay: see removeImages). Absent is fine. */
  remove(id: number): void {
    this.#guard(() =>
      this.#db
        .transaction(() => {
          const layers = this.#dropLayers(id);
          this.#db.prepare("DELETE FROM images WHERE id = ?").run(id);
          this.#pruneLayers(layers);
        })
        .immediate(),
    );
  }

  /** Every blob some image needs: index, manifest, config and layer digests. */
  referencedBlobs(): Set<string> {
    return this.#guard(() => {
      const rows = this.#db
        .prepare(
          `SELECT manifest_digest AS d FROM images
           UNION SELECT config_digest FROM images
           UNION SELECT index_digest FROM images WHERE index_digest IS NOT NULL
           UNION SELECT digest FROM image_layers`,
        )
        .pluck()
        .all() as string[];
      return new Set(rows);
    });
  }

  /** Records a published artifact (its file is already in place); replaces one of the same key. */
  putArtifact(a: Omit<ArtifactRecord, "createdAt"> & { createdAt?: string }): ArtifactRecord {
    const record = { ...a, createdAt: a.createdAt ?? new Date().toISOString() };
    this.#guard(() =>
      this.#db
        .prepare(
          `INSERT OR REPLACE INTO artifacts (key, manifest_digest, format, options, path, size, created_at)
           VALUES (@key, @manifestDigest, @format, @options, @path, @size, @createdAt)`,
        )
        .run(record),
    );
    return record;
  }

  getArtifact(key: string): ArtifactRecord | undefined {
    return this.#guard(
      () =>
        this.#db
          .prepare(
            `SELECT key, manifest_digest AS manifestDigest, format, options, path, size, created_at AS createdAt
             FROM artifacts WHERE key = ?`,
          )
          .get(key) as ArtifactRecord | undefined,
    );
  }

  artifactsOf(manifestDigest: string): ArtifactRecord[] {
    return this.#guard(
      () =>
        this.#db
          .prepare(
            `SELECT key, manifest_digest AS manifestDigest, format, options, path, size, created_at AS createdAt
             FROM artifacts WHERE manifest_digest = ? ORDER BY key`,
          )
          .all(manifestDigest) as ArtifactRecord[],
    );
  }

  /** Bytes of every cached artifact. */
  artifactBytes(): number {
    return this.#guard(
      () => this.#db.prepare("SELECT coalesce(sum(size), 0) FROM artifacts").pluck().get() as number,
    );
  }

  /** The config JSON of an image with this manifest, if the catalog has one. */
  configOf(manifestDigest: string): string | undefined {
    return this.#guard(
      () =>
        this.#db
          .prepare("SELECT config FROM images WHERE manifest_digest = ? LIMIT 1")
          .pluck()
          .get(manifestDigest) as string | undefined,
    );
  }

  removeArtifact(key: string): void {
    this.#guard(() => this.#db.prepare("DELETE FROM artifacts WHERE key = ?").run(key));
  }

  close(): void {
    this.#db.close();
  }

  /**
   * The connection, for the store's own modules that keep other tables in the same file (builds,
   * leases): one connection per process, so their writes and the catalog's serialize. Not public API.
   */
  get db(): Database.Database {
    return this.#db;
  }

  /** Runs `fn` with errors mapped to STORE like the catalog's own methods. */
  guard<T>(fn: () => T): T {
    return this.#guard(fn);
  }

  #get(id: number): ImageRecord | undefined {
    const row = this.#db.prepare("SELECT * FROM images WHERE id = ?").get(id) as ImageRow | undefined;
    if (!row) return undefined;
    const layers = this.#db
      .prepare(`${LAYERS_SQL} WHERE il.image_id = ? ORDER BY il.position`)
      .all(id) as LayerRow[];
    return toRecord(row, layers.map(toLayer));
  }

  /** Unlinks an image's layers; returns their digests for #pruneLayers. */
  #dropLayers(id: number): string[] {
    const digests = this.#db
      .prepare("SELECT DISTINCT digest FROM image_layers WHERE image_id = ?")
      .pluck()
      .all(id) as string[];
    this.#db.prepare("DELETE FROM image_layers WHERE image_id = ?").run(id);
    return digests;
  }

  /** Forgets layer rows no image uses any more. */
  #pruneLayers(digests: string[]): void {
    const prune = this.#db.prepare(
      "DELETE FROM layers WHERE digest = ? AND NOT EXISTS (SELECT 1 FROM image_layers WHERE digest = ?)",
    );
    for (const d of digests) prune.run(d, d);
  }

  #guard<T>(fn: () => T): T {
    try {
      return fn();
    } catch (err) {
      throw storeError(this.file, err);
    }
  }
}

/**
 * Puts the catalog in WAL mode. Switching needs a moment alone with the file, and SQLite answers
 * SQLITE_BUSY at once (its busy timeout does not cover it) when another process is creating the
 * same new store: so retry briefly. A catalog already in WAL mode is left as it is.
 */
function enableWal(db: Database.Database): void {
  const deadline = Date.now() + BUSY_TIMEOUT_MS;
  const pause = new Int32Array(new SharedArrayBuffer(4));
  for (;;) {
    try {
      if (db.pragma("journal_mode", { simple: true }) === "wal") return;
      if (db.pragma("journal_mode = WAL", { simple: true }) === "wal") return;
    } catch (err) {
      if ((err as { code?: string }).code !== "SQLITE_BUSY") throw err;
    }
    if (Date.now() > deadline)
      throw new KilnError("STORE", "catalog: cannot switch to WAL mode: database is locked");
    Atomics.wait(pause, 0, 0, 10 + Math.floor(Math.random() * 20));
  }
}

function migrate(db: Database.Database, file: string): void {
  // IMMEDIATE and re-reading the version inside: two processes opening a new store at once
  // must not both run a migration.
  db.transaction(() => {
    const version = db.pragma("user_version", { simple: true }) as number;
    if (version > MIGRATIONS.length) {
      throw new KilnError(
        "STORE",
        `catalog ${file} has schema version ${version}, newer than this kiln knows (${MIGRATIONS.length}); upgrade kiln`,
      );
    }
    for (let v = version; v < MIGRATIONS.length; v++) db.exec(MIGRATIONS[v]!);
    if (version !== MIGRATIONS.length) db.pragma(`user_version = ${MIGRATIONS.length}`);
  }).immediate();
}

/** Narrows candidates by platform; one result or AMBIGUOUS_REF / NOT_FOUND. */
function choose(
  arg: string,
  rows: ImageRow[],
  opts: { platform?: string | undefined; hostPlatform?: string | undefined },
): ImageRow {
  if (rows.length === 0) {
    throw new KilnError("NOT_FOUND", `no image matches "${arg}" in the store`, { details: { arg } });
  }
  let candidates = rows;
  if (opts.platform !== undefined) {
    const want = opts.platform;
    candidates = candidates.filter((r) => platformMatches(want, r.platform));
    if (candidates.length === 0) {
      const have = [...new Set(rows.map((r) => r.platform))].sort();
      throw new KilnError(
        "NOT_FOUND",
        `no image matches "${arg}" for platform ${want} in the store (it has ${have.join(", ")})`,
        { details: { arg, platform: want, platforms: have } },
      );
    }
    const exact = candidates.filter((r) => r.platform === want);
    if (candidates.length > 1 && exact.length === 1) candidates = exact;
  }
  if (
    candidates.length > 1 &&
    opts.hostPlatform !== undefined &&
    new Set(candidates.map((r) => r.ref)).size === 1
  ) {
    const host = opts.hostPlatform;
    const onHost = candidates.filter((r) => platformMatches(host, r.platform));
    if (onHost.length === 1) candidates = onHost;
  }
  if (candidates.length > 1) {
    const list = candidates.map(
      (r) => `${r.ref ?? "(untagged)"} (${r.platform}, ${r.manifest_digest.slice(0, "sha256:".length + 12)})`,
    );
    throw new KilnError("AMBIGUOUS_REF", `"${arg}" matches ${candidates.length} images: ${list.join(", ")}`, {
      details: {
        arg,
        candidates: candidates.map((r) => ({
          id: r.id,
          ref: r.ref,
          platform: r.platform,
          manifestDigest: r.manifest_digest,
        })),
      },
    });
  }
  return candidates[0]!;
}

/**
 * `os/arch[/variant]` matching without the registry module (which sits above the store): a side
 * without a variant matches any variant, as containerd's matcher does.
 */
function platformMatches(want: string, have: string): boolean {
  const [wos, warch, wvar] = want.split("/");
  const [hos, harch, hvar] = have.split("/");
  return wos === hos && warch === harch && (wvar === undefined || hvar === undefined || wvar === hvar);
}

function toRecord(r: ImageRow, layers: LayerRecord[]): ImageRecord {
  return {
    id: r.id,
    ref: r.ref,
    repository: r.repository,
    tag: r.tag,
    indexDigest: r.index_digest,
    manifestDigest: r.manifest_digest,
    manifestMediaType: r.manifest_media_type,
    configDigest: r.config_digest,
    platform: r.platform,
    config: r.config,
    size: r.size,
    created: r.created,
    addedAt: r.added_at,
    layers,
  };
}

function toLayer(l: LayerRow): LayerRecord {
  return { digest: l.digest, diffId: l.diff_id, mediaType: l.media_type, size: l.size };
}

/** SQLite failures (busy past the timeout, disk full, corrupt file) as one STORE line. */
function storeError(file: string, err: unknown): KilnError {
  if (err instanceof KilnError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new KilnError("STORE", `catalog ${file}: ${message}`, { cause: err });
}
