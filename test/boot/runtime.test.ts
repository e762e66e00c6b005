/**
 * Runtime config of real images (built with GNU tar + umoci, imported into a temp store): the user
 * resolved through the image's own /etc/passwd and /etc/group across layers, env defaults,
 * entrypoint/cmd, systemd detection through symlinks, and reading files from the layers.
 */
import assert from "node:assert/strict";
import { rename } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { isSystemdImage, runtimeConfig } from "../../src/boot/runtime.js";
import { isKilnError } from "../../src/errors.js";
import type { Inode } from "../../src/fs/tree.js";
import { importArchive } from "../../src/images.js";
import { openImageTree, readImageFile, readImageFiles, resolveInTree } from "../../src/layers/image.js";
import type { ImageRecord } from "../../src/store/catalog.js";
import { openStore, type Store } from "../../src/store/store.js";
import { makeTempDir, removeDir } from "../helpers/exec.js";
import { buildImage, type ImageSpec } from "../helpers/images.js";

const PASSWD = [
  "root:x:0:0:root:/root:/bin/sh",
  "# a comment line, skipped",
  "alice:x:1000:1000:Alice:/home/alice:/bin/sh",
  "bob:x:1001:1001::/home/bob:/bin/sh",
  "broken line without fields",
  "",
].join("\n");
const GROUP = [
  "root:x:0:",
  "wheel:x:10:alice",
  "staff:x:50:bob,alice",
  "alice:x:1000:",
  "bob:x:1001:",
  "",
].join("\n");

const USERS_SPEC: ImageSpec = {
  layers: [
    [
      { path: "etc/", type: "dir" },
      { path: "etc/passwd", content: PASSWD },
      { path: "etc/group", content: GROUP },
      { path: "bin/", type: "dir" },
      { path: "bin/app", content: "#!/bin/sh\n", mode: 0o755 },
      // A busybox-style init: /sbin/init is a link to a program that is not systemd.
      { path: "sbin/", type: "dir" },
      { path: "sbin/init", type: "symlink", target: "../bin/app" },
      { path: "bin/start", type: "symlink", target: "/sbin/init" },
    ],
    [
      // An upper layer that does not touch the account files.
      { path: "srv/", type: "dir" },
      { path: "srv/data", content: "x\n" },
    ],
  ],
  config: {
    entrypoint: ["/bin/app", "--flag"],
    cmd: ["serve", "--port", "80"],
    env: ["FOO=1"],
    user: "alice",
    labels: { "org.example.role": "web" },
    stopSignal: "SIGTERM",
    exposedPorts: ["8080/tcp", "53/udp"],
  },
};

/** carol is 2000 in the lower layer's passwd; the upper layer replaces the file (3000) and drops dave. */
const REPLACED_SPEC: ImageSpec = {
  layers: [
    [
      { path: "etc/", type: "dir" },
      {
        path: "etc/passwd",
        content: "root:x:0:0::/root:/bin/sh\ncarol:x:2000:2000::/home/carol-old:/bin/sh\n",
      },
      { path: "etc/group", content: "root:x:0:\nold:x:70:carol\n" },
    ],
    [
      { path: "etc/", type: "dir" },
      {
        path: "etc/passwd",
        content:
          "root:x:0:0::/root:/bin/sh\ncarol:x:3000:3001::/home/carol:/bin/sh\ndave:x:4000:4000::/:/bin/sh\n",
      },
      { path: "etc/.wh.group", content: "" },
    ],
    [
      { path: "etc/", type: "dir" },
      // dave leaves in a third layer.
      { path: "etc/passwd", content: "root:x:0:0::/root:/bin/sh\ncarol:x:3000:3001::/home/carol:/bin/sh\n" },
    ],
  ],
  config: { cmd: ["/bin/true"], user: "carol", env: ["PATH=/opt/bin", "HOME=/custom"], workingDir: "/srv" },
};

