import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { makeTempDir } from "./exec.js";
import { buildImage, buildMultiArch, type ImageSpec, type Layout } from "./images.js";

/**
 * A small image that exercises the usual cases: three gzip layers (≈1 MiB in all), directories,
 * modes incl. setuid, owners, a symlink, a hardlink, a user xattr, a whiteout, an opaque
 * directory, and a config with every common field.
 */
export const SAMPLE_SPEC: ImageSpec = {
  tag: "sample",
  layers: [
    [
      { path: "bin/", type: "dir" },
      { path: "bin/hello", content: "#!/bin/sh\necho hello\n", mode: 0o755 },
      { path: "bin/hello-link", type: "hardlink", target: "bin/hello" },
      { path: "bin/sh", type: "symlink", target: "/bin/hello" },
      { path: "bin/su", content: "setuid\n", mode: 0o4755 },
      { path: "etc/", type: "dir" },
      { path: "etc/hostname", content: "kiln\n" },
      { path: "etc/passwd", content: "root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n" },
      { path: "etc/tagged", content: "xattr\n", xattrs: { "user.kiln": "sample" } },
      { path: "tmp/", type: "dir", mode: 0o1777 },
      { path: "home/", type: "dir" },
      { path: "home/user/", type: "dir", uid: 1000, gid: 1000, mode: 0o700 },
      { path: "home/user/old.txt", content: "hidden by the opaque dir above\n", uid: 1000, gid: 1000 },
    ],
    [
      { path: "etc/", type: "dir" },
      { path: "etc/hostname", content: "kiln-upper\n" },
      { path: "etc/.wh.passwd", content: "" },
      { path: "home/user/", type: "dir", uid: 1000, gid: 1000, mode: 0o700 },
      { path: "home/user/.wh..wh..opq", content: "", uid: 1000, gid: 1000 },
      { path: "home/user/new.txt", content: "from layer 2\n", uid: 1000, gid: 1000 },
    ],
    [
      { path: "data/", type: "dir" },
      { path: "data/blob.bin", size: 1 << 20 },
    ],
  ],
  config: {
    entrypoint: ["/bin/hello"],
    cmd: ["--greet", "world"],
    env: ["PATH=/usr/local/bin:/usr/bin:/bin", "KILN_SAMPLE=1"],
    workingDir: "/home/user",
    user: "1000:1000",
    labels: { "org.example.kiln": "sample" },
    stopSignal: "SIGINT",
    exposedPorts: ["8080/tcp"],
    architecture: "amd64",
    os: "linux",
  },
};

/** Like the sample's first layer, but the tar ends without its end-of-archive blocks. */
export const NO_EOF_SPEC: ImageSpec = {
  tag: "no-eof",
  layers: [
    [
      { path: "etc/", type: "dir" },
      { path: "etc/hostname", content: "kiln\n" },
    ],
    {
      entries: [
        { path: "srv/", type: "dir" },
        { path: "srv/last.txt", content: "the last entry of a tar without end blocks\n" },
      ],
      endBlocks: false,
    },
  ],
  config: { cmd: ["/bin/sh"] },
};

// Built once per test process (each test file is its own process), shared by its tests.
let cacheDir: Promise<string> | undefined;
const built = new Map<string, Promise<Layout>>();

function cached(key: string, build: (dir: string) => Promise<Layout>): Promise<Layout> {
  let p = built.get(key);
  if (!p) {
    cacheDir ??= makeTempDir("fixtures");
    p = cacheDir.then((d) => build(join(d, key)));
    built.set(key, p);
    // A failed build must not be cached.
    p.catch(() => built.delete(key));
  }
  return p;
}

export const sampleImage = (): Promise<Layout> => cached("sample", (dir) => buildImage(dir, SAMPLE_SPEC));
export const noEofImage = (): Promise<Layout> => cached("no-eof", (dir) => buildImage(dir, NO_EOF_SPEC));
export const multiArchImage = (): Promise<Layout> =>
  cached("multi-arch", (dir) => buildMultiArch(dir, { tag: "multi" }));

/** `security.capability` for `cap_net_raw+ep` (VFS_CAP_REVISION_2, effective, permitted bit 13). */
export const CAP_NET_RAW = Buffer.from("0100000200200000000000000000000000000000", "hex");

