import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { verify, X509Certificate } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { readFile, writeFile } from "node:fs/promises";
import { get as httpsGet } from "node:https";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { gunzipSync } from "node:zlib";
import { makeTempDir, removeDir, run } from "./exec.js";
import { multiArchImage, NO_EOF_SPEC, noEofImage, SAMPLE_SPEC, sampleImage } from "./fixtures.js";
import {
  buildImage,
  buildMultiArch,
  inspectRaw,
  type Layout,
  MEDIA,
  pushImage,
  sha256,
  skopeo,
  toDockerArchive,
  toOciArchive,
} from "./images.js";
import { writeLayerTar } from "./layers.js";
import { type Registry, type RegistryOptions, startRegistry } from "./registry.js";

const HELPERS = import.meta.dirname;

type Json = Record<string, unknown>;
interface Desc {
  mediaType: string;
  digest: string;
  size: number;
  platform?: Json;
  annotations?: Record<string, string>;
}

/** Running, not a zombie (an orphan may wait for a PID 1 that never reaps it). */
function isAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z";
  } catch {
    return false;
  }
}

async function waitDead(pid: number): Promise<boolean> {
  for (let i = 0; i < 200 && isAlive(pid); i++) await sleep(25);
  return !isAlive(pid);
}

/** GET a blob straight from an auth-less plain-HTTP registry (bytes are small fixtures). */
async function blob(reg: Registry, repo: string, digest: string): Promise<Buffer> {
  const res = await fetch(`${reg.url}/v2/${repo}/blobs/${digest}`);
  assert.equal(res.status, 200, `blob ${digest}`);
  return Buffer.from(await res.arrayBuffer());
}

const WRONG = { user: "kiln", pass: "wrong" };
const UNAUTHORIZED = /unauthorized|authentication required|401/i;

