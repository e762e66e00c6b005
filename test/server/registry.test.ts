/**
 * The embedded registry of `kiln serve` (the fastify plugin alone, over a temp store): real skopeo
 * pushes single-arch, multi-arch and zstd images into it and pulls them back out; kiln's own CLI
 * lists, exports and pulls them; raw HTTP covers the protocol's edges (chunks, gaps, wrong digests,
 * mounts, missing blobs, tag list, catalog).
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { request } from "undici";
import { collectGarbage } from "../../src/store/gc.js";
import { openStore } from "../../src/store/store.js";
import { blobNames, childEnv, type ImageRow, type PullJson, runKiln } from "../cli/kiln.js";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { multiArchImage, SAMPLE_SPEC, sampleImage } from "../helpers/fixtures.js";
import { inspectRaw, type Pushed, pushImage, readBlob, skopeo, tagDescriptor } from "../helpers/images.js";
import { type KilnRegistry, startKilnRegistry } from "./registry-server.js";

const OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX = "application/vnd.oci.image.index.v1+json";

function sha256(bytes: Buffer | string): string {
  return `sha256:${createHash("sha256").update(bytes).digest("hex")}`;
}

interface Reply {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

async function http(
  reg: KilnRegistry,
  method: "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE",
  path: string,
  opts: { body?: Buffer | string; headers?: Record<string, string> } = {},
): Promise<Reply> {
  const url = /^https?:/.test(path) ? path : `${reg.url}${path}`;
  const res = await request(url, { method, body: opts.body, headers: opts.headers });
  const body = Buffer.from(await res.body.arrayBuffer());
  return { status: res.statusCode, headers: res.headers, body };
}

function json<T = Record<string, unknown>>(r: Reply): T {
  return JSON.parse(r.body.toString("utf8")) as T;
}

/** The reply is a distribution error with this status and code. */
function assertError(r: Reply, status: number, code: string): void {
  assert.equal(r.status, status, `expected ${status} ${code}, got ${r.status}: ${r.body.toString()}`);
  const errors = json<{ errors: { code: string; message: string }[] }>(r).errors;
  assert.equal(errors[0]?.code, code, r.body.toString());
  assert.ok(errors[0]!.message.length > 0);
}

function header(r: Reply, name: string): string | undefined {
  const v = r.headers[name];
  return Array.isArray(v) ? v[0] : v;
}