/** Byte offsets of the few data bytes in the rich image's 16 MiB `data/sparse.img`; zeros elsewhere. */
const SPARSE_SIZE = 16 << 20;
const SPARSE_MARKS: [number, string][] = [
  [0, "head"],
  [SPARSE_SIZE / 2 + 12345, "middle"],
  [SPARSE_SIZE - 4, "tail"],
];

function sparseLooking(): Buffer {
  const b = Buffer.alloc(SPARSE_SIZE);
  for (const [at, text] of SPARSE_MARKS) b.write(text, at);
  return b;
}

const LONG_NAME = `${"n".repeat(140)}.txt`;
/** A directory path over 200 bytes whose parent (`long/ddd…`) the layer tar leaves out. */
export const LONG_DIR = `long/${"d".repeat(120)}/${"e".repeat(120)}`;

/**
 * Everything an export must get right, over three layers (needs root: device nodes and
 * `security.*`/`trusted.*` xattrs):
 * 1. a busybox rootfs (the real static binary, applet symlinks);
 * 2. devices, a fifo, xattrs (binary capability, trusted, user), uid/gid 1000 and 70000,
 *    setuid/setgid/sticky, long and non-ASCII names, a 16 MiB mostly-zero file, empty file and
 *    directory, absolute/relative/dangling symlinks, hardlink pairs, and what layer 3 changes;
 * 3. a file and a directory whiteout, an opaque directory (marker after a new entry), a file
 *    replaced by a directory, a directory replaced by a symlink, hardlink targets whited out or
 *    replaced (their other names keep the lower content).
 */
