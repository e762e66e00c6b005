/**
 * `kiln images`, `kiln inspect` and `kiln rm` over a store filled by real pulls: the table and
 * JSON listings, lookup by digest prefix, ambiguous prefixes, bad references, and removal of an
 * image together with the blobs no other image uses.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { makeTempDir, removeDir } from "../helpers/exec.js";
import { noEofImage, sampleImage } from "../helpers/fixtures.js";
import {
  buildImage,
  editManifest,
  type Layout,
  pushImage,
  setTag,
  tagDescriptor,
} from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import {
  assertBlobsVerify,
  assertFails,
  assertTmpEmpty,
  blobNames,
  escapeRegExp,
  type ImageRow,
  type InspectJson,
  type PullJson,
  type Sandbox,
  sandbox,
} from "./kiln.js";

/**
 * Two tags of one small image whose manifest digests start with the same hex digit: variants that
 * differ in one annotation, made until two collide (at most 17, by pigeonhole; builds are
 * reproducible, so the same ones every run).
 */
async function twoWithSharedFirstDigit(dir: string): Promise<{ a: Layout; b: Layout; digit: string }> {
  const base = await buildImage(dir, {
    tag: "base",
    layers: [
      [
        { path: "etc/", type: "dir" },
        { path: "etc/variant", content: "v\n" },
      ],
    ],
    config: { cmd: ["/bin/true"] },
  });
  const baseDesc = await tagDescriptor(base);
  const seen = new Map<string, Layout>();
  for (let i = 0; i <= 16; i++) {
    const layout: Layout = { dir, tag: `v${i}`, ref: `oci:${dir}:v${i}` };
    await setTag(layout, baseDesc);
    await editManifest(layout, (m) => {
      m.annotations = { "org.example.kiln.variant": String(i) };
    });
    const digit = (await tagDescriptor(layout)).digest.slice(7, 8);
    const earlier = seen.get(digit);
    if (earlier) return { a: earlier, b: layout, digit };
    seen.set(digit, layout);
  }
  throw new Error("17 digests with 16 distinct first digits: impossible");
}