/** Init systems at the usual places, and links to them every way distros make them. */
const SYSTEMD_SPEC: ImageSpec = {
  layers: [
    [
      { path: "usr/", type: "dir" },
      { path: "usr/lib/", type: "dir" },
      { path: "usr/lib/systemd/", type: "dir" },
      { path: "usr/lib/systemd/systemd", content: "#!/bin/sh\n", mode: 0o755 },
      { path: "usr/sbin/", type: "dir" },
      // usrmerge: /sbin and /lib are links into /usr.
      { path: "sbin", type: "symlink", target: "usr/sbin" },
      { path: "lib", type: "symlink", target: "usr/lib" },
      // Relative: /usr/sbin/init → ../lib/systemd/systemd.
      { path: "usr/sbin/init", type: "symlink", target: "../lib/systemd/systemd" },
      { path: "bin/", type: "dir" },
      { path: "bin/busybox", content: "busybox\n", mode: 0o755 },
      { path: "bin/sh", type: "symlink", target: "busybox" },
      // Absolute, through the usrmerge link: /bin/myinit → /lib/systemd/systemd.
      { path: "bin/myinit", type: "symlink", target: "/lib/systemd/systemd" },
      // A link to a link to the init: /bin/boot → /sbin/init.
      { path: "bin/boot", type: "symlink", target: "/sbin/init" },
      { path: "bin/loop1", type: "symlink", target: "loop2" },
      { path: "bin/loop2", type: "symlink", target: "/bin/loop1" },
      { path: "bin/escape", type: "symlink", target: "../../../../usr/lib/systemd/systemd" },
    ],
  ],
  config: { cmd: ["/sbin/init"] },
};

/** A Debian-style image without usrmerge: /sbin/init → /lib/systemd/systemd (absolute). */
const CLASSIC_SPEC: ImageSpec = {
  layers: [
    [
      { path: "lib/", type: "dir" },
      { path: "lib/systemd/", type: "dir" },
      { path: "lib/systemd/systemd", content: "#!/bin/sh\n", mode: 0o755 },
      { path: "sbin/", type: "dir" },
      { path: "sbin/init", type: "symlink", target: "/lib/systemd/systemd" },
      { path: "usr/", type: "dir" },
      { path: "usr/bin/", type: "dir" },
      { path: "usr/bin/init-wrapper", type: "symlink", target: "../../sbin/init" },
      { path: "bin/", type: "dir" },
      { path: "bin/sh", content: "sh\n", mode: 0o755 },
      { path: "etc/", type: "dir" },
      // /etc/passwd is a link to a file elsewhere; the big file is for the size limit.
      { path: "usr/share/", type: "dir" },
      { path: "usr/share/passwd", content: "root:x:0:0::/root:/bin/sh\n" },
      { path: "etc/passwd", type: "symlink", target: "../usr/share/passwd" },
      { path: "etc/big", size: 100_000 },
    ],
    [
      { path: "srv/", type: "dir" },
      { path: "srv/upper.txt", content: "from the upper layer\n" },
    ],
  ],
  config: { entrypoint: ["/usr/bin/init-wrapper"] },
};

/** An image with no /etc at all. */
const BARE_SPEC: ImageSpec = {
  layers: [[{ path: "app", content: "#!/bin/sh\n", mode: 0o755 }]],
  config: { entrypoint: ["/app"] },
};