export async function richSpec(): Promise<ImageSpec> {
  const busybox = await readFile("/bin/busybox");
  const applets = ["sh", "ls", "cat", "echo", "mount"];
  return {
    tag: "rich",
    layers: [
      [
        { path: "bin/", type: "dir" },
        { path: "bin/busybox", content: busybox, mode: 0o755 },
        ...applets.map((a) => ({ path: `bin/${a}`, type: "symlink" as const, target: "busybox" })),
        { path: "sbin/", type: "dir" },
        { path: "sbin/init", type: "symlink", target: "../bin/busybox" },
        { path: "usr/", type: "dir" },
        { path: "usr/bin/", type: "dir" },
        { path: "usr/bin/env", type: "symlink", target: "/bin/busybox" },
        { path: "etc/", type: "dir" },
        {
          path: "etc/passwd",
          content: "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        },
        { path: "etc/hostname", content: "busybox\n" },
        { path: "tmp/", type: "dir", mode: 0o1777 },
      ],
      [
        {
          path: "etc/tagged",
          content: "xattrs\n",
          xattrs: { "trusted.foo": "bar", "user.text": "hello", "user.bin": Buffer.from([0, 1, 0xfe, 0xff]) },
        },
        { path: "dev/", type: "dir" },
        { path: "dev/null", type: "chardev", major: 1, minor: 3, mode: 0o666 },
        { path: "dev/big", type: "chardev", major: 300, minor: 70000, mode: 0o600 },
        { path: "dev/initctl", type: "fifo", mode: 0o600 },
        // usr/ and usr/bin/ are left out: layer 1 has them, and erofs-layers must give the
        // parents a layer leaves out the lower layers' metadata (overlayfs shows the top one's).
        {
          path: "usr/bin/ping",
          content: "ping\n",
          mode: 0o755,
          xattrs: { "security.capability": CAP_NET_RAW },
        },
        { path: "etc/xdir/", type: "dir", xattrs: { "user.dir": "yes" } },
        { path: "usr/bin/su", content: "setuid\n", mode: 0o4755 },
        { path: "srv/", type: "dir" },
        { path: "home/", type: "dir" },
        { path: "long/", type: "dir" },
        { path: `long/${LONG_NAME}`, content: "a name over 100 bytes\n" },
        { path: "long/d/", type: "dir" },
        { path: `${LONG_DIR}/`, type: "dir" },
        { path: `${LONG_DIR}/${LONG_NAME}`, content: "a path over 255 bytes\n" },
        { path: `long/${"l".repeat(110)}`, type: "symlink", target: `${LONG_DIR}/${LONG_NAME}` },
        { path: `long/hard-${"h".repeat(110)}`, type: "hardlink", target: `long/${LONG_NAME}` },
        { path: "intl/", type: "dir" },
        { path: "intl/café.txt", content: "café\n" },
        { path: "intl/日本語/", type: "dir" },
        { path: "intl/日本語/ファイル.txt", content: "ファイル\n" },
        { path: "intl/emoji-🙂", content: "🙂\n" },
        { path: "data/", type: "dir" },
        { path: "data/sparse.img", content: sparseLooking() },
        { path: "data/empty", content: "" },
        { path: "data/emptydir/", type: "dir" },
        { path: "links/", type: "dir" },
        { path: "links/abs", type: "symlink", target: "/etc/passwd" },
        { path: "links/rel", type: "symlink", target: "../bin/busybox" },
        { path: "links/dangling-abs", type: "symlink", target: "/nonexistent/target" },
        { path: "links/dangling-rel", type: "symlink", target: "../nowhere" },
        { path: "hl/", type: "dir" },
        { path: "hl/a", content: "lower a\n", mode: 0o640 },
        { path: "hl/a-link", type: "hardlink", target: "hl/a" },
        { path: "hl/b", content: "lower b\n" },
        { path: "hl/b-link", type: "hardlink", target: "hl/b" },
        { path: "hl/b-link2", type: "hardlink", target: "hl/b" },
        { path: "wh/", type: "dir" },
        { path: "wh/file-gone", content: "whited out\n" },
        { path: "wh/kept", content: "kept\n" },
        { path: "wh/dir-gone/", type: "dir" },
        { path: "wh/dir-gone/child", content: "whited out with its dir\n" },
        { path: "opq/", type: "dir", mode: 0o755 },
        { path: "opq/old", content: "hidden by the opaque marker\n" },
        { path: "opq/sub/", type: "dir" },
        { path: "opq/sub/deep", content: "hidden too\n" },
        { path: "replace/", type: "dir" },
        { path: "replace/file-to-dir", content: "a file, then a directory\n" },
        { path: "replace/dir-to-link/", type: "dir" },
        { path: "replace/dir-to-link/child", content: "gone with the directory\n" },
        // Other owners last: GNU tar --append (one run per owner) keeps the format of the
        // archive's last member, and a plain ustar one cannot hold the long names above.
        { path: "dev/loop0", type: "blockdev", major: 7, minor: 0, mode: 0o660, gid: 6 },
        { path: "usr/bin/wall", content: "setgid\n", mode: 0o2755, gid: 5 },
        { path: "srv/shared/", type: "dir", mode: 0o3775, gid: 100 },
        { path: "home/alice/", type: "dir", mode: 0o750, uid: 1000, gid: 1000 },
        { path: "home/alice/.profile", content: "export PS1='$ '\n", uid: 1000, gid: 1000 },
        { path: "home/big/", type: "dir", mode: 0o700, uid: 70000, gid: 70000 },
        { path: "home/big/id", content: "70000\n", uid: 70000, gid: 70000, mode: 0o600 },
        { path: "home/big/id-link", type: "hardlink", target: "home/big/id" },
      ],
      [
        { path: "etc/", type: "dir" },
        { path: "etc/hostname", content: "rich\n" },
        { path: "wh/", type: "dir" },
        { path: "wh/.wh.file-gone", content: "" },
        { path: "wh/.wh.dir-gone", content: "" },
        { path: "opq/", type: "dir", mode: 0o755 },
        { path: "opq/new", content: "from layer 3\n" },
        { path: "opq/.wh..wh..opq", content: "" },
        { path: "replace/", type: "dir" },
        { path: "replace/file-to-dir/", type: "dir", mode: 0o750 },
        { path: "replace/file-to-dir/inside", content: "inside the new directory\n" },
        { path: "replace/dir-to-link", type: "symlink", target: "../data" },
        { path: "hl/", type: "dir" },
        { path: "hl/.wh.a", content: "" },
        { path: "hl/b", content: "upper b replaces one name only\n" },
        // A file under home/alice (0750 1000:1000 in layer 2), whose parents this layer leaves out.
        { path: "home/alice/notes", content: "x\n", uid: 1000, gid: 1000 },
      ],
    ],
    config: { entrypoint: ["/sbin/init"], architecture: "amd64", os: "linux" },
  };
}

export const richImage = (): Promise<Layout> =>
  cached("rich", async (dir) => buildImage(dir, await richSpec()));
