/**
 * Service builds in the catalog file: one row per requested (name, format, options, platform).
 * Rows survive the process, so a restarted service re-queues what a crash interrupted and `kiln
 * images` shows service-built images. The queue is FIFO by `seq`; every state change is one short
 * transaction.
 */
import type { Catalog } from "./catalog.js";

export type BuildStatus = "pending" | "pulling" | "converting" | "ready" | "failed";

export const UNFINISHED: readonly BuildStatus[] = ["pending", "pulling", "converting"];

export interface BuildRow {
  id: number;
  /** Normalized reference, as requested. */
  name: string;
  format: string;
  /** Export options as canonical JSON. */
  options: string;
  /** `os/arch[/variant]` */
  platform: string;
  status: BuildStatus;
  /** Queue order: smaller runs first. */
  seq: number;
  manifestDigest: string | null;
  artifactKey: string | null;
  /** Artifact bytes, once ready. */
  size: number | null;
  errorCode: string | null;
  errorMessage: string | null;
  createdAt: string;
  updatedAt: string;
}

export interface BuildRequest {
  name: string;
  format: string;
  options: string;
  platform: string;
}

const COLUMNS = `id, name, format, options, platform, status, seq, manifest_digest AS manifestDigest,
  artifact_key AS artifactKey, size, error_code AS errorCode, error_message AS errorMessage,
  created_at AS createdAt, updated_at AS updatedAt`;

export class Builds {
  readonly #catalog: Catalog;

  constructor(catalog: Catalog) {
    this.#catalog = catalog;
  }