describe("registries: each kind takes a push and checks credentials", () => {
  let sample: Layout;
  before(async () => {
    sample = await sampleImage();
  });

  const kinds: [string, RegistryOptions][] = [
    ["plain", {}],
    ["htpasswd", { auth: "htpasswd" }],
    ["tls", { tls: true }],
    ["token", { auth: "token" }],
    ["token over tls", { auth: "token", tls: true }],
  ];
  for (const [name, opts] of kinds) {
    it(name, async (t) => {
      const reg = await startRegistry(opts);
      t.after(() => reg.stop());
      const pushed = await pushImage(sample, reg, "kiln/sample:1");
      assert.equal(pushed.ref, `${reg.host}/kiln/sample:1`);
      const raw = await inspectRaw(reg, "kiln/sample:1");
      assert.equal(raw.manifestDigest, pushed.digest);
      assert.equal((raw.json.layers as Desc[]).length, 3);
      assert.equal(raw.configDigest, (raw.json.config as Desc).digest);

      if (opts.auth) {
        await assert.rejects(inspectRaw(reg, "kiln/sample:1", { creds: WRONG }), UNAUTHORIZED);
        await assert.rejects(inspectRaw(reg, "kiln/sample:1", { creds: null }), UNAUTHORIZED);
      } else {
        await assert.rejects(inspectRaw(reg, "kiln/missing:1"), /manifest unknown|not found/i);
      }
      if (opts.tls) {
        assert.ok(reg.url.startsWith("https://") && reg.caFile);
        // Without the CA the certificate is refused; with it, a Node client gets through.
        await assert.rejects(
          skopeo(["inspect", "--raw", `docker://${reg.host}/kiln/sample:1`]),
          /certificate/i,
        );
        const ca = await readFile(reg.caFile);
        const status = await new Promise<number | undefined>((resolve, reject) =>
          httpsGet(`${reg.url}/v2/`, { ca }, (res) => {
            res.resume();
            resolve(res.statusCode);
          }).on("error", reject),
        );
        assert.equal(status, opts.auth ? 401 : 200);
      }
      if (opts.auth === "token") {
        const ts = reg.tokenServer!;
        assert.ok(ts.tokenRequests >= 3);
        assert.ok(
          ts.requests.some((r) => r.user === "kiln" && r.status === 200 && r.scopes[0]?.includes("push")),
        );
        assert.ok(ts.requests.some((r) => r.user === "kiln" && r.status === 401));
      }
      await reg.stop();
      assert.ok(await waitDead(reg.pid), "registry process ended");
      assert.ok(!existsSync(reg.storageDir), "storage removed");
    });
  }

  it("token: anonymousPull lets anonymous callers pull but not push", async (t) => {
    const reg = await startRegistry({ auth: "token", anonymousPull: true });
    t.after(() => reg.stop());
    await pushImage(sample, reg, "kiln/sample:1");
    const anon = await inspectRaw(reg, "kiln/sample:1", { creds: null });
    assert.equal((anon.json.layers as Desc[]).length, 3);
    await assert.rejects(pushImage(sample, reg, "kiln/other:1", { creds: null }), UNAUTHORIZED);
    assert.ok(reg.tokenServer!.requests.some((r) => r.user === null && r.status === 200));
  });

  it("token: JWTs are RS256, carry x5c and the granted access", async (t) => {
    const reg = await startRegistry({ auth: "token", users: [{ user: "ann", pass: "pw" }] });
    t.after(() => reg.stop());
    const ts = reg.tokenServer!;
    const q = `?service=${ts.service}&scope=repository:a/b:pull,push,delete`;
    const bad = await fetch(`${ts.realm}${q}`, { headers: { authorization: `Basic ${btoa("ann:nope")}` } });
    assert.equal(bad.status, 401);
    const res = await fetch(`${ts.realm}${q}`, { headers: { authorization: `Basic ${btoa("ann:pw")}` } });
    assert.equal(res.status, 200);
    const body = (await res.json()) as { token: string; access_token: string; expires_in: number };
    assert.equal(body.token, body.access_token);
    const [h, p, s] = body.token.split(".") as [string, string, string];
    const header = JSON.parse(Buffer.from(h, "base64url").toString()) as { alg: string; x5c: string[] };
    const claims = JSON.parse(Buffer.from(p, "base64url").toString()) as Json;
    assert.equal(header.alg, "RS256");
    const cert = new X509Certificate(Buffer.from(header.x5c[0]!, "base64"));
    assert.ok(cert.checkIssued(new X509Certificate(await readFile(ts.rootCertFile))));
    assert.ok(verify("sha256", Buffer.from(`${h}.${p}`), cert.publicKey, Buffer.from(s, "base64url")));
    assert.equal(claims.aud, ts.service);
    assert.equal(claims.iss, ts.issuer);
    assert.equal(claims.sub, "ann");
    assert.deepEqual(claims.access, [{ type: "repository", name: "a/b", actions: ["pull", "push"] }]);
    assert.equal(ts.tokenRequests, 2);
  });

  it("a test process that forgets stop() leaves no registry or temp dir behind", async () => {
    const code = `const { startRegistry } = await import(${JSON.stringify(join(HELPERS, "registry.ts"))});
      const r = await startRegistry({ auth: "htpasswd", tls: true });
      console.log(JSON.stringify({ pid: r.pid, dir: r.storageDir }));`;
    const out = await run(process.execPath, ["--import", "tsx", "--input-type=module", "-e", code]);
    const { pid, dir } = JSON.parse(out) as { pid: number; dir: string };
    assert.ok(await waitDead(pid), "exit hook killed the registry");
    assert.ok(!existsSync(dir), "exit hook removed the temp dir");
  });

  it("a test process killed with SIGKILL takes its registry along (pdeathsig)", async () => {
    const code = `const { startRegistry } = await import(${JSON.stringify(join(HELPERS, "registry.ts"))});
      const r = await startRegistry();
      console.log(JSON.stringify({ pid: r.pid, dir: r.storageDir }));
      setInterval(() => {}, 1000);`;
    const child = spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", code], {
      stdio: ["ignore", "pipe", "inherit"],
    });
    const line = await new Promise<string>((resolve, reject) => {
      let buf = "";
      child.stdout.on("data", (d: Buffer) => {
        buf += d.toString();
        if (buf.includes("\n")) resolve(buf);
      });
      child.on("exit", () => reject(new Error(`child exited early: ${buf}`)));
    });
    const { pid, dir } = JSON.parse(line) as { pid: number; dir: string };
    assert.ok(isAlive(pid));
    child.kill("SIGKILL");
    assert.ok(await waitDead(pid), "registry died with its parent");
    await removeDir(join(dir, "..")); // no exit hook ran: clean up here
  });
});

