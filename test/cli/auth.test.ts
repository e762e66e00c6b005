/**
 * `kiln pull` against registries that want credentials or TLS: Basic auth (htpasswd) with --creds
 * and with a docker config.json, a self-signed certificate with and without --ca-file, and token
 * auth with a real token server that counts the tokens it hands out.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { removeDir } from "../helpers/exec.js";
import { SAMPLE_SPEC, sampleImage } from "../helpers/fixtures.js";
import { inspectRaw, pushImage, type RawImage } from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import {
  assertBlobsVerify,
  assertConfig,
  assertFails,
  assertMatchesRaw,
  assertTmpEmpty,
  blobNames,
  dockerConfigWithAuth,
  type InspectJson,
  type PullJson,
  type Sandbox,
  sandbox,
} from "./kiln.js";

/** Pulled and recorded as pushed; the store verifies and tmp/ is empty. */
async function assertPulled(box: Sandbox, ref: string, raw: RawImage, pulled: PullJson): Promise<void> {
  assert.equal(pulled.digest, raw.manifestDigest);
  const info = await box.json<InspectJson>(["inspect", ref]);
  assertMatchesRaw(info, raw);
  assertConfig(info, SAMPLE_SPEC.config!);
  await assertBlobsVerify(box.root);
  await assertTmpEmpty(box.root);
}

describe("kiln pull with credentials and TLS", () => {
  let basic: Registry;
  let tls: Registry;
  let token: Registry;
  const raw: Record<string, RawImage> = {};

  before(async () => {
    const sample = await sampleImage();
    [basic, tls, token] = await Promise.all([
      startRegistry({ auth: "htpasswd" }),
      startRegistry({ tls: true }),
      startRegistry({ auth: "token" }),
    ]);
    await Promise.all(
      Object.entries({ basic, tls, token }).map(async ([name, reg]) => {
        await pushImage(sample, reg, "private/sample:1");
        raw[name] = await inspectRaw(reg, "private/sample:1");
      }),
    );
  });
  after(async () => {
    await Promise.all([basic, tls, token].map((r) => r?.stop()));
  });

  describe("htpasswd (Basic auth)", () => {
    const ref = () => `${basic.host}/private/sample:1`;
    const creds = () => `${basic.users[0]!.user}:${basic.users[0]!.pass}`;

    it("pulls with --creds", async () => {
      const box = await sandbox();
      try {
        const pulled = await box.json<PullJson>(["pull", "--creds", creds(), ref()]);
        await assertPulled(box, ref(), raw.basic!, pulled);
      } finally {
        await box.cleanup();
      }
    });

    it("pulls with an `auths` entry in DOCKER_CONFIG/config.json", async () => {
      const box = await sandbox();
      const u = basic.users[0]!;
      const config = await dockerConfigWithAuth(basic.host, u.user, u.pass);
      try {
        const pulled = await box.json<PullJson>(["pull", ref()], { env: { DOCKER_CONFIG: config } });
        await assertPulled(box, ref(), raw.basic!, pulled);
      } finally {
        await box.cleanup();
        await removeDir(config);
      }
    });

    it("fails with UNAUTHORIZED for wrong credentials, and for none, storing nothing", async () => {
      const box = await sandbox();
      try {
        const wrong = assertFails(await box.kiln(["pull", "--creds", "wrong:wrong", ref()]), "UNAUTHORIZED");
        assert.match(wrong, new RegExp(basic.host));
        assertFails(await box.kiln(["pull", ref()]), "UNAUTHORIZED");
        assert.deepEqual(await blobNames(box.root), []);
        assert.deepEqual(await box.json(["images"]), []);
        await assertTmpEmpty(box.root);
      } finally {
        await box.cleanup();
      }
    });
  });

  describe("self-signed TLS", () => {
    const ref = () => `${tls.host}/private/sample:1`;

    it("pulls with --ca-file", async () => {
      const box = await sandbox();
      try {
        const pulled = await box.json<PullJson>(["pull", "--ca-file", tls.caFile!, ref()]);
        await assertPulled(box, ref(), raw.tls!, pulled);
      } finally {
        await box.cleanup();
      }
    });

    it("pulls with NODE_EXTRA_CA_CERTS naming the CA (bin/kiln defers it to the first TLS connection)", async () => {
      const box = await sandbox();
      try {
        const pulled = await box.json<PullJson>(["pull", ref()], {
          env: { NODE_EXTRA_CA_CERTS: tls.caFile! },
        });
        await assertPulled(box, ref(), raw.tls!, pulled);
      } finally {
        await box.cleanup();
      }
    });

    it("fails with TLS without the CA (and does not fall back to plain HTTP)", async () => {
      const box = await sandbox();
      try {
        const line = assertFails(await box.kiln(["pull", ref()]), "TLS");
        assert.match(line, new RegExp(tls.host));
        assert.deepEqual(await blobNames(box.root), []);
      } finally {
        await box.cleanup();
      }
    });
  });

  describe("token auth", () => {
    const ref = () => `${token.host}/private/sample:1`;
    const creds = () => `${token.users[0]!.user}:${token.users[0]!.pass}`;

    it("pulls with --creds, asking the token server once for the repository's pull scope", async () => {
      const box = await sandbox();
      try {
        const server = token.tokenServer!;
        const before = server.requests.length;
        const pulled = await box.json<PullJson>(["pull", "--creds", creds(), ref()]);
        const asked = server.requests.slice(before);
        assert.deepEqual(asked, [
          { user: token.users[0]!.user, scopes: ["repository:private/sample:pull"], status: 200 },
        ]);
        await assertPulled(box, ref(), raw.token!, pulled);

        // A second pull is a new process: again exactly one token.
        const again = server.requests.length;
        const warm = await box.json<PullJson>(["pull", "--creds", creds(), ref()]);
        assert.equal(warm.downloaded, 0);
        assert.equal(server.requests.length - again, 1);
      } finally {
        await box.cleanup();
      }
    });

    it("fails with UNAUTHORIZED when the token server refuses the credentials", async () => {
      const box = await sandbox();
      try {
        assertFails(await box.kiln(["pull", "--creds", "wrong:wrong", ref()]), "UNAUTHORIZED");
        assertFails(await box.kiln(["pull", ref()]), "UNAUTHORIZED");
        assert.deepEqual(await blobNames(box.root), []);
      } finally {
        await box.cleanup();
      }
    });
  });
});