  /**
   * Queues a build, or joins the one already asked for: an unfinished or ready row is returned as
   * it is (`joined`), a failed one is queued again at the end.
   */
  request(req: BuildRequest): { build: BuildRow; joined: boolean } {
    return this.#tx(() => {
      const db = this.#catalog.db;
      const now = new Date().toISOString();
      const existing = db
        .prepare(
          `SELECT ${COLUMNS} FROM builds WHERE name = ? AND format = ? AND options = ? AND platform = ?`,
        )
        .get(req.name, req.format, req.options, req.platform) as BuildRow | undefined;
      if (existing && existing.status !== "failed") return { build: existing, joined: true };
      if (existing) {
        this.#requeue(existing.id, now);
        return { build: this.#get(existing.id)!, joined: false };
      }
      const info = db
        .prepare(
          `INSERT INTO builds (name, format, options, platform, status, seq, created_at, updated_at)
           VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)`,
        )
        .run(req.name, req.format, req.options, req.platform, this.#nextSeq(), now, now);
      return { build: this.#get(Number(info.lastInsertRowid))!, joined: false };
    });
  }

  /** Queues a ready or failed build again, at the end (its image changed). */
  requeue(id: number): BuildRow | undefined {
    return this.#tx(() => {
      this.#requeue(id, new Date().toISOString());
      return this.#get(id);
    });
  }

  get(id: number): BuildRow | undefined {
    return this.#catalog.guard(() => this.#get(id));
  }

  /** Every build, oldest request first. */
  list(): BuildRow[] {
    return this.#catalog.guard(
      () => this.#catalog.db.prepare(`SELECT ${COLUMNS} FROM builds ORDER BY id`).all() as BuildRow[],
    );
  }

  /** The builds of one normalized name. */
  byName(name: string): BuildRow[] {
    return this.#catalog.guard(
      () =>
        this.#catalog.db
          .prepare(`SELECT ${COLUMNS} FROM builds WHERE name = ? ORDER BY id`)
          .all(name) as BuildRow[],
    );
  }

  /** The builds whose manifest digest starts with `prefix` (`sha256:…` or bare hex). */
  byDigestPrefix(prefix: string): BuildRow[] {
    const full = prefix.startsWith("sha256:") ? prefix : `sha256:${prefix}`;
    return this.#catalog.guard(
      () =>
        this.#catalog.db
          .prepare(`SELECT ${COLUMNS} FROM builds WHERE substr(manifest_digest, 1, ?) = ? ORDER BY id`)
          .all(full.length, full) as BuildRow[],
    );
  }

  /**
   * 1 + the unfinished builds requested before this one, for a pending build (1: next to start);
   * 0 while it runs; null once it ended. Builds start in `seq` order, so it only ever decreases.
   */
  position(build: BuildRow): number | null {
    if (build.status === "ready" || build.status === "failed") return null;
    if (build.status !== "pending") return 0;
    return this.#catalog.guard(() => {
      const ahead = this.#catalog.db
        .prepare(
          `SELECT count(*) FROM builds WHERE seq < ? AND status IN ('pending', 'pulling', 'converting')`,
        )
        .pluck()
        .get(build.seq) as number;
      return ahead + 1;
    });
  }

  /** Takes the first pending build (→ `pulling`), or undefined when none waits. */
  claimNext(): BuildRow | undefined {
    return this.#tx(() => {
      const next = this.#catalog.db
        .prepare(`SELECT ${COLUMNS} FROM builds WHERE status = 'pending' ORDER BY seq LIMIT 1`)
        .get() as BuildRow | undefined;
      if (!next) return undefined;
      this.#update(next.id, { status: "pulling" });
      return this.#get(next.id);
    });
  }

  /** Moves a build on; fields left out keep their value. */
  update(
    id: number,
    fields: Partial<
      Pick<BuildRow, "status" | "manifestDigest" | "artifactKey" | "size" | "errorCode" | "errorMessage">
    >,
  ): BuildRow | undefined {
    return this.#tx(() => {
      this.#update(id, fields);
      return this.#get(id);
    });
  }

  /** After a crash: builds that were running go back to pending, keeping their place. */
  recover(): BuildRow[] {
    return this.#tx(() => {
      const rows = this.#catalog.db
        .prepare(`SELECT ${COLUMNS} FROM builds WHERE status IN ('pulling', 'converting') ORDER BY seq`)
        .all() as BuildRow[];
      for (const r of rows) this.#update(r.id, { status: "pending" });
      return rows;
    });
  }

  delete(id: number): void {
    this.#catalog.guard(() => this.#catalog.db.prepare("DELETE FROM builds WHERE id = ?").run(id));
  }

  /** Artifact keys some build still needs (GC roots). */
  artifactKeys(): Set<string> {
    return this.#catalog.guard(
      () =>
        new Set(
          this.#catalog.db
            .prepare("SELECT artifact_key FROM builds WHERE artifact_key IS NOT NULL AND status = 'ready'")
            .pluck()
            .all() as string[],
        ),
    );
  }

  #get(id: number): BuildRow | undefined {
    return this.#catalog.db.prepare(`SELECT ${COLUMNS} FROM builds WHERE id = ?`).get(id) as
      | BuildRow
      | undefined;
  }

  #nextSeq(): number {
    return (this.#catalog.db.prepare("SELECT coalesce(max(seq), 0) FROM builds").pluck().get() as number) + 1;
  }

  #requeue(id: number, now: string): void {
    this.#catalog.db
      .prepare(
        `UPDATE builds SET status = 'pending', seq = ?, error_code = NULL, error_message = NULL,
           artifact_key = NULL, size = NULL, updated_at = ? WHERE id = ?`,
      )
      .run(this.#nextSeq(), now, id);
  }

  #update(id: number, fields: Record<string, unknown>): void {
    const columns: Record<string, string> = {
      status: "status",
      manifestDigest: "manifest_digest",
      artifactKey: "artifact_key",
      size: "size",
      errorCode: "error_code",
      errorMessage: "error_message",
    };
    const sets: string[] = ["updated_at = @updatedAt"];
    const params: Record<string, unknown> = { id, updatedAt: new Date().toISOString() };
    for (const [k, v] of Object.entries(fields)) {
      if (v === undefined || !(k in columns)) continue;
      sets.push(`${columns[k]} = @${k}`);
      params[k] = v;
    }
    this.#catalog.db.prepare(`UPDATE builds SET ${sets.join(", ")} WHERE id = @id`).run(params);
  }

  #tx<T>(fn: () => T): T {
    return this.#catalog.guard(() => this.#catalog.db.transaction(fn).immediate());
  }
}
