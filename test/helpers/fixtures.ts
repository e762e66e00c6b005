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
