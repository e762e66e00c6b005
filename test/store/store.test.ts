import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtemp, readdir, rm, stat } from "node:fs/promises";
import { homedir, tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import type { NewImage } from "../../src/store/catalog.js";
import { defaultRoot } from "../../src/store/root.js";
import { openStore, removeImages, type Store } from "../../src/store/store.js";

const sha = (b: Buffer) => `sha256:${createHash("sha256").update(b).digest("hex")}`;

describe("defaultRoot", () => {
  it("KILN_ROOT, else $XDG_DATA_HOME/kiln, else ~/.local/share/kiln", () => {
    assert.equal(defaultRoot({ KILN_ROOT: "/srv/kiln", XDG_DATA_HOME: "/x", HOME: "/h" }), "/srv/kiln");
    assert.equal(defaultRoot({ XDG_DATA_HOME: "/x", HOME: "/h" }), "/x/kiln");
    assert.equal(defaultRoot({ KILN_ROOT: "", XDG_DATA_HOME: "", HOME: "/h" }), "/h/.local/share/kiln");
    assert.equal(defaultRoot({ XDG_DATA_HOME: "relative", HOME: "/h" }), "/h/.local/share/kiln");
    assert.equal(defaultRoot({}), join(homedir(), ".local", "share", "kiln"));
  });
});

describe("openStore and removeImages", () => {
  let root: string;
  let store: Store;
  before(async () => {
    root = join(await mkdtemp(join(tmpdir(), "kiln-store-")), "nested", "root");
    store = await openStore(root);
  });
  after(async () => {
    store.close();
    await rm(join(root, "..", ".."), { recursive: true, force: true });
  });

  it("creates the layout", async () => {
    assert.equal(store.root, root);
    assert.equal(store.tmpDir, join(root, "tmp"));
    assert.ok((await stat(join(root, "blobs", "sha256"))).isDirectory());
    assert.ok((await stat(join(root, "tmp"))).isDirectory());
    assert.ok((await stat(join(root, "catalog.db"))).isFile());
  });

  /** Commits the blobs of a fake image and records it. */
  async function addImage(
    ref: string,
    parts: { index?: string; manifest: string; config: string; layers: string[] },
  ) {
    const staging = await store.blobs.stage();
    const d = async (s: string) => staging.writeBytes(Buffer.from(s));
    const indexDigest = parts.index === undefined ? null : await d(parts.index);
    const manifestDigest = await d(parts.manifest);
    const configDigest = await d(parts.config);
    const layers = [];
    for (const l of parts.layers) {
      layers.push({
        digest: await d(l),
        diffId: null,
        mediaType: "application/vnd.oci.image.layer.v1.tar",
        size: l.length,
      });
    }
    await staging.commit();
    const input: NewImage = {
      ref,
      repository: ref.slice(0, ref.lastIndexOf(":")),
      tag: ref.slice(ref.lastIndexOf(":") + 1),
      indexDigest,
      manifestDigest,
      manifestMediaType: "application/vnd.oci.image.manifest.v1+json",
      configDigest,
      platform: "linux/amd64",
      config: parts.config,
      size: 0,
      created: null,
      layers,
    };
    return store.catalog.putImage(input);
  }

  it("deletes only the removed images' blobs that no remaining image references", async () => {
    const a = await addImage("localhost/a:1", {
      index: "index shared",
      manifest: "manifest a",
      config: "config shared",
      layers: ["layer base", "layer a"],
    });
    const b = await addImage("localhost/b:1", {
      index: "index shared",
      manifest: "manifest b",
      config: "config shared",
      layers: ["layer base", "layer b"],
    });
    // A blob a concurrent pull has committed but not recorded yet.
    const inFlight = await store.blobs.stage();
    const inFlightDigest = await inFlight.writeBytes(Buffer.from("layer of a pull in flight"));
    await inFlight.commit();

    await removeImages(store, [a]);
    const has = async (s: string) => store.blobs.has(sha(Buffer.from(s)));
    assert.equal(await has("manifest a"), false);
    assert.equal(await has("layer a"), false);
    for (const kept of ["index shared", "config shared", "layer base", "manifest b", "layer b"]) {
      assert.equal(await has(kept), true, kept);
    }
    assert.equal(await store.blobs.has(inFlightDigest), true, "an unrecorded blob is not touched");
    assert.equal(store.catalog.get(a.id), undefined);
    assert.deepEqual(
      store.catalog.list().map((i) => i.id),
      [b.id],
    );

    await removeImages(store, [b]);
    for (const gone of ["index shared", "config shared", "layer base", "manifest b", "layer b"]) {
      assert.equal(await has(gone), false, gone);
    }
    assert.deepEqual(await readdir(join(root, "blobs", "sha256")), [inFlightDigest.slice(7)]);
    assert.deepEqual(store.catalog.list(), []);
  });
});
