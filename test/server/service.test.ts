/**
 * `kiln serve` end to end, as a child process, against a real docker-registry: the image API
 * (queue, errors, auth), OpenAPI, metrics, crash recovery with kill -9 during a pull and during a
 * conversion, GC afterwards, SIGTERM.
 */
import assert from "node:assert/strict";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { BLOB_PATH, childEnv, runKiln } from "../cli/kiln.js";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { type FaultProxy, startFaultProxy } from "../helpers/faultproxy.js";
import { sampleImage } from "../helpers/fixtures.js";
import { inspectRaw, pushImage, sha256, skopeo } from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import { type Service, startService } from "./service.js";

const TOKEN = "s3cret-token";

interface Image {
  id: number;
  name: string;
  status: string;
  queuePosition: number | null;
  error: { code: string; message: string } | null;
  artifact: string | null;
  format: string;
  digest: string | null;
  size: number | null;
}

/** Polls GET /images/{ref} until the image has ended; returns every record seen (no timing involved). */
async function untilEnded(svc: Service, name: string, format: string, token?: string): Promise<Image[]> {
  const seen: Image[] = [];
  for (;;) {
    const r = await svc.request(
      "GET",
      `/images/${encodeURIComponent(name)}?format=${format}`,
      undefined,
      token,
    );
    assert.equal(r.status, 200, r.text);
    seen.push(r.json);
    if (r.json.status === "ready" || r.json.status === "failed") return seen;
    await new Promise((resolve) => setImmediate(resolve));
  }
}

/** Lines of the Prometheus text format: comments, or `name{labels} value`. */
function parsePrometheus(text: string): Map<string, number> {
  const samples = new Map<string, number>();
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("# HELP ") || line.startsWith("# TYPE ")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$/.exec(
      line,
    );
    assert.ok(m, `not Prometheus text: ${JSON.stringify(line)}`);
    // Go's ParseFloat (Prometheus) takes Inf and NaN in any case; prom-client writes "Nan".
    const special = /^([+-]?)(inf|nan)$/i.exec(m[3]!);
    const value = special
      ? special[2]!.toLowerCase() === "nan"
        ? Number.NaN
        : Number(`${special[1]}Infinity`)
      : Number(m[3]);
    assert.ok(special || !Number.isNaN(value), line);
    samples.set(`${m[1]}${m[2] ?? ""}`, value);
  }
  return samples;
}

