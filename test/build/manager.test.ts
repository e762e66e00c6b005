/**
 * The build queue of the image manager (library level), against a real docker-registry: FIFO with
 * concurrency 1, positions that only decrease, duplicate requests joining, a failing image next to
 * good ones, re-queue of interrupted builds, the service lock.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { ImageManager, type ServiceImage } from "../../src/build/manager.js";
import { Builds } from "../../src/store/builds.js";
import { openStore } from "../../src/store/store.js";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { sampleImage } from "../helpers/fixtures.js";
import { pushImage } from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";

/** A gate the onPhase hook waits on, so a build is held in a phase for as long as a test needs. */
function gate() {
  let open!: () => void;
  const opened = new Promise<void>((resolve) => {
    open = resolve;
  });
  return { open, opened };
}

describe("image manager", () => {
  let reg: Registry;
  let work: string;
  const refs: string[] = [];

  before(async () => {
    reg = await startRegistry();
    work = await makeTempDir("manager");
    const image = await sampleImage();
    for (const tag of ["a", "b", "c"]) refs.push((await pushImage(image, reg, `queue/${tag}:1`)).ref);
  });
  after(async () => {
    await reg?.stop();
    if (work) await removeDir(work);
  });

  it("runs builds FIFO with concurrency 1: positions only decrease, duplicates join, a failure does not stop the rest", async () => {
    const hold = gate();
    const seen = new Map<number, number[]>();
    let manager!: ImageManager;
    const record = (img: ServiceImage) => {
      const list = seen.get(img.id) ?? [];
      if (img.queuePosition !== null) list.push(img.queuePosition);
      seen.set(img.id, list);
    };
    manager = await ImageManager.open({
      root: join(work, "fifo"),
      concurrency: 1,
      onPhase: async (img) => {
        // The first build waits in `pulling` until every request is queued behind it.
        if (img.name === refs[0] && img.status === "pulling") await hold.opened;
        for (const i of manager.listImages()) record(i);
      },
    });
    manager.start();
    try {
      const first = manager.createImage({ name: refs[0]!, format: "ext4" });
      const missing = manager.createImage({ name: `${reg.host}/queue/missing:1`, format: "ext4" });
      const second = manager.createImage({ name: refs[1]!, format: "erofs" });
      const third = manager.createImage({ name: refs[2]!, format: "cpio" });
      assert.equal(first.queuePosition, 0, "the first request starts at once");
      assert.deepEqual(
        [missing, second, third].map((i) => [i.status, i.queuePosition]),
        [
          ["pending", 2],
          ["pending", 3],
          ["pending", 4],
        ],
      );
      // A request for what is already queued joins it.
      const again = manager.createImage({ name: refs[1]!, format: "erofs" });
      assert.equal(again.id, second.id);
      assert.equal(again.queuePosition, 3);
      for (const i of manager.listImages()) record(i);
      hold.open();
      await manager.idle();

      const done = new Map(manager.listImages().map((i) => [i.id, i]));
      assert.equal(done.get(first.id)?.status, "ready");
      assert.equal(done.get(second.id)?.status, "ready");
      assert.equal(done.get(third.id)?.status, "ready");
      const failed = done.get(missing.id)!;
      assert.equal(failed.status, "failed");
      assert.equal(failed.error?.code, "NOT_FOUND");
      assert.equal(failed.queuePosition, null);
      for (const [id, positions] of seen) {
        for (let k = 1; k < positions.length; k++) {
          assert.ok(positions[k]! <= positions[k - 1]!, `image ${id}: positions went up: ${positions}`);
        }
      }
      // A ready artifact is a whole, clean filesystem; the record carries the runtime config.
      const ready = done.get(first.id)!;
      assert.ok(ready.artifact && ready.size && ready.digest?.startsWith("sha256:"));
      await run("e2fsck", ["-fn", ready.artifact]);
      assert.ok(Array.isArray(ready.env));
      // Asking again for a ready image answers at once, from what is there.
      const cached = manager.createImage({ name: refs[0]!, format: "ext4" });
      assert.equal(cached.id, first.id);
      assert.equal(cached.status, "ready");
      // A failed image asked for again is queued again, at the end.
      const retry = manager.createImage({ name: `${reg.host}/queue/missing:1`, format: "ext4" });
      assert.equal(retry.id, missing.id);
      assert.notEqual(retry.status, "failed");
      await manager.idle();
      assert.equal(manager.getImage(retry.name).status, "failed");
    } finally {
      await manager.shutdown();
    }
  });

  it("looks images up by name, normalized name and digest prefix; a second format needs choosing", async () => {
    const manager = await ImageManager.open({ root: join(work, "lookup"), concurrency: 1 });
    manager.start();
    try {
      const a = manager.createImage({ name: refs[0]!, format: "cpio" });
      const b = manager.createImage({ name: refs[0]!, format: "erofs" });
      await manager.idle();
      const byFormat = manager.getImage(refs[0]!, { format: "cpio" });
      assert.equal(byFormat.id, a.id);
      assert.throws(() => manager.getImage(refs[0]!), { code: "AMBIGUOUS_REF" });
      const digest = manager.getImage(refs[0]!, { format: "erofs" }).digest!;
      assert.equal(manager.getImage(digest.slice(7, 19), { format: "erofs" }).id, b.id);
      assert.throws(() => manager.getImage(`${reg.host}/queue/none:1`), { code: "NOT_FOUND" });
      assert.throws(() => manager.createImage({ name: "Bad Name" }), { code: "INVALID_REFERENCE" });
      assert.throws(() => manager.createImage({ name: refs[0]!, format: "zip" }), {
        code: "INVALID_ARGUMENT",
      });
      // Deleting one format keeps the other; deleting the image takes it out of the store.
      await manager.deleteImage(refs[0]!, { format: "cpio" });
      assert.equal(manager.getImage(refs[0]!).id, b.id);
      await manager.deleteImage(refs[0]!);
      assert.throws(() => manager.getImage(refs[0]!), { code: "NOT_FOUND" });
      assert.equal(manager.store.catalog.list().length, 0);
      assert.equal(manager.totalImageBytes(), 0);
    } finally {
      await manager.shutdown();
    }
  });

  it("re-queues builds a dead process left running, in their place, and one store has one service", async () => {
    const root = join(work, "recover");
    const store = await openStore(root);
    const builds = new Builds(store.catalog);
    const options = JSON.stringify({ format: "cpio", compress: "none" });
    const platform = "linux/amd64";
    const x = builds.request({ name: refs[0]!, format: "cpio", options, platform }).build;
    const y = builds.request({ name: refs[1]!, format: "cpio", options, platform }).build;
    builds.update(x.id, { status: "converting" });
    builds.update(y.id, { status: "pulling" });
    store.close();

    const manager = await ImageManager.open({ root, concurrency: 1 });
    await assert.rejects(ImageManager.open({ root }), { code: "STORE" });
    try {
      const recovered = manager.start();
      assert.deepEqual(
        recovered.map((r) => r.id),
        [x.id, y.id],
      );
      await manager.idle();
      for (const img of manager.listImages()) assert.equal(img.status, "ready", JSON.stringify(img.error));
    } finally {
      await manager.shutdown();
    }
  });
});
