/**
 * README's library example, run as written from a fresh project that installs kiln as a dependency
 * (`npm install <path>`, linked and offline: the test installs nothing from the network). Only what
 * names this machine changes: the image (pushed to a local registry), the store and the platform.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { sampleImage } from "../helpers/fixtures.js";
import { pushImage } from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";
import { REPO_ROOT } from "./kiln.js";

const execFileP = promisify(execFile);

/** The first ```ts block of README's "## Library" section. */
async function librarySnippet(): Promise<string> {
  const readme = await readFile(join(REPO_ROOT, "README.md"), "utf8");
  const section = readme.slice(readme.indexOf("\n## Library"));
  const m = /```ts\n([\s\S]*?)```/.exec(section);
  assert.ok(m, "README's Library section has a ts example");
  return m[1]!;
}

describe("the library, installed as a dependency", () => {
  let reg: Registry;
  let app: string;
  before(async () => {
    reg = await startRegistry();
    await pushImage(await sampleImage(), reg, "lib/sample:1");
    app = await makeTempDir("library-app");
    await writeFile(
      join(app, "package.json"),
      JSON.stringify({ name: "app", private: true, type: "module" }),
    );
    await run(
      "npm",
      ["install", "--offline", "--install-links=false", "--no-audit", "--no-fund", REPO_ROOT],
      {
        cwd: app,
      },
    );
  });
  after(async () => {
    await reg?.stop();
    if (app) await removeDir(app);
  });

  it("README's example runs as written: pull, inspect, export, pull and export, disk, a NOT_FOUND", async () => {
    const root = join(app, "store");
    const script = (await librarySnippet())
      .replaceAll('"alpine:3.20"', JSON.stringify(`${reg.host}/lib/sample:1`))
      .replaceAll('"nope:missing"', JSON.stringify(`${reg.host}/lib/nope:missing`))
      .replaceAll('"/var/lib/kiln"', JSON.stringify(root))
      .replaceAll('architecture: "arm64"', 'architecture: "amd64"');
    await writeFile(join(app, "main.mjs"), script);
    const { stderr } = await execFileP("node", ["main.mjs"], { cwd: app });
    assert.match(stderr, /nope/, "the NOT_FOUND branch ran");
    await run("e2fsck", ["-fn", join(app, "rootfs.ext4")]);
    await run("e2fsck", ["-fn", join(app, "data.ext4")]);
    const listing = await run("sh", ["-c", `cpio -it < '${join(app, "alpine.cpio")}'`]);
    assert.match(listing, /^etc$/m);
  });
});