describe("kiln serve", () => {
  let reg: Registry;
  let proxy: FaultProxy;
  let work: string;
  const refs: string[] = [];

  before(async () => {
    reg = await startRegistry();
    proxy = await startFaultProxy(reg.url);
    work = await makeTempDir("serve");
    const image = await sampleImage();
    for (const tag of ["one", "two", "three"]) {
      const pushed = await pushImage(image, reg, `svc/${tag}:1`);
      refs.push(pushed.ref.replace(reg.host, proxy.host));
    }
  });
  after(async () => {
    await proxy?.close();
    await reg?.stop();
    if (work) await removeDir(work);
  });

  it("queues requests FIFO (concurrency 1), joins duplicates, reports a failure by code, guards with a token", async () => {
    const svc = await startService(join(work, "queue"), ["--concurrency", "1", "--token", TOKEN]);
    try {
      // Token: everything but /healthz.
      assert.equal((await svc.request("GET", "/healthz")).status, 200);
      const anon = await svc.request("GET", "/images");
      assert.equal(anon.status, 401);
      assert.equal(anon.json.code, "UNAUTHORIZED");
      assert.equal((await svc.request("GET", "/images", undefined, "wrong")).status, 401);
      assert.equal((await svc.request("GET", "/v2/")).status, 401);

      // Hold the first pull's layer download so the queue behind it is known.
      const hold = proxy.addRule({ method: "GET", path: BLOB_PATH, action: { barrier: 1000 } });
      const first = await svc.request("POST", "/images", { name: refs[0], format: "ext4" }, TOKEN);
      assert.equal(first.status, 202, first.text);
      while (!proxy.requests.some((r) => r.fault === "barrier")) await new Promise((r) => setImmediate(r));
      const missing = await svc.request("POST", "/images", { name: `${proxy.host}/svc/none:1` }, TOKEN);
      const second = await svc.request("POST", "/images", { name: refs[1], format: "erofs" }, TOKEN);
      const third = await svc.request("POST", "/images", { name: refs[2], format: "cpio" }, TOKEN);
      assert.deepEqual(
        [first, missing, second, third].map((r) => [r.status, r.json.status, r.json.queuePosition]),
        [
          [202, "pulling", 0],
          [202, "pending", 2],
          [202, "pending", 3],
          [202, "pending", 4],
        ],
      );
      // A pending image is visible by its name at once.
      const pending = await svc.request("GET", `/images/${encodeURIComponent(refs[2]!)}`, undefined, TOKEN);
      assert.equal(pending.json.status, "pending");
      const dup = await svc.request("POST", "/images", { name: refs[1], format: "erofs" }, TOKEN);
      assert.equal(dup.json.id, second.json.id);
      hold.remove();

      for (const [ref, format] of [
        [refs[0]!, "ext4"],
        [refs[1]!, "erofs"],
        [refs[2]!, "cpio"],
      ] as const) {
        const seen = await untilEnded(svc, ref, format, TOKEN);
        const positions = seen.map((i) => i.queuePosition).filter((p) => p !== null) as number[];
        for (let k = 1; k < positions.length; k++)
          assert.ok(positions[k]! <= positions[k - 1]!, `${positions}`);
        const last = seen.at(-1)!;
        assert.equal(last.status, "ready", JSON.stringify(last.error));
        assert.ok(last.artifact && last.size! > 0);
      }
      const failed = (await untilEnded(svc, `${proxy.host}/svc/none:1`, "ext4", TOKEN)).at(-1)!;
      assert.equal(failed.status, "failed");
      assert.equal(failed.error?.code, "NOT_FOUND");

      const ext4 = await svc.request("GET", `/images/${encodeURIComponent(refs[0]!)}`, undefined, TOKEN);
      await run("e2fsck", ["-fn", ext4.json.artifact]);
      // Another format of a present image.
      const erofs = await svc.request(
        "POST",
        `/images/${encodeURIComponent(refs[0]!)}/exports`,
        { format: "erofs" },
        TOKEN,
      );
      assert.ok([200, 202].includes(erofs.status), erofs.text);
      const built = (await untilEnded(svc, refs[0]!, "erofs", TOKEN)).at(-1)!;
      assert.equal(built.status, "ready");
      await run("fsck.erofs", [built.artifact!]);

      // `kiln images` on the same store, while the service runs, shows the service's builds.
      const listed = await runKiln(["--root", join(work, "queue"), "--json", "images"], childEnv());
      assert.equal(listed.code, 0, listed.stderr);
      const rows = JSON.parse(listed.stdout) as {
        ref: string | null;
        builds?: { format: string; status: string }[];
      }[];
      const row = rows.find((r) => r.ref === ext4.json.name);
      assert.deepEqual(row?.builds?.map((b) => `${b.format}:${b.status}`).sort(), [
        "erofs:ready",
        "ext4:ready",
      ]);
      const failedRow = rows.find((r) => r.ref === failed.name);
      assert.deepEqual(
        failedRow?.builds?.map((b) => b.status),
        ["failed"],
      );

      // SIGTERM: a clean exit.
      assert.equal(await svc.stop(), 0);
    } finally {
      if (svc.child.exitCode === null) await svc.kill9();
    }
  });

  it("takes pushes into its registry (token as password), converts them on push, and serves them back", async () => {
    const root = join(work, "push");
    const svc = await startService(root, [
      "--token",
      TOKEN,
      "--convert-on-push",
      "--default-format",
      "erofs",
    ]);
    try {
      const host = new URL(svc.url).host;
      const image = await sampleImage();
      const creds = `--dest-creds=kiln:${TOKEN}`;
      // Without the token the push is refused.
      await assert.rejects(
        skopeo(["copy", "-q", "--dest-tls-verify=false", image.ref, `docker://${host}/pushed/app:1`]),
        /unauthorized|authentication required|401/i,
      );
      await skopeo([
        "copy",
        "-q",
        "--dest-tls-verify=false",
        creds,
        image.ref,
        `docker://${host}/pushed/app:1`,
      ]);
      const name = "docker.io/pushed/app:1";
      const built = (await untilEnded(svc, name, "erofs", TOKEN)).at(-1)!;
      assert.equal(built.status, "ready", JSON.stringify(built.error));
      await run("fsck.erofs", [built.artifact!]);
      // Pulled back out by another client: the same manifest digest.
      const raw = await run(
        "skopeo",
        ["inspect", "--raw", "--tls-verify=false", `--creds=kiln:${TOKEN}`, `docker://${host}/pushed/app:1`],
        { binary: true },
      );
      assert.equal(sha256(raw), built.digest);
    } finally {
      await svc.stop();
    }
  });

  it("maps errors to statuses with a JSON body", async () => {
    const svc = await startService(join(work, "errors"), []);
    try {
      const cases: [string, string, unknown, number, string][] = [
        ["POST", "/images", { name: "Not A Ref!" }, 400, "INVALID_REFERENCE"],
        ["POST", "/images", { name: "x", format: "zip" }, 400, "INVALID_ARGUMENT"],
        ["POST", "/images", { nope: 1 }, 400, "INVALID_ARGUMENT"],
        ["POST", "/images", { name: "x", platform: "plan9x" }, 400, "INVALID_PLATFORM"],
        ["GET", "/images/nothing%3A1", undefined, 404, "NOT_FOUND"],
        ["DELETE", "/images/nothing%3A1", undefined, 404, "NOT_FOUND"],
        ["GET", "/no/such/route", undefined, 404, "NOT_FOUND"],
      ];
      for (const [method, path, body, status, code] of cases) {
        const r = await svc.request(method, path, body);
        assert.equal(r.status, status, `${method} ${path}: ${r.text}`);
        assert.equal(r.json.code, code, `${method} ${path}: ${r.text}`);
        assert.equal(typeof r.json.message, "string");
      }
      // Two formats of one image and neither the default: 409 until a format is named.
      const ref = refs[0]!;
      for (const format of ["cpio", "erofs"]) await svc.request("POST", "/images", { name: ref, format });
      await untilEnded(svc, ref, "cpio");
      await untilEnded(svc, ref, "erofs");
      const amb = await svc.request("GET", `/images/${encodeURIComponent(ref)}`);
      assert.equal(amb.status, 409);
      assert.equal(amb.json.code, "AMBIGUOUS_REF");
      // By digest prefix.
      const one = await svc.request("GET", `/images/${encodeURIComponent(ref)}?format=cpio`);
      const byDigest = await svc.request("GET", `/images/${one.json.digest.slice(7, 19)}?format=cpio`);
      assert.equal(byDigest.json.id, one.json.id);
      // DELETE takes the image and its artifacts out of the store.
      const del = await svc.request("DELETE", `/images/${encodeURIComponent(ref)}`);
      assert.equal(del.status, 200, del.text);
      assert.equal(del.json.length, 2);
      assert.equal((await svc.request("GET", `/images/${encodeURIComponent(ref)}`)).status, 404);
      assert.deepEqual(await readdir(join(work, "errors", "artifacts")), []);
    } finally {
      await svc.stop();
    }
  });

  it("serves a valid OpenAPI document that lists every route, and Prometheus metrics", async () => {
    const svc = await startService(join(work, "docs"), []);
    try {
      const r = await svc.request("POST", "/images", { name: refs[1], format: "cpio" });
      assert.equal(r.status, 202);
      await untilEnded(svc, refs[1]!, "cpio");

      const doc = (await svc.request("GET", "/openapi.json")).json;
      assert.equal(doc.openapi, "3.1.0");
      assert.ok(doc.info.title && doc.info.version);
      // Every $ref resolves inside the document.
      const refsIn = (v: unknown): string[] =>
        v && typeof v === "object"
          ? Object.entries(v).flatMap(([k, x]) => (k === "$ref" ? [x as string] : refsIn(x)))
          : [];
      for (const p of refsIn(doc)) {
        assert.match(p, /^#\/components\/schemas\/\w+$/);
        assert.ok(doc.components.schemas[p.split("/").pop()!], `unresolved ${p}`);
      }
      // Every operation is served (no "no route" 404) and has responses; operation ids are unique.
      const ids = new Set<string>();
      for (const [path, ops] of Object.entries<Record<string, { operationId: string; responses: object }>>(
        doc.paths,
      )) {
        for (const [method, op] of Object.entries(ops)) {
          assert.ok(!ids.has(op.operationId), op.operationId);
          ids.add(op.operationId);
          assert.ok(Object.keys(op.responses).length > 0);
          const concrete = path.replace("{ref}", "nothing%3A1");
          const res = await svc.request(
            method.toUpperCase(),
            concrete,
            method === "post" ? { name: "x", format: "cpio" } : undefined,
          );
          assert.ok(!(res.status === 404 && /no route/.test(res.text)), `${method} ${path} is not served`);
        }
      }
      for (const id of [
        "createImage",
        "listImages",
        "getImage",
        "deleteImage",
        "createExport",
        "health",
        "metrics",
        "openapi",
      ]) {
        assert.ok(ids.has(id), id);
      }

      const metrics = await svc.request("GET", "/metrics");
      assert.equal(metrics.status, 200);
      assert.match(metrics.headers.get("content-type") ?? "", /^text\/plain/);
      const samples = parsePrometheus(metrics.text);
      assert.ok((samples.get('kiln_build_duration_seconds_count{format="cpio",status="ready"}') ?? 0) >= 1);
      assert.ok((samples.get('kiln_pulls_total{result="ok"}') ?? 0) >= 1);
      assert.equal(samples.get("kiln_queue_length"), 0);
      assert.ok((samples.get('kiln_images{status="ready"}') ?? 0) >= 1);
      assert.ok((samples.get("kiln_blob_bytes") ?? 0) > 0);
      assert.ok((samples.get("kiln_artifact_bytes") ?? 0) > 0);
    } finally {
      await svc.stop();
    }
  });

  it("kill -9 during a pull and during a conversion: a restart finishes the builds, nothing half-written is ready, GC removes the orphans", async () => {
    const root = join(work, "crash");
    // 1. Killed while a layer download is held.
    proxy.reset();
    const raw = await inspectRaw(reg, "svc/one:1");
    const layer = (raw.json.layers as { digest: string }[])[0]!.digest;
    const hold = proxy.addRule({
      method: "GET",
      path: new RegExp(`/blobs/${layer}$`),
      action: { barrier: 1000 },
    });
    let svc = await startService(root, ["--concurrency", "1"]);
    await svc.request("POST", "/images", { name: refs[0], format: "ext4" });
    while (!proxy.requests.some((r) => r.fault === "barrier" && r.status === undefined)) {
      await new Promise((r) => setImmediate(r));
    }
    await svc.kill9();
    hold.remove();
    // 2. Killed the moment a build starts converting (the crash script kills itself there).
    svc = await startService(root, [], { crashAt: "converting" });
    const died = await svc.exited;
    assert.equal(died, null, "the crash script died by SIGKILL");
    const staging = (await readdir(join(root, "tmp"))).filter((n) => n.startsWith("stage-"));
    assert.ok(staging.length > 0, "the killed pull left its staging dir behind");

    // 3. A normal start: the interrupted build is re-queued and finishes.
    svc = await startService(root, ["--concurrency", "1"]);
    try {
      const seen = await untilEnded(svc, refs[0]!, "ext4");
      const last = seen.at(-1)!;
      assert.equal(last.status, "ready", JSON.stringify(last.error));
      await run("e2fsck", ["-fn", last.artifact!]);
      for (const i of (await svc.request("GET", "/images")).json as Image[]) {
        if (i.status === "ready") await run("e2fsck", ["-fn", i.artifact!]);
      }
    } finally {
      await svc.stop();
    }
    // GC after the grace period: the orphans go, the image and its artifact stay.
    const gc = await runKiln(["--root", root, "--json", "gc", "--grace", "0"], childEnv());
    assert.equal(gc.code, 0, gc.stderr);
    assert.deepEqual(
      (await readdir(join(root, "tmp"))).filter((n) => n.startsWith("stage-")),
      [],
    );
    svc = await startService(root, []);
    try {
      const after = (await svc.request("GET", `/images/${encodeURIComponent(refs[0]!)}`)).json as Image;
      assert.equal(after.status, "ready");
      await run("e2fsck", ["-fn", after.artifact!]);
    } finally {
      await svc.stop();
    }
  });
});