describe("runtime config", () => {
  let work: string;
  let root: string;
  let store: Store;
  const images = new Map<string, ImageRecord>();

  async function ingest(name: string, spec: ImageSpec): Promise<void> {
    const dir = join(work, "layouts", name);
    await buildImage(dir, spec);
    const [r] = await importArchive(dir, { root, tag: `test/${name}:1` });
    images.set(name, r!.image);
  }
  const image = (name: string) => images.get(name)!;
  /** The image with another config on the same layers (a different USER, CMD, …). */
  const withConfig = (name: string, config: Record<string, unknown>): ImageRecord => {
    const doc = JSON.parse(image(name).config) as Record<string, unknown>;
    return { ...image(name), config: JSON.stringify({ ...doc, config }) };
  };
  const account = async (name: string, user: string | undefined) => {
    const c = await runtimeConfig(store, withConfig(name, { Cmd: ["/bin/app"], User: user }));
    return {
      user: c.user,
      uid: c.uid,
      gid: c.gid,
      groups: c.groups,
      home: c.env.find((e) => e.startsWith("HOME=")),
    };
  };

  before(async () => {
    work = await makeTempDir("boot-runtime");
    root = join(work, "store");
    await ingest("users", USERS_SPEC);
    await ingest("replaced", REPLACED_SPEC);
    await ingest("systemd", SYSTEMD_SPEC);
    await ingest("classic", CLASSIC_SPEC);
    await ingest("bare", BARE_SPEC);
    store = await openStore(root);
  });
  after(async () => {
    store?.close();
    if (work) await removeDir(work);
  });

  it("reads the image config: entrypoint + cmd, env defaults, labels, stop signal, ports, architecture", async () => {
    const c = await runtimeConfig(store, image("users"));
    assert.deepEqual(c, {
      args: ["/bin/app", "--flag", "serve", "--port", "80"],
      env: ["FOO=1", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/home/alice"],
      workingDir: "/",
      user: "alice",
      uid: 1000,
      gid: 1000,
      groups: [10, 50],
      systemd: false,
      hostname: undefined,
      labels: { "org.example.role": "web" },
      stopSignal: "SIGTERM",
      exposedPorts: ["53/udp", "8080/tcp"],
      architecture: "amd64",
    });
  });

  it("replaces cmd with the given args and keeps the entrypoint, as docker run IMAGE CMD", async () => {
    const c = await runtimeConfig(store, image("users"), { args: ["check", "--verbose"] });
    assert.deepEqual(c.args, ["/bin/app", "--flag", "check", "--verbose"]);
    const noEntrypoint = withConfig("users", { Cmd: ["/bin/app", "a"] });
    assert.deepEqual((await runtimeConfig(store, noEntrypoint, { args: ["/bin/sh", "-c", "id"] })).args, [
      "/bin/sh",
      "-c",
      "id",
    ]);
    // No args given (or none at all): the image's cmd.
    assert.deepEqual((await runtimeConfig(store, noEntrypoint, { args: [] })).args, ["/bin/app", "a"]);
    await assert.rejects(
      runtimeConfig(store, withConfig("users", { Env: ["A=1"] })),
      (err) => isKilnError(err, "INVALID_ARGUMENT") && /has no entrypoint or cmd/.test(err.message),
    );
  });

  it("resolves users by name, uid, name:group, uid:gid, name:gid and uid:group", async () => {
    assert.deepEqual(await account("users", "bob"), {
      user: "bob",
      uid: 1001,
      gid: 1001,
      groups: [50],
      home: "HOME=/home/bob",
    });
    assert.deepEqual(await account("users", "1000"), {
      user: "alice",
      uid: 1000,
      gid: 1000,
      groups: [10, 50],
      home: "HOME=/home/alice",
    });
    assert.deepEqual(await account("users", "alice:staff"), {
      user: "alice",
      uid: 1000,
      gid: 50,
      groups: [10, 50],
      home: "HOME=/home/alice",
    });
    assert.deepEqual((await account("users", "1001:10")).gid, 10);
    assert.deepEqual((await account("users", "alice:1234")).gid, 1234);
    assert.deepEqual((await account("users", "1001:wheel")).gid, 10);
    // No USER: root, from passwd.
    assert.deepEqual(await account("users", undefined), {
      user: "root",
      uid: 0,
      gid: 0,
      groups: [],
      home: "HOME=/root",
    });
  });

  it("takes a numeric uid that is not in /etc/passwd, with gid 0 unless given, as docker does", async () => {
    assert.deepEqual(await account("users", "4242"), {
      user: "4242",
      uid: 4242,
      gid: 0,
      groups: [],
      home: "HOME=/",
    });
    assert.deepEqual((await account("users", "4242:4243")).gid, 4243);
    // An image with no /etc at all runs numeric users and root.
    assert.deepEqual(await account("bare", "65534:65534"), {
      user: "65534",
      uid: 65534,
      gid: 65534,
      groups: [],
      home: "HOME=/",
    });
    assert.equal((await account("bare", undefined)).uid, 0);
  });

  it("refuses an unknown user or group, naming it", async () => {
    await assert.rejects(
      account("users", "mallory"),
      (err) =>
        isKilnError(err, "INVALID_ARGUMENT") &&
        err.message === `user "mallory" not found in the image's /etc/passwd`,
    );
    await assert.rejects(
      account("users", "alice:nogroup"),
      (err) =>
        isKilnError(err, "INVALID_ARGUMENT") &&
        err.message === `group "nogroup" not found in the image's /etc/group`,
    );
    await assert.rejects(
      account("bare", "alice"),
      (err) => isKilnError(err, "INVALID_ARGUMENT") && err.message.includes(`user "alice" not found`),
    );
  });

  it("reads /etc/passwd as the top layer has it: an upper layer's file replaces the lower one", async () => {
    const c = await runtimeConfig(store, image("replaced"));
    assert.equal(c.uid, 3000, "carol's uid from the upper layer's passwd");
    assert.equal(c.gid, 3001);
    // The group file was whited out: carol's lower-layer group membership is gone.
    assert.deepEqual(c.groups, []);
    // The image's own PATH and HOME are kept, not doubled.
    assert.deepEqual(c.env, ["PATH=/opt/bin", "HOME=/custom"]);
    assert.equal(c.workingDir, "/srv");
    // dave was added in layer 2 and dropped again in layer 3.
    await assert.rejects(account("replaced", "dave"), /user "dave" not found/);
  });

  it("detects systemd images directly and through symlinks, and not /bin/sh", async () => {
    const usrmerge = await openImageTree(store, image("systemd"));
    const classic = await openImageTree(store, image("classic"));
    const detect = (tree: Inode, cmd: string) => isSystemdImage([cmd, "--arg"], tree);
    // Named directly (the file need not even be there).
    assert.equal(detect(classic, "/sbin/init"), true);
    assert.equal(detect(classic, "/usr/lib/systemd/systemd"), true);
    assert.equal(detect(usrmerge, "/lib/systemd/systemd"), true);
    // /usr/bin/init-wrapper → ../../sbin/init → /lib/systemd/systemd (relative, then absolute).
    assert.equal(detect(classic, "/usr/bin/init-wrapper"), true);
    // usrmerge: /usr/sbin/init → ../lib/systemd/systemd; /bin/myinit → /lib/systemd/systemd with
    // /lib → usr/lib; /bin/boot → /sbin/init with /sbin → usr/sbin.
    assert.equal(detect(usrmerge, "/usr/sbin/init"), true);
    assert.equal(detect(usrmerge, "/bin/myinit"), true);
    assert.equal(detect(usrmerge, "/bin/boot"), true);
    // ".." stops at the root, as in a chroot.
    assert.equal(detect(usrmerge, "/bin/escape"), true);
    // Reached through /sbin/init, whatever that links to; a program /sbin/init links to is not an init.
    const users = await openImageTree(store, image("users"));
    assert.equal(detect(users, "/bin/start"), true);
    assert.equal(detect(users, "/bin/app"), false);
    // Not an init.
    assert.equal(detect(usrmerge, "/bin/sh"), false);
    assert.equal(detect(classic, "/bin/sh"), false);
    assert.equal(detect(usrmerge, "/bin/loop1"), false, "a symlink loop ends, undetected");
    assert.equal(detect(usrmerge, "/nonexistent"), false);
    assert.equal(isSystemdImage([], usrmerge), false);
    // Through runtimeConfig; the args are kept as they are.
    const c = await runtimeConfig(store, image("classic"));
    assert.equal(c.systemd, true);
    assert.deepEqual(c.args, ["/usr/bin/init-wrapper"]);
    assert.equal((await runtimeConfig(store, image("users"))).systemd, false);
  });

  it("reads files from the layers: symlinks followed inside the image, loops and size limits", async () => {
    const tree = await openImageTree(store, image("classic"));
    assert.equal(resolveInTree(tree, "/etc/passwd")?.path, "/usr/share/passwd");
    assert.equal(resolveInTree(tree, "/etc/passwd", { followLast: false })?.inode.type, "symlink");
    assert.equal(resolveInTree(tree, "/etc/passwd/x"), undefined, "a file is not a directory");
    assert.equal(
      (await readImageFile(store, image("classic"), "/etc/passwd", 1024))?.toString(),
      "root:x:0:0::/root:/bin/sh\n",
    );
    assert.equal(await readImageFile(store, image("classic"), "/etc/missing", 1024), undefined);
    assert.equal(await readImageFile(store, image("classic"), "/etc", 1024), undefined, "a directory");
    assert.equal(await readImageFile(store, image("systemd"), "/bin/loop1", 1024), undefined);
    await assert.rejects(
      readImageFile(store, image("classic"), "/etc/big", 1024),
      (err) => isKilnError(err, "TOO_LARGE") && err.message.includes("/etc/big"),
    );
  });

  it("reads only the layers that hold the wanted files once the tree is built", async () => {
    const img = image("classic");
    const tree = await openImageTree(store, img);
    // The upper layer's blob goes away: files of the lower layer still read, so it was not opened.
    const upper = store.blobs.path(img.layers[1]!.digest);
    await rename(upper, `${upper}.away`);
    try {
      const files = await readImageFiles(
        store,
        img,
        ["/etc/passwd", "/usr/share/passwd", "/bin/sh"],
        1024,
        tree,
      );
      assert.deepEqual(
        [...files].map(([p, b]) => [p, b.toString()]),
        [
          ["/etc/passwd", "root:x:0:0::/root:/bin/sh\n"],
          ["/usr/share/passwd", "root:x:0:0::/root:/bin/sh\n"],
          ["/bin/sh", "sh\n"],
        ],
      );
      await assert.rejects(
        readImageFile(store, img, "/srv/upper.txt", 1024, tree),
        (err) => isKilnError(err, "NOT_FOUND") && err.message.includes(img.layers[1]!.digest),
      );
    } finally {
      await rename(`${upper}.away`, upper);
    }
    assert.equal(
      (await readImageFile(store, img, "/srv/upper.txt", 1024, tree))?.toString(),
      "from the upper layer\n",
    );
  });
});