describe("embedded registry: real clients", () => {
  let reg: KilnRegistry;
  let work: string;
  let single: Pushed;
  let multi: Pushed;
  let zstd: Pushed;
  const kiln = (root: string, args: string[]) => runKiln(["--root", root, ...args], childEnv());

  before(async () => {
    reg = await startKilnRegistry();
    work = await makeTempDir("registry-test");
    single = await pushImage(await sampleImage(), reg, "myapp:v1");
    multi = await pushImage(await multiArchImage(), reg, "multi:1");
    zstd = await pushImage(await sampleImage(), reg, "zimage:1", { compression: "zstd" });
  });
  after(async () => {
    await reg?.stop();
    if (work) await removeDir(work);
  });

  it("records each push by tag under its docker name, every platform of an index, and tells onPushed", async () => {
    const r = await kiln(reg.root, ["--json", "images"]);
    assert.equal(r.code, 0, r.stderr);
    const rows = (JSON.parse(r.stdout) as ImageRow[]).map((i) => ({
      ref: i.ref,
      platform: i.platform,
      digest: i.digest,
      indexDigest: i.indexDigest,
    }));
    const index = JSON.parse((await readBlob((await multiArchImage()).dir, multi.digest)).toString()) as {
      manifests: { digest: string; platform: { architecture: string } }[];
    };
    const child = (arch: string) => index.manifests.find((m) => m.platform.architecture === arch)!.digest;
    assert.deepEqual(rows, [
      {
        ref: "docker.io/library/multi:1",
        platform: "linux/amd64",
        digest: child("amd64"),
        indexDigest: multi.digest,
      },
      {
        ref: "docker.io/library/multi:1",
        platform: "linux/arm64/v8",
        digest: child("arm64"),
        indexDigest: multi.digest,
      },
      {
        ref: "docker.io/library/myapp:v1",
        platform: "linux/amd64",
        digest: single.digest,
        indexDigest: null,
      },
      { ref: "docker.io/library/zimage:1", platform: "linux/amd64", digest: zstd.digest, indexDigest: null },
    ]);
    // The attestation entry of the index is not an image: not recorded.
    assert.equal(index.manifests.length, 3);
    assert.deepEqual(
      reg.pushes.map((p) => p.map((i) => `${i.ref} ${i.platform}`)),
      [
        ["docker.io/library/myapp:v1 linux/amd64"],
        ["docker.io/library/multi:1 linux/amd64", "docker.io/library/multi:1 linux/arm64/v8"],
        ["docker.io/library/zimage:1 linux/amd64"],
      ],
    );
    const z = reg.store.catalog.resolve("zimage:1");
    assert.deepEqual(
      z.layers.map((l) => l.mediaType),
      SAMPLE_SPEC.layers.map(() => "application/vnd.oci.image.layer.v1.tar+zstd"),
    );
  });

  it("serves back exactly what was pushed: skopeo inspect --raw and skopeo copy", async () => {
    for (const [name, pushed, mediaType] of [
      ["myapp:v1", single, OCI_MANIFEST],
      ["multi:1", multi, OCI_INDEX],
      ["zimage:1", zstd, OCI_MANIFEST],
    ] as const) {
      const raw = await inspectRaw(reg, name);
      assert.equal(raw.manifestDigest, pushed.digest, name);
      assert.equal(raw.mediaType, mediaType, name);
    }
    // The config too, byte for byte.
    const image = await sampleImage();
    const desc = await tagDescriptor(image);
    const manifest = JSON.parse((await readBlob(image.dir, desc.digest)).toString()) as {
      config: { digest: string };
    };
    assert.equal((await inspectRaw(reg, "myapp:v1")).configDigest, manifest.config.digest);

    // A full copy out (every platform of the index, attestation included) keeps every digest.
    const out = join(work, "pulled");
    await skopeo([
      "copy",
      "-q",
      "--all",
      "--src-tls-verify=false",
      `docker://${reg.host}/multi:1`,
      `oci:${out}:m`,
    ]);
    await skopeo(["copy", "-q", "--src-tls-verify=false", `docker://${reg.host}/zimage:1`, `oci:${out}:z`]);
    const index = JSON.parse(await readFile(join(out, "index.json"), "utf8")) as {
      manifests: { digest: string; annotations: Record<string, string> }[];
    };
    const byTag = new Map(
      index.manifests.map((m) => [m.annotations["org.opencontainers.image.ref.name"], m.digest]),
    );
    assert.equal(byTag.get("m"), multi.digest);
    assert.equal(byTag.get("z"), zstd.digest);
    // Every blob the copy wrote hashes to its name (skopeo verified them on the way too).
    for (const name of await readdir(join(out, "blobs", "sha256"))) {
      assert.equal(sha256(await readFile(join(out, "blobs", "sha256", name))), `sha256:${name}`);
    }
  });

  it("exports pushed images like any other: ext4 passes e2fsck -fn and holds the image's files", async () => {
    for (const [ref, platform, file, want] of [
      ["myapp:v1", undefined, "/etc/hostname", "kiln-upper\n"],
      ["zimage:1", undefined, "/home/user/new.txt", "from layer 2\n"],
      ["multi:1", "linux/arm64", "/etc/arch", "arm64\n"],
    ] as const) {
      const out = join(work, `${ref.replace(/\W/g, "_")}.ext4`);
      const args = [
        "export",
        ref,
        "--format",
        "ext4",
        "-o",
        out,
        ...(platform ? ["--platform", platform] : []),
      ];
      const r = await kiln(reg.root, args);
      assert.equal(r.code, 0, r.stderr);
      await run("e2fsck", ["-fn", out]);
      assert.equal(await run("debugfs", ["-R", `cat ${file}`, out]), want, `${ref}: ${file}`);
    }
  });

  it("kiln pull reads from it, by host and as a docker.io mirror", async () => {
    const other = join(work, "other-store");
    const r = await kiln(other, ["--json", "pull", `${reg.host}/myapp:v1`]);
    assert.equal(r.code, 0, r.stderr);
    const pulled = JSON.parse(r.stdout) as PullJson;
    assert.equal(pulled.digest, single.digest);
    assert.equal(pulled.ref, `${reg.host}/myapp:v1`);

    const arm = await kiln(other, ["--json", "pull", "--platform", "linux/arm64", `${reg.host}/multi:1`]);
    assert.equal(arm.code, 0, arm.stderr);
    const armJson = JSON.parse(arm.stdout) as PullJson;
    assert.equal(armJson.indexDigest, multi.digest);
    assert.equal(armJson.platform, "linux/arm64/v8");

    // As docker's registry-mirrors: `zimage:1` is docker.io/library/zimage:1, served from the store.
    const mirror = await kiln(join(work, "mirror-store"), [
      "--json",
      "pull",
      "--registry-mirror",
      reg.url,
      "zimage:1",
    ]);
    assert.equal(mirror.code, 0, mirror.stderr);
    const m = JSON.parse(mirror.stdout) as PullJson;
    assert.equal(m.ref, "docker.io/library/zimage:1");
    assert.equal(m.digest, zstd.digest);
  });

  it("lists tags and repositories from the catalog, with n/last pagination", async () => {
    const tags = await http(reg, "GET", "/v2/myapp/tags/list");
    assert.equal(tags.status, 200);
    assert.deepEqual(json(tags), { name: "myapp", tags: ["v1"] });
    // The same repository by its full docker path.
    assert.deepEqual(json(await http(reg, "GET", "/v2/library/myapp/tags/list")), {
      name: "library/myapp",
      tags: ["v1"],
    });
    assertError(await http(reg, "GET", "/v2/nothing-here/tags/list"), 404, "NAME_UNKNOWN");

    const catalog = await http(reg, "GET", "/v2/_catalog");
    assert.equal(catalog.status, 200);
    assert.deepEqual(json(catalog), { repositories: ["library/multi", "library/myapp", "library/zimage"] });
    const page = await http(reg, "GET", "/v2/_catalog?n=2");
    assert.deepEqual(json(page), { repositories: ["library/multi", "library/myapp"] });
    assert.equal(header(page, "link"), '</v2/_catalog?n=2&last=library%2Fmyapp>; rel="next"');
    const next = await http(reg, "GET", "/v2/_catalog?n=2&last=library%2Fmyapp");
    assert.deepEqual(json(next), { repositories: ["library/zimage"] });
    assert.equal(header(next, "link"), undefined);
  });

  it("answers manifests by tag and digest with their media type; HEAD has no body", async () => {
    const head = await http(reg, "HEAD", "/v2/multi/manifests/1");
    assert.equal(head.status, 200);
    assert.equal(head.body.length, 0);
    assert.equal(header(head, "content-type"), OCI_INDEX);
    assert.equal(header(head, "docker-content-digest"), multi.digest);
    const get = await http(reg, "GET", `/v2/multi/manifests/${multi.digest}`);
    assert.equal(get.status, 200);
    assert.equal(sha256(get.body), multi.digest);
    assert.equal(header(head, "content-length"), String(get.body.length));
    // Another repository does not serve it by digest.
    assertError(await http(reg, "GET", `/v2/myapp/manifests/${multi.digest}`), 404, "MANIFEST_UNKNOWN");
    assertError(await http(reg, "GET", "/v2/myapp/manifests/v9"), 404, "MANIFEST_UNKNOWN");
    assertError(await http(reg, "DELETE", `/v2/myapp/manifests/${single.digest}`), 405, "UNSUPPORTED");
  });
});

