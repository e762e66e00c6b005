import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { text } from "node:stream/consumers";
import { after, before, describe, it } from "node:test";
import { isKilnError } from "../../src/errors.js";
import { BlobStore } from "../../src/store/blobs.js";

const sha = (b: Buffer | string) => `sha256:${createHash("sha256").update(b).digest("hex")}`;

/** Yields `data` in chunks of `size` bytes. */
async function* chunks(data: Buffer, size: number): AsyncIterable<Uint8Array> {
  for (let i = 0; i < data.length; i += size) yield data.subarray(i, i + size);
}

describe("BlobStore", () => {
  let root: string;
  let blobs: BlobStore;
  before(async () => {
    root = await mkdtemp(join(tmpdir(), "kiln-blobs-"));
    blobs = new BlobStore(root);
  });
  after(async () => {
    await rm(root, { recursive: true, force: true });
  });

  const blobFiles = async () => readdir(join(root, "blobs", "sha256")).catch(() => [] as string[]);
  const tmpEntries = async () => readdir(join(root, "tmp")).catch(() => [] as string[]);

  it("path validates the digest and accepts sha256 only", () => {
    const d = sha("x");
    assert.equal(blobs.path(d), join(root, "blobs", "sha256", d.slice(7)));
    assert.throws(
      () => blobs.path("sha256:../../etc/passwd"),
      (e) => isKilnError(e, "INVALID_REFERENCE"),
    );
    assert.throws(
      () => blobs.path(`sha512:${"a".repeat(128)}`),
      (e) => isKilnError(e, "INVALID_REFERENCE"),
    );
  });

  it("writes, verifies and commits a streamed blob; has/open/readBytes/list see it", async () => {
    const data = Buffer.alloc(300_000);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7919) & 0xff;
    const digest = sha(data);
    assert.equal(await blobs.has(digest), false);

    const staging = await blobs.stage();
    assert.ok(staging.dir.startsWith(join(root, "tmp")));
    const n = await staging.write({ digest, size: data.length, what: "layer 1/1" }, chunks(data, 65536));
    assert.equal(n, data.length);
    // Staged but not committed: not in the store yet.
    assert.equal(await blobs.has(digest), false);
    await staging.commit();

    assert.equal(await blobs.has(digest), true);
    assert.equal(await blobs.has(digest, data.length), true);
    assert.equal(await blobs.has(digest, data.length + 1), false);
    assert.deepEqual(await readFile(blobs.path(digest)), data);
    assert.deepEqual(await tmpEntries(), []);

    const opened: Buffer[] = [];
    for await (const c of blobs.open(digest)) opened.push(c as Buffer);
    assert.deepEqual(Buffer.concat(opened), data);
    assert.deepEqual(await blobs.readBytes(digest, data.length), data);
    await assert.rejects(blobs.readBytes(digest, data.length - 1), (e) => isKilnError(e, "TOO_LARGE"));

    const listed = [];
    for await (const b of blobs.list()) listed.push(b);
    assert.deepEqual(listed, [{ digest, size: data.length }]);
    await staging.discard(); // a no-op after commit
    assert.equal(await blobs.has(digest), true);
  });

  it("writeBytes stages small documents, checking the expected digest", async () => {
    const doc = Buffer.from('{"schemaVersion":2}');
    const staging = await blobs.stage();
    assert.equal(await staging.writeBytes(doc), sha(doc));
    await assert.rejects(staging.writeBytes(Buffer.from("other"), sha(doc)), (e) => {
      assert.ok(isKilnError(e, "DIGEST_MISMATCH"));
      assert.match(e.message, new RegExp(`${sha("other")}.*${sha(doc)}`));
      return true;
    });
    await staging.commit();
    assert.deepEqual(await blobs.readBytes(sha(doc), 1024), doc);
    assert.equal(await blobs.has(sha("other")), false);
  });

  it("DIGEST_MISMATCH names both digests and what it was, and leaves nothing in blobs/ or tmp/", async () => {
    const before = await blobFiles();
    const staging = await blobs.stage();
    const good = Buffer.from("the expected content");
    const bad = Buffer.from("the tampered content");
    assert.equal(good.length, bad.length);
    await assert.rejects(
      staging.write(
        { digest: sha(good), size: good.length, what: "layer 2/3 of test" },
        Readable.from([bad]),
      ),
      (e) => {
        assert.ok(isKilnError(e, "DIGEST_MISMATCH"));
        assert.match(e.message, /^layer 2\/3 of test: /);
        assert.ok(e.message.includes(sha(good)) && e.message.includes(sha(bad)), e.message);
        return true;
      },
    );
    // The staging dir holds no temp file after the failure.
    assert.deepEqual(await readdir(staging.dir), []);
    // Too short also fails, naming the sizes.
    await assert.rejects(
      staging.write({ digest: sha(good), size: good.length + 5 }, Readable.from([good])),
      (e) => isKilnError(e, "DIGEST_MISMATCH") && /got 20 bytes.*expected 25 bytes/.test(e.message),
    );
    await staging.discard();
    assert.deepEqual(await blobFiles(), before);
    assert.deepEqual(await tmpEntries(), []);
  });

  it("aborts an oversize input as soon as it passes the expected size", async () => {
    let pulled = 0;
    const endless = new Readable({
      read() {
        pulled++;
        this.push(Buffer.alloc(1024, 1));
      },
    });
    const staging = await blobs.stage();
    await assert.rejects(
      staging.write({ digest: sha("x"), size: 10_000 }, endless),
      (e) => isKilnError(e, "DIGEST_MISMATCH") && /more than the expected 10000 bytes/.test(e.message),
    );
    assert.ok(endless.destroyed, "the input is destroyed");
    // Read-ahead is bounded by the stream's buffer, nowhere near "endless".
    assert.ok(pulled < 100, `pulled ${pulled} chunks`);
    assert.deepEqual(await readdir(staging.dir), []);
    await staging.discard();
    assert.deepEqual(await tmpEntries(), []);
  });

  it("an input error fails the write and removes the temp file", async () => {
    const staging = await blobs.stage();
    async function* failing() {
      yield Buffer.from("partial");
      throw new Error("connection reset");
    }
    await assert.rejects(staging.write({ digest: sha("partial and more") }, failing()), /connection reset/);
    assert.deepEqual(await readdir(staging.dir), []);
    await staging.discard();
  });

  it("discard removes everything staged and is idempotent", async () => {
    const before = await blobFiles();
    const staging = await blobs.stage();
    const a = Buffer.from("discarded a");
    await staging.write({ digest: sha(a), size: a.length }, Readable.from([a]));
    await staging.writeBytes(Buffer.from("discarded b"));
    assert.equal((await readdir(staging.dir)).length, 2);
    await staging.discard();
    await staging.discard();
    await assert.rejects(stat(staging.dir), { code: "ENOENT" });
    assert.deepEqual(await blobFiles(), before);
    assert.deepEqual(await tmpEntries(), []);
    await assert.rejects(staging.writeBytes(a), (e) => isKilnError(e, "INTERNAL"));
  });

  it("commit keeps an existing blob and replaces one of the wrong size", async () => {
    const data = Buffer.from("shared blob");
    const digest = sha(data);
    const first = await blobs.stage();
    await first.writeBytes(data);
    await first.commit();
    const inode = (await stat(blobs.path(digest))).ino;

    const second = await blobs.stage();
    await second.write({ digest }, Readable.from([data]));
    await second.commit();
    assert.equal((await stat(blobs.path(digest))).ino, inode, "the existing file is kept");

    // A truncated file at the final path (not something kiln writes) is replaced by a good copy.
    await writeFile(blobs.path(digest), "shared");
    const third = await blobs.stage();
    await third.writeBytes(data, digest);
    await third.commit();
    assert.deepEqual(await readFile(blobs.path(digest)), data);
    assert.deepEqual(await tmpEntries(), []);
  });

  it("the same digest staged twice is published once", async () => {
    const data = Buffer.from("twice");
    const staging = await blobs.stage();
    await Promise.all([
      staging.write({ digest: sha(data) }, Readable.from([data])),
      staging.write({ digest: sha(data) }, Readable.from([data])),
    ]);
    await staging.writeBytes(data);
    assert.equal((await readdir(staging.dir)).length, 1);
    await staging.commit();
    assert.deepEqual(await readFile(blobs.path(sha(data))), data);
  });

  it("open and readBytes of a missing blob → NOT_FOUND; delete is idempotent", async () => {
    const data = Buffer.from("to delete");
    const staging = await blobs.stage();
    await staging.writeBytes(data);
    await staging.commit();
    // An open stream survives the delete (the file was opened first).
    const stream = blobs.open(sha(data));
    await blobs.delete(sha(data));
    await blobs.delete(sha(data));
    assert.equal(await text(stream), "to delete");
    assert.equal(await blobs.has(sha(data)), false);
    assert.throws(
      () => blobs.open(sha(data)),
      (e) => isKilnError(e, "NOT_FOUND") && e.message.includes(sha(data)),
    );
    await assert.rejects(blobs.readBytes(sha(data), 100), (e) => isKilnError(e, "NOT_FOUND"));
  });
});