describe("kiln images, inspect and rm", () => {
  let reg: Registry;
  let work: string;
  let box: Sandbox;
  let amb: { a: Layout; b: Layout; digit: string };
  const pulled: Record<string, PullJson> = {};
  const ref = (repoTag: string) => `${reg.host}/${repoTag}`;

  before(async () => {
    work = await makeTempDir("cli-images");
    const [sample, noEof, twins] = await Promise.all([
      sampleImage(),
      noEofImage(),
      twoWithSharedFirstDigit(join(work, "variants")),
    ]);
    amb = twins;
    reg = await startRegistry();
    await pushImage(sample, reg, "sample:1");
    await pushImage(noEof, reg, "other:1");
    await pushImage(amb.a, reg, "variant:a");
    await pushImage(amb.b, reg, "variant:b");
    box = await sandbox();
    for (const t of ["sample:1", "other:1", "variant:a", "variant:b"])
      pulled[t] = await box.json<PullJson>(["pull", ref(t)]);
  });
  after(async () => {
    await box?.cleanup();
    await reg?.stop();
    if (work) await removeDir(work);
  });

  it("lists the images as JSON records", async () => {
    const rows = await box.json<ImageRow[]>(["images"]);
    assert.deepEqual(rows.map((r) => r.ref).sort(), Object.keys(pulled).map(ref).sort());
    for (const row of rows) {
      const p = Object.values(pulled).find((x) => x.ref === row.ref)!;
      assert.deepEqual(row, {
        ref: p.ref,
        repository: p.ref!.slice(0, p.ref!.lastIndexOf(":")),
        tag: p.ref!.slice(p.ref!.lastIndexOf(":") + 1),
        digest: p.digest,
        indexDigest: null,
        platform: "linux/amd64",
        size: p.size,
        created: "2024-01-01T00:00:00Z",
        layers: p.layers.length,
        // Service builds of the image (kiln serve); none here.
        builds: [],
      });
    }
  });

  it("lists the images as a table", async () => {
    const r = await box.kiln(["images"]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stderr, "");
    const lines = r.stdout.trimEnd().split("\n");
    assert.deepEqual(lines[0]!.split(/\s{2,}/), [
      "REPOSITORY",
      "TAG",
      "PLATFORM",
      "DIGEST",
      "CREATED",
      "SIZE",
    ]);
    assert.equal(lines.length, 1 + Object.keys(pulled).length);
    for (const [repoTag, p] of Object.entries(pulled)) {
      const [repo, tag] = repoTag.split(":");
      const line = lines.find((l) => l.startsWith(`${reg.host}/${repo} `) && l.split(/\s+/)[1] === tag);
      assert.ok(line, `a row for ${repoTag}`);
      const cells = line.split(/\s{2,}/);
      assert.equal(cells[2], "linux/amd64");
      assert.equal(cells[3], p.digest.slice(7, 19));
      assert.match(cells[5]!, /^\d+(\.\d+)? (B|KiB|MiB)$/);
    }
  });

  it("finds an image by a digest prefix, with or without sha256:", async () => {
    const digest = pulled["sample:1"]!.digest;
    const hex = digest.slice(7, 19);
    const others = Object.entries(pulled).filter(([t]) => t !== "sample:1");
    assert.ok(
      others.every(([, p]) => !p.digest.startsWith(`sha256:${hex}`)),
      "fixture: a unique prefix",
    );
    for (const arg of [hex, `sha256:${hex}`, digest, hex.slice(0, 7)]) {
      if (others.some(([, p]) => p.digest.startsWith(`sha256:${arg.replace(/^sha256:/, "")}`))) continue;
      const info = await box.json<InspectJson>(["inspect", arg]);
      assert.equal(info.digest, digest, arg);
      assert.equal(info.ref, ref("sample:1"));
    }
  });

  it("refuses a prefix that two images share with AMBIGUOUS_REF, naming them", async () => {
    const da = pulled["variant:a"]!.digest;
    const db = pulled["variant:b"]!.digest;
    assert.notEqual(da, db);
    assert.equal(da.slice(7, 8), amb.digit);
    assert.equal(db.slice(7, 8), amb.digit);
    for (const arg of [amb.digit, `sha256:${amb.digit}`]) {
      const line = assertFails(await box.kiln(["inspect", arg]), "AMBIGUOUS_REF");
      assert.ok(line.includes(ref("variant:a")) && line.includes(ref("variant:b")), line);
    }
    const before = await box.json<ImageRow[]>(["images"]);
    assertFails(await box.kiln(["rm", amb.digit]), "AMBIGUOUS_REF");
    assert.deepEqual(await box.json<ImageRow[]>(["images"]), before);
  });

  it("refuses a malformed reference with INVALID_REFERENCE", async () => {
    assertFails(await box.kiln(["inspect", "Bad/Ref"]), "INVALID_REFERENCE");
  });

  it("prints the error as one JSON object on stderr with --json", async () => {
    const r = await box.kiln(["--json", "inspect", "no/such:image"]);
    assert.equal(r.code, 1);
    assert.equal(r.stdout, "");
    const lines = r.stderr.trimEnd().split("\n");
    assert.equal(lines.length, 1);
    const e = JSON.parse(lines[0]!) as { error: { code: string; message: string } };
    assert.equal(e.error.code, "NOT_FOUND");
    assert.match(e.error.message, /no\/such:image/);
  });

  it("removes an image and the blobs only it used; then inspect and rm say NOT_FOUND", async () => {
    const gone = pulled["sample:1"]!;
    const r = await box.kiln(["rm", ref("sample:1")]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stderr, "");
    assert.match(
      r.stdout,
      new RegExp(`^Deleted: ${escapeRegExp(ref("sample:1"))} linux/amd64 ${gone.digest}\n$`),
    );

    const nf = assertFails(await box.kiln(["inspect", ref("sample:1")]), "NOT_FOUND");
    assert.match(nf, /sample:1/);
    assertFails(await box.kiln(["inspect", gone.digest.slice(7, 19)]), "NOT_FOUND");
    assertFails(await box.kiln(["rm", ref("sample:1")]), "NOT_FOUND");
    assertFails(await box.kiln(["rm", ref("never:pulled")]), "NOT_FOUND");

    const rows = await box.json<ImageRow[]>(["images"]);
    assert.deepEqual(rows.map((x) => x.ref).sort(), ["other:1", "variant:a", "variant:b"].map(ref).sort());
    // Exactly the remaining images' blobs are left.
    const keep = new Set<string>();
    for (const row of rows) {
      const info = await box.json<InspectJson>(["inspect", row.digest]);
      for (const d of [info.digest, info.configDigest, ...info.layers.map((l) => l.digest)]) keep.add(d);
    }
    assert.deepEqual(await assertBlobsVerify(box.root), [...keep].sort());
    for (const l of gone.layers) assert.ok(!(await blobNames(box.root)).includes(l.digest.slice(7)));
    await assertTmpEmpty(box.root);
  });
});
