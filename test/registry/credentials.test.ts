import assert from "node:assert/strict";
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { isKilnError } from "../../src/errors.js";
import { RegistryClient } from "../../src/registry/client.js";
import { credentialHost, dockerCredentials, parseCredentials } from "../../src/registry/credentials.js";
import { FakeRegistry, makeImage, serve } from "./fake-registry.js";

const b64 = (s: string) => Buffer.from(s).toString("base64");

describe("credentials", () => {
  let tmp: string;
  let bin: string;
  let env: NodeJS.ProcessEnv;

  before(() => {
    tmp = mkdtempSync(join(tmpdir(), "kiln-creds-"));
    bin = join(tmp, "bin");
    mkdirSync(bin);
    // A credential helper as docker runs them: the server URL on stdin, JSON on stdout.
    const helper = join(bin, "docker-credential-kilntest");
    writeFileSync(
      helper,
      `#!/bin/sh
[ "$1" = get ] || exit 2
read -r server
echo "$server" >> "${join(tmp, "helper.log")}"
case "$server" in
  helped.example:5000) printf '{"ServerURL":"%s","Username":"helper-user","Secret":"helper-pass"}' "$server" ;;
  https://index.docker.io/v1/) printf '{"ServerURL":"%s","Username":"hub-user","Secret":"hub-pass"}' "$server" ;;
  token.example) printf '{"ServerURL":"%s","Username":"<token>","Secret":"refresh-xyz"}' "$server" ;;
  broken.example) echo "keychain locked" >&2; exit 3 ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
`,
    );
    chmodSync(helper, 0o755);
    env = { PATH: `${bin}:${process.env.PATH}`, HOME: join(tmp, "home") };
  });
  after(() => rmSync(tmp, { recursive: true, force: true }));

  function configDir(name: string, config: unknown): string {
    const dir = join(tmp, name);
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, "config.json"), JSON.stringify(config));
    return dir;
  }

  it("parses user:pass, keeping colons in the password", () => {
    assert.deepEqual(parseCredentials("u:p:q"), { username: "u", password: "p:q" });
    assert.throws(
      () => parseCredentials("nocolon"),
      (err) => isKilnError(err, "CREDENTIALS"),
    );
    assert.throws(
      () => parseCredentials(":p"),
      (err) => isKilnError(err, "CREDENTIALS"),
    );
  });

  it("normalizes config keys to hosts", () => {
    assert.equal(credentialHost("https://index.docker.io/v1/"), "docker.io");
    assert.equal(credentialHost("registry-1.docker.io"), "docker.io");
    assert.equal(credentialHost("https://Ghcr.io"), "ghcr.io");
    assert.equal(credentialHost("http://127.0.0.1:5000/v2/"), "127.0.0.1:5000");
  });

  it("lets explicit credentials win over the config", async () => {
    const dir = configDir("explicit", { auths: { "r.example": { auth: b64("cfg:cfg") } } });
    const p = dockerCredentials({ explicit: "me:pw", configDir: dir, env });
    assert.deepEqual(await p.get("r.example"), { username: "me", password: "pw" });
  });

  it("reads auths: base64 auth, username/password, https:// keys, identitytoken", async () => {
    const dir = configDir("auths", {
      auths: {
        "r.example:5000": { auth: b64("alice:pa:ss") },
        "https://other.example": { username: "bob", password: "pw" },
        "id.example": { auth: b64("carol:"), identitytoken: "refresh-1" },
      },
    });
    const p = dockerCredentials({ configDir: dir, env });
    assert.deepEqual(await p.get("r.example:5000"), { username: "alice", password: "pa:ss" });
    assert.deepEqual(await p.get("other.example"), { username: "bob", password: "pw" });
    assert.deepEqual(await p.get("id.example"), { username: "carol", identityToken: "refresh-1" });
    assert.equal(await p.get("r.example"), undefined, "another port is another registry");
    assert.equal(await p.get("nothing.example"), undefined);
  });

  for (const key of ["https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io"]) {
    it(`finds docker.io credentials under "${key}"`, async () => {
      const dir = configDir(`hub-${b64(key)}`, { auths: { [key]: { auth: b64("hub:pw") } } });
      assert.deepEqual(await dockerCredentials({ configDir: dir, env }).get("docker.io"), {
        username: "hub",
        password: "pw",
      });
    });
  }

  it("finds config.json through DOCKER_CONFIG, else HOME/.docker", async () => {
    const dir = configDir("via-env", { auths: { "e.example": { auth: b64("env:pw") } } });
    assert.deepEqual(await dockerCredentials({ env: { ...env, DOCKER_CONFIG: dir } }).get("e.example"), {
      username: "env",
      password: "pw",
    });
    configDir("home/.docker", { auths: { "h.example": { auth: b64("home:pw") } } });
    assert.deepEqual(await dockerCredentials({ env }).get("h.example"), { username: "home", password: "pw" });
  });

  it("is anonymous without a config file, and reports a broken one", async () => {
    assert.equal(await dockerCredentials({ configDir: join(tmp, "none"), env }).get("x.example"), undefined);
    const dir = join(tmp, "broken");
    mkdirSync(dir);
    writeFileSync(join(dir, "config.json"), "{not json");
    await assert.rejects(dockerCredentials({ configDir: dir, env }).get("x.example"), (err) => {
      assert.ok(isKilnError(err, "CREDENTIALS"));
      assert.match(err.message, /config\.json/);
      return true;
    });
  });

  it("runs credHelpers[host] with the server URL on stdin", async () => {
    const dir = configDir("helpers", {
      credHelpers: {
        "helped.example:5000": "kilntest",
        "docker.io": "kilntest",
        "token.example": "kilntest",
      },
      auths: { "unhelped.example": { auth: b64("file:pw") } },
    });
    const p = dockerCredentials({ configDir: dir, env });
    assert.deepEqual(await p.get("helped.example:5000"), {
      username: "helper-user",
      password: "helper-pass",
    });
    assert.deepEqual(await p.get("docker.io"), { username: "hub-user", password: "hub-pass" });
    assert.deepEqual(await p.get("token.example"), { identityToken: "refresh-xyz" });
    assert.deepEqual(await p.get("unhelped.example"), { username: "file", password: "pw" });
  });

  it("uses credsStore for every host; 'credentials not found' is anonymous", async () => {
    const dir = configDir("store", { credsStore: "kilntest" });
    const p = dockerCredentials({ configDir: dir, env });
    assert.deepEqual(await p.get("helped.example:5000"), {
      username: "helper-user",
      password: "helper-pass",
    });
    assert.equal(await p.get("unknown.example"), undefined);
    await assert.rejects(p.get("broken.example"), (err) => {
      assert.ok(isKilnError(err, "CREDENTIALS"));
      assert.match(err.message, /keychain locked/);
      return true;
    });
  });

  it("reports a credential helper that is not installed", async () => {
    const dir = configDir("missing-helper", { credsStore: "nosuchhelper" });
    await assert.rejects(dockerCredentials({ configDir: dir, env }).get("x.example"), (err) => {
      assert.ok(isKilnError(err, "CREDENTIALS"));
      assert.match(err.message, /docker-credential-nosuchhelper/);
      return true;
    });
  });

  it("pulls from a Basic-auth registry with credentials from DOCKER_CONFIG", async () => {
    const reg = new FakeRegistry();
    reg.auth = { kind: "basic", user: "cfg-user", pass: "cfg-pass" };
    const image = makeImage({});
    reg.putImage("app", image, "v1");
    const server = await serve(reg.handler);
    const dir = configDir("e2e", {
      auths: { [`https://${server.host}`]: { auth: b64("cfg-user:cfg-pass") } },
    });
    const client = new RegistryClient({
      credentials: dockerCredentials({ env: { ...env, DOCKER_CONFIG: dir } }),
      retries: { attempts: 1 },
    });
    try {
      const m = await client.getManifest({ registry: server.host, repository: "app" }, "v1");
      assert.equal(m.digest, image.manifestDigest);
    } finally {
      await client.close();
      await server.close();
    }
  });
});