describe("fixtures: each variant arrives with the intended media types", () => {
  let reg: Registry;
  before(async () => {
    reg = await startRegistry();
  });
  after(() => reg.stop());

  async function layersOf(
    repoTag: string,
  ): Promise<{ raw: Awaited<ReturnType<typeof inspectRaw>>; layers: Desc[] }> {
    const raw = await inspectRaw(reg, repoTag);
    return { raw, layers: raw.json.layers as Desc[] };
  }

  it("gzip OCI (default): layers +gzip, config has every field of the spec", async () => {
    const pushed = await pushImage(await sampleImage(), reg, "f/sample:gzip");
    const { raw, layers } = await layersOf("f/sample:gzip");
    assert.equal(raw.mediaType, MEDIA.OCI_MANIFEST);
    assert.equal(raw.manifestDigest, pushed.digest);
    assert.deepEqual(
      layers.map((l) => l.mediaType),
      Array(3).fill(MEDIA.OCI_LAYER_GZIP),
    );
    assert.equal((raw.json.config as Desc).mediaType, MEDIA.OCI_CONFIG);
    for (const l of layers)
      assert.deepEqual([...(await blob(reg, "f/sample", l.digest)).subarray(0, 2)], [0x1f, 0x8b]);
    const config = JSON.parse(raw.config!.toString()) as { architecture: string; os: string; config: Json };
    assert.equal(config.architecture, "amd64");
    assert.equal(config.os, "linux");
    assert.deepEqual(config.config, {
      User: "1000:1000",
      ExposedPorts: { "8080/tcp": {} },
      Env: SAMPLE_SPEC.config!.env,
      Entrypoint: ["/bin/hello"],
      Cmd: ["--greet", "world"],
      WorkingDir: "/home/user",
      Labels: { "org.example.kiln": "sample" },
      StopSignal: "SIGINT",
    });
  });

  it("the sample's first layer keeps owners, modes, links and xattrs", async () => {
    const { layers } = await layersOf("f/sample:gzip");
    const dir = await makeTempDir("check");
    try {
      const file = join(dir, "l0.tar");
      await writeFile(file, gunzipSync(await blob(reg, "f/sample", layers[0]!.digest)));
      const listing = await run("tar", ["-tvv", "--xattrs", "--numeric-owner", "-f", file], {
        env: { TZ: "UTC" },
      });
      assert.match(listing, /^hrwxr-xr-x +0\/0 .* bin\/hello-link link to bin\/hello$/m);
      assert.match(listing, /^lrwxrwxrwx +0\/0 .* bin\/sh -> \/bin\/hello$/m);
      assert.match(listing, /^-rwsr-xr-x +0\/0 .* bin\/su$/m);
      assert.match(listing, /^drwxrwxrwt +0\/0 .* tmp\/$/m);
      assert.match(listing, /^drwx------ +1000\/1000 .* 2024-01-01 00:00 home\/user\/$/m);
      assert.match(listing, /x: +6 user\.kiln/);
    } finally {
      await removeDir(dir);
    }
  });

  it("zstd: layers +zstd with zstd data, config unchanged", async () => {
    const pushed = await pushImage(await sampleImage(), reg, "f/sample:zstd", { compression: "zstd" });
    const { raw, layers } = await layersOf("f/sample:zstd");
    assert.equal(raw.manifestDigest, pushed.digest);
    assert.deepEqual(
      layers.map((l) => l.mediaType),
      Array(3).fill(MEDIA.OCI_LAYER_ZSTD),
    );
    for (const l of layers) {
      assert.deepEqual([...(await blob(reg, "f/sample", l.digest)).subarray(0, 4)], [0x28, 0xb5, 0x2f, 0xfd]);
    }
    assert.equal(raw.configDigest, (await inspectRaw(reg, "f/sample:gzip")).configDigest);
  });

  it("uncompressed: plain tar layers whose digests are the diff IDs", async () => {
    await pushImage(await sampleImage(), reg, "f/sample:none", { compression: "none" });
    const { raw, layers } = await layersOf("f/sample:none");
    assert.deepEqual(
      layers.map((l) => l.mediaType),
      Array(3).fill(MEDIA.OCI_LAYER),
    );
    const config = JSON.parse(raw.config!.toString()) as { rootfs: { diff_ids: string[] } };
    assert.deepEqual(
      layers.map((l) => l.digest),
      config.rootfs.diff_ids,
    );
    const first = await blob(reg, "f/sample", layers[0]!.digest);
    assert.equal(first.subarray(257, 262).toString(), "ustar");
  });

  it("Docker schema 2 (gzip and uncompressed): Docker media types throughout", async () => {
    for (const compression of ["gzip", "none"] as const) {
      const tag = `f/sample:v2s2-${compression}`;
      await pushImage(await sampleImage(), reg, tag, { format: "v2s2", compression });
      const { raw, layers } = await layersOf(tag);
      assert.equal(raw.mediaType, MEDIA.DOCKER_MANIFEST);
      assert.equal((raw.json.config as Desc).mediaType, MEDIA.DOCKER_CONFIG);
      const want = compression === "gzip" ? MEDIA.DOCKER_LAYER_GZIP : MEDIA.DOCKER_LAYER;
      assert.deepEqual(
        layers.map((l) => l.mediaType),
        Array(3).fill(want),
      );
    }
    await assert.rejects(
      pushImage(await sampleImage(), reg, "f/x:1", { format: "v2s2", compression: "zstd" }),
      /zstd/,
    );
  });

  it("multi-arch: an OCI index of amd64, arm64/v8 and an attestation, pushed with --all", async () => {
    const pushed = await pushImage(await multiArchImage(), reg, "f/multi:1");
    const raw = await inspectRaw(reg, "f/multi:1");
    assert.equal(raw.mediaType, MEDIA.OCI_INDEX);
    assert.equal(raw.manifestDigest, pushed.digest);
    assert.equal(raw.config, undefined);
    const [amd, arm, att] = raw.json.manifests as Desc[];
    assert.deepEqual(amd!.platform, { architecture: "amd64", os: "linux" });
    assert.deepEqual(arm!.platform, { architecture: "arm64", os: "linux", variant: "v8" });
    assert.deepEqual(att!.platform, { architecture: "unknown", os: "unknown" });
    assert.equal(att!.annotations?.["vnd.docker.reference.type"], "attestation-manifest");
    assert.equal(att!.annotations?.["vnd.docker.reference.digest"], amd!.digest);
    for (const [d, arch] of [
      [amd!, "amd64"],
      [arm!, "arm64"],
    ] as const) {
      const child = await inspectRaw(reg, `f/multi@${d.digest}`);
      const config = JSON.parse(child.config!.toString()) as Json;
      assert.equal(config.architecture, arch);
      assert.equal(config.variant, arch === "arm64" ? "v8" : undefined);
      const layers = child.json.layers as Desc[];
      const etc = gunzipSync(await blob(reg, "f/multi", layers[0]!.digest));
      assert.ok(etc.includes(`${arch}\n`), `${arch} layer names its architecture`);
    }
    const attestation = await inspectRaw(reg, `f/multi@${att!.digest}`);
    assert.equal((attestation.json.layers as Desc[])[0]!.mediaType, MEDIA.IN_TOTO);
  });

  it("multi-arch zstd: every image's layers +zstd, the attestation untouched", async () => {
    await pushImage(await multiArchImage(), reg, "f/multi:zstd", { compression: "zstd" });
    const [amd, arm, att] = (await inspectRaw(reg, "f/multi:zstd")).json.manifests as Desc[];
    for (const d of [amd!, arm!]) {
      const layers = (await inspectRaw(reg, `f/multi@${d.digest}`)).json.layers as Desc[];
      assert.deepEqual(
        layers.map((l) => l.mediaType),
        [MEDIA.OCI_LAYER_ZSTD, MEDIA.OCI_LAYER_ZSTD],
      );
    }
    const attestation = await inspectRaw(reg, `f/multi@${att!.digest}`);
    assert.equal((attestation.json.layers as Desc[])[0]!.mediaType, MEDIA.IN_TOTO);
  });

  it("no-EOF layer: the tar stops right after its last entry, diff ID matches", async () => {
    await pushImage(await noEofImage(), reg, "f/noeof:1");
    const { raw, layers } = await layersOf("f/noeof:1");
    assert.deepEqual(
      layers.map((l) => l.mediaType),
      [MEDIA.OCI_LAYER_GZIP, MEDIA.OCI_LAYER_GZIP],
    );
    const tar = gunzipSync(await blob(reg, "f/noeof", layers[1]!.digest));
    const last = NO_EOF_SPEC.layers[1] as { entries: { content?: string }[] };
    // Two headers and one data block: no zero blocks, no record padding.
    assert.equal(tar.length, 3 * 512);
    assert.ok(tar.subarray(1024).toString().startsWith(last.entries[1]!.content!));
    const config = JSON.parse(raw.config!.toString()) as { rootfs: { diff_ids: string[] } };
    assert.equal(config.rootfs.diff_ids[1], sha256(tar));
    // The complete first layer still ends with GNU tar's zero blocks.
    const full = gunzipSync(await blob(reg, "f/noeof", layers[0]!.digest));
    assert.ok(full.subarray(-1024).every((b) => b === 0));
  });

  it("docker-archive and oci-archive files from a layout", async () => {
    const dir = await makeTempDir("archives");
    try {
      const docker = await toDockerArchive(await sampleImage(), join(dir, "d.tar"), "example/app:1");
      const manifest = JSON.parse(await run("tar", ["-xOf", docker, "manifest.json"])) as {
        RepoTags: string[];
        Layers: string[];
      }[];
      // skopeo writes the fully qualified name; `docker save` would write "example/app:1".
      assert.deepEqual(manifest[0]!.RepoTags, ["docker.io/example/app:1"]);
      assert.equal(manifest[0]!.Layers.length, 3);
      const oci = await toOciArchive(await multiArchImage(), join(dir, "o.tar"));
      const names = (await run("tar", ["-tf", oci])).split("\n");
      assert.ok(names.includes("index.json") && names.includes("oci-layout"));
      const index = JSON.parse(await skopeo(["inspect", "--raw", `oci-archive:${oci}:multi`])) as Json;
      assert.equal(index.mediaType, MEDIA.OCI_INDEX);
    } finally {
      await removeDir(dir);
    }
  });
});

describe("builders", () => {
  it("are reproducible: the same spec gives the same manifest digest", async () => {
    const dir = await makeTempDir("repro");
    try {
      const again = await buildImage(join(dir, "a"), SAMPLE_SPEC);
      const cached = await sampleImage();
      const digestOf = async (l: Layout) => sha256(Buffer.from(await skopeo(["inspect", "--raw", l.ref])));
      assert.equal(await digestOf(again), await digestOf(cached));
      const multi = await buildMultiArch(join(dir, "m"), { tag: "m", attestation: false });
      const index = JSON.parse(await skopeo(["inspect", "--raw", multi.ref])) as { manifests: Desc[] };
      assert.equal(index.manifests.length, 2);
    } finally {
      await removeDir(dir);
    }
  });

  it("refuse a hardlink separated from its target by another owner's entry", async () => {
    const dir = await makeTempDir("bad-link");
    try {
      await assert.rejects(
        writeLayerTar(join(dir, "x.tar"), [
          { path: "a", content: "x" },
          { path: "b", content: "y", uid: 5 },
          { path: "c", type: "hardlink", target: "a" },
        ]),
        /hardlink c: an entry of another owner separates it from a/,
      );
    } finally {
      await removeDir(dir);
    }
  });
});