describe("embedded registry: protocol edges", () => {
  let reg: KilnRegistry;

  before(async () => {
    reg = await startKilnRegistry();
  });
  after(async () => {
    await reg?.stop();
  });

  /** Starts an upload; returns its Location. */
  async function startUpload(name: string): Promise<string> {
    const r = await http(reg, "POST", `/v2/${name}/blobs/uploads/`);
    assert.equal(r.status, 202, r.body.toString());
    assert.equal(header(r, "range"), "0-0");
    assert.ok(header(r, "docker-upload-uuid"));
    return header(r, "location")!;
  }

  /** Pushes a blob monolithically; returns its digest. */
  async function putBlob(name: string, bytes: Buffer | string): Promise<string> {
    const digest = sha256(bytes);
    const r = await http(reg, "POST", `/v2/${name}/blobs/uploads/?digest=${digest}`, {
      body: bytes,
      headers: { "content-type": "application/octet-stream" },
    });
    assert.equal(r.status, 201, r.body.toString());
    assert.equal(header(r, "docker-content-digest"), digest);
    return digest;
  }

  it("GET /v2/ answers {} with the API version header", async () => {
    const r = await http(reg, "GET", "/v2/");
    assert.equal(r.status, 200);
    assert.deepEqual(json(r), {});
    assert.equal(header(r, "docker-distribution-api-version"), "registry/2.0");
  });

  it("chunked upload: status gives the range, a gap gets 416, the finished blob is served whole and by range", async () => {
    const data = Buffer.from("0123456789abcdefghijklmnopqrstuvwxyz");
    const loc = await startUpload("chunky");
    const first = await http(reg, "PATCH", loc, {
      body: data.subarray(0, 10),
      headers: { "content-range": "0-9", "content-type": "application/octet-stream" },
    });
    assert.equal(first.status, 202, first.body.toString());
    assert.equal(header(first, "range"), "0-9");
    const status = await http(reg, "GET", loc);
    assert.equal(status.status, 204);
    assert.equal(header(status, "range"), "0-9");

    const gap = await http(reg, "PATCH", loc, {
      body: data.subarray(20, 30),
      headers: { "content-range": "20-29", "content-type": "application/octet-stream" },
    });
    assertError(gap, 416, "RANGE_INVALID");
    assert.equal(header(gap, "range"), "0-9");

    const second = await http(reg, "PATCH", loc, {
      body: data.subarray(10, 20),
      headers: { "content-range": "10-19", "content-type": "application/octet-stream" },
    });
    assert.equal(header(second, "range"), "0-19");
    const digest = sha256(data);
    // The last chunk comes with the PUT.
    const done = await http(reg, "PUT", `${loc}?digest=${digest}`, {
      body: data.subarray(20),
      headers: { "content-range": `20-${data.length - 1}`, "content-type": "application/octet-stream" },
    });
    assert.equal(done.status, 201, done.body.toString());
    assert.equal(header(done, "location"), `/v2/chunky/blobs/${digest}`);
    assert.equal(header(done, "docker-content-digest"), digest);
    assertError(await http(reg, "GET", loc), 404, "BLOB_UPLOAD_UNKNOWN");

    const blob = await http(reg, "GET", `/v2/chunky/blobs/${digest}`);
    assert.equal(blob.status, 200);
    assert.deepEqual(blob.body, data);
    const part = await http(reg, "GET", `/v2/chunky/blobs/${digest}`, { headers: { range: "bytes=5-9" } });
    assert.equal(part.status, 206);
    assert.equal(part.body.toString(), "56789");
    assert.equal(header(part, "content-range"), `bytes 5-9/${data.length}`);
    const head = await http(reg, "HEAD", `/v2/chunky/blobs/${digest}`);
    assert.equal(head.status, 200);
    assert.equal(header(head, "content-length"), String(data.length));
    assertError(await http(reg, "GET", `/v2/chunky/blobs/${sha256("absent")}`), 404, "BLOB_UNKNOWN");
  });

  it("a wrong digest gets DIGEST_INVALID and nothing lands in blobs/ (chunked or monolithic)", async () => {
    const before = await blobNames(reg.root);
    const loc = await startUpload("wrong");
    await http(reg, "PATCH", loc, {
      body: "real content",
      headers: { "content-type": "application/octet-stream" },
    });
    const claimed = sha256("other content");
    assertError(await http(reg, "PUT", `${loc}?digest=${claimed}`), 400, "DIGEST_INVALID");
    // The upload is gone with its bytes.
    assertError(await http(reg, "GET", loc), 404, "BLOB_UPLOAD_UNKNOWN");
    const mono = await http(reg, "POST", `/v2/wrong/blobs/uploads/?digest=${claimed}`, {
      body: "real content",
      headers: { "content-type": "application/octet-stream" },
    });
    assertError(mono, 400, "DIGEST_INVALID");
    assert.deepEqual(await blobNames(reg.root), before);
    assert.deepEqual(await readdir(join(reg.root, "tmp")), []);
  });

  it("an upload survives a restart of the registry: status and the rest of the bytes go to a new instance", async () => {
    const data = Buffer.from("resumable upload: first half / second half");
    const loc = await startUpload("resume");
    await http(reg, "PATCH", loc, { body: data.subarray(0, 17), headers: { "content-range": "0-16" } });
    const again = await startKilnRegistry({ root: reg.root });
    try {
      const url = `${again.url}${loc}`;
      const status = await http(again, "GET", url);
      assert.equal(status.status, 204);
      assert.equal(header(status, "range"), "0-16");
      await http(again, "PATCH", url, {
        body: data.subarray(17),
        headers: { "content-range": `17-${data.length - 1}` },
      });
      const done = await http(again, "PUT", `${url}?digest=${sha256(data)}`);
      assert.equal(done.status, 201, done.body.toString());
    } finally {
      await again.stop();
    }
    assert.deepEqual((await http(reg, "GET", `/v2/resume/blobs/${sha256(data)}`)).body, data);
  });

  it("cross-repository mount: 201 for a blob the store holds, a new upload otherwise", async () => {
    const digest = await putBlob("source", "mount me");
    const mounted = await http(reg, "POST", `/v2/target/blobs/uploads/?mount=${digest}&from=source`);
    assert.equal(mounted.status, 201, mounted.body.toString());
    assert.equal(header(mounted, "location"), `/v2/target/blobs/${digest}`);
    assert.equal(header(mounted, "docker-content-digest"), digest);
    const missing = await http(reg, "POST", `/v2/target/blobs/uploads/?mount=${sha256("nope")}&from=source`);
    assert.equal(missing.status, 202);
    assert.match(header(missing, "location")!, /^\/v2\/target\/blobs\/uploads\/[0-9a-f-]{36}$/);
    assert.equal((await http(reg, "DELETE", header(missing, "location")!)).status, 204);
  });

  describe("manifests", () => {
    let config: { digest: string; size: number };
    let layer: { digest: string; size: number };
    let manifest: Buffer;

    before(async () => {
      // A real one-layer image: an uncompressed tar made by GNU tar.
      const dir = await makeTempDir("registry-manifest");
      try {
        await run("sh", ["-c", `mkdir -p ${dir}/root/etc && echo raw > ${dir}/root/etc/raw`]);
        await run("tar", ["--format=pax", "-C", join(dir, "root"), "-cf", join(dir, "layer.tar"), "etc"]);
        const tar = await readFile(join(dir, "layer.tar"));
        layer = { digest: await putBlob("raw", tar), size: tar.length };
      } finally {
        await removeDir(dir);
      }
      const cfg = JSON.stringify({
        architecture: "amd64",
        os: "linux",
        config: {},
        rootfs: { type: "layers", diff_ids: [layer.digest] },
      });
      config = { digest: await putBlob("raw", cfg), size: Buffer.byteLength(cfg) };
      manifest = Buffer.from(
        JSON.stringify({
          schemaVersion: 2,
          mediaType: OCI_MANIFEST,
          config: { mediaType: "application/vnd.oci.image.config.v1+json", ...config },
          layers: [{ mediaType: "application/vnd.oci.image.layer.v1.tar", ...layer }],
        }),
      );
    });

    const put = (path: string, body: Buffer) =>
      http(reg, "PUT", path, { body, headers: { "content-type": OCI_MANIFEST } });

    it("PUT by tag records the image; by digest only stores it (the URL digest is checked)", async () => {
      const digest = sha256(manifest);
      const wrong = await put(`/v2/raw/manifests/${sha256("not it")}`, manifest);
      assertError(wrong, 400, "DIGEST_INVALID");
      assert.equal(await reg.store.blobs.has(digest), false);

      const byDigest = await put(`/v2/raw/manifests/${digest}`, manifest);
      assert.equal(byDigest.status, 201, byDigest.body.toString());
      assert.equal(await reg.store.blobs.has(digest), true);
      assert.equal(reg.store.catalog.list().length, 0);
      assert.equal((await http(reg, "GET", `/v2/raw/manifests/${digest}`)).status, 200);

      const byTag = await put("/v2/raw/manifests/v1", manifest);
      assert.equal(byTag.status, 201, byTag.body.toString());
      assert.equal(header(byTag, "location"), `/v2/raw/manifests/${digest}`);
      assert.equal(header(byTag, "docker-content-digest"), digest);
      const image = reg.store.catalog.resolve("raw:v1");
      assert.equal(image.manifestDigest, digest);
      assert.equal(image.configDigest, config.digest);
      assert.deepEqual(
        reg.pushes.at(-1)?.map((i) => i.id),
        [image.id],
      );
      const got = await http(reg, "GET", "/v2/raw/manifests/v1");
      assert.deepEqual(got.body, manifest);
      assert.equal(header(got, "content-type"), OCI_MANIFEST);
    });

    it("a manifest naming a blob the store lacks gets MANIFEST_BLOB_UNKNOWN and records nothing", async () => {
      const missing = sha256("never pushed");
      const bad = Buffer.from(
        JSON.stringify({
          schemaVersion: 2,
          mediaType: OCI_MANIFEST,
          config: { mediaType: "application/vnd.oci.image.config.v1+json", ...config },
          layers: [{ mediaType: "application/vnd.oci.image.layer.v1.tar", digest: missing, size: 10 }],
        }),
      );
      const r = await put("/v2/broken/manifests/v1", bad);
      assertError(r, 400, "MANIFEST_BLOB_UNKNOWN");
      assert.deepEqual(json<{ errors: { detail: unknown }[] }>(r).errors[0]!.detail, { digest: missing });
      assert.equal(await reg.store.blobs.has(sha256(bad)), false);
      assert.ok(reg.store.catalog.list().every((i) => i.repository !== "docker.io/library/broken"));

      const index = Buffer.from(
        JSON.stringify({
          schemaVersion: 2,
          mediaType: OCI_INDEX,
          manifests: [
            {
              mediaType: OCI_MANIFEST,
              digest: missing,
              size: 10,
              platform: { os: "linux", architecture: "amd64" },
            },
          ],
        }),
      );
      assertError(
        await http(reg, "PUT", "/v2/broken/manifests/v2", {
          body: index,
          headers: { "content-type": OCI_INDEX },
        }),
        400,
        "MANIFEST_BLOB_UNKNOWN",
      );
    });

    it("refuses what is no manifest, and a tag for what is no container image", async () => {
      assertError(await put("/v2/raw/manifests/junk", Buffer.from("{not json")), 400, "MANIFEST_INVALID");
      const artifact = Buffer.from(
        JSON.stringify({
          schemaVersion: 2,
          mediaType: OCI_MANIFEST,
          config: { mediaType: "application/vnd.example.thing+json", ...config },
          layers: [],
        }),
      );
      assertError(await put("/v2/raw/manifests/artifact", artifact), 400, "MANIFEST_INVALID");
      // By digest it is only stored: fine.
      assert.equal((await put(`/v2/raw/manifests/${sha256(artifact)}`, artifact)).status, 201);
      const big = Buffer.alloc(4 * 1024 * 1024 + 1, 0x20);
      const tooBig = await put("/v2/raw/manifests/big", big);
      assert.equal(tooBig.status, 413);
    });

    it("a tag moved to a single-platform image no longer lists the index's other platforms", async () => {
      const cfg = JSON.stringify({
        architecture: "arm64",
        variant: "v8",
        os: "linux",
        config: {},
        rootfs: { type: "layers", diff_ids: [layer.digest] },
      });
      const armConfig = { digest: await putBlob("raw", cfg), size: Buffer.byteLength(cfg) };
      const arm = Buffer.from(
        JSON.stringify({
          schemaVersion: 2,
          mediaType: OCI_MANIFEST,
          config: { mediaType: "application/vnd.oci.image.config.v1+json", ...armConfig },
          layers: [{ mediaType: "application/vnd.oci.image.layer.v1.tar", ...layer }],
        }),
      );
      assert.equal((await put(`/v2/raw/manifests/${sha256(arm)}`, arm)).status, 201);
      const entry = (m: Buffer, architecture: string, variant?: string) => ({
        mediaType: OCI_MANIFEST,
        digest: sha256(m),
        size: m.length,
        platform: { os: "linux", architecture, ...(variant ? { variant } : {}) },
      });
      const index = Buffer.from(
        JSON.stringify({
          schemaVersion: 2,
          mediaType: OCI_INDEX,
          manifests: [entry(manifest, "amd64"), entry(arm, "arm64", "v8")],
        }),
      );
      const r = await http(reg, "PUT", "/v2/raw/manifests/both", {
        body: index,
        headers: { "content-type": OCI_INDEX },
      });
      assert.equal(r.status, 201, r.body.toString());
      const platforms = () =>
        reg.store.catalog
          .list()
          .filter((i) => i.ref === "docker.io/library/raw:both")
          .map((i) => `${i.platform} ${i.indexDigest === sha256(index) ? "index" : "-"}`);
      assert.deepEqual(platforms(), ["linux/amd64 index", "linux/arm64/v8 index"]);
      assert.deepEqual(json(await http(reg, "GET", "/v2/raw/tags/list")), {
        name: "raw",
        tags: ["both", "v1"],
      });

      assert.equal((await put("/v2/raw/manifests/both", manifest)).status, 201);
      assert.deepEqual(platforms(), ["linux/amd64 -"]);
      const tags = await http(reg, "GET", "/v2/raw/tags/list?n=1");
      assert.deepEqual(json(tags), { name: "raw", tags: ["both"] });
      assert.equal(header(tags, "link"), '</v2/raw/tags/list?n=1&last=both>; rel="next"');
    });
  });

  it("bad names get NAME_INVALID; unknown endpoints and methods are refused", async () => {
    assertError(await http(reg, "GET", "/v2/my_-app/tags/list"), 400, "NAME_INVALID");
    assertError(await http(reg, "GET", "/v2/myapp:v1/tags/list"), 400, "NAME_INVALID");
    assertError(await http(reg, "DELETE", `/v2/x/blobs/${sha256("x")}`), 405, "UNSUPPORTED");
    assertError(await http(reg, "GET", "/v2/x/nothing"), 404, "NOT_FOUND");
    assertError(await http(reg, "GET", "/v2/x/blobs/sha256:abc"), 400, "DIGEST_INVALID");
  });
});

describe("embedded registry and GC", () => {
  it("GC after every lease expired keeps all a pushed index serves (attestation manifests too)", async () => {
    const reg = await startKilnRegistry();
    const work = await makeTempDir("registry-gc");
    try {
      const multi = await pushImage(await multiArchImage(), reg, "multi:1");
      const store = await openStore(reg.root);
      try {
        // Two hours on: every lease has expired and every blob is past the grace period.
        const report = await collectGarbage(store, { graceMs: 0, now: Date.now() + 2 * 3600_000 });
        assert.deepEqual(report.blobs, []);
      } finally {
        store.close();
      }
      const out = join(work, "pulled");
      await skopeo([
        "copy",
        "-q",
        "--all",
        "--src-tls-verify=false",
        `docker://${reg.host}/multi:1`,
        `oci:${out}:m`,
      ]);
      const index = JSON.parse(await readFile(join(out, "index.json"), "utf8")) as {
        manifests: { digest: string }[];
      };
      assert.equal(index.manifests[0]!.digest, multi.digest);
    } finally {
      await reg.stop();
      await removeDir(work);
    }
  });
});
