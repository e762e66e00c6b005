/**
 * Kernels and initrds carried by real images (GNU tar + umoci, imported into a temp store): the
 * newest of several versions, the distro's /vmlinuz link, a gzip arm64 Image.gz decompressed, no
 * kernel at all; artifacts keyed by layer digest and shared between images; versions ordered as
 * dpkg orders them (checked against dpkg itself).
 */
import assert from "node:assert/strict";
import { readdir, readFile, rename, rm } from "node:fs/promises";
import { basename, join } from "node:path";
import { after, before, describe, it } from "node:test";
import { gzipSync } from "node:zlib";
import { compareVersions, extractBootFiles } from "../../src/boot/kernel.js";
import { isKilnError } from "../../src/errors.js";
import { importArchive } from "../../src/images.js";
import { openImageTree } from "../../src/layers/image.js";
import type { ImageRecord } from "../../src/store/catalog.js";
import { openStore, type Store } from "../../src/store/store.js";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { buildImage, type ImageSpec } from "../helpers/images.js";

/** Distinct, incompressible-looking bytes per name, so a mix-up of files shows. */
function fakeBytes(name: string, size: number): Buffer {
  const b = Buffer.alloc(size);
  let x = 0;
  for (const c of name) x = (x * 31 + c.charCodeAt(0)) >>> 0;
  for (let i = 0; i < size; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

const OLD = "6.1.0-9-cloud-amd64";
const NEW = "6.1.0-18-cloud-amd64";
const kernelBytes = (v: string) => fakeBytes(`vmlinuz-${v}`, 300_000);
const initrdBytes = (v: string) => gzipSync(fakeBytes(`initrd-${v}`, 50_000));

/** Two kernel packages in one layer; string order would pick 9 over 18. */
const KERNEL_LAYER = [
  { path: "boot/", type: "dir" as const },
  { path: `boot/vmlinuz-${OLD}`, content: kernelBytes(OLD) },
  { path: `boot/initrd.img-${OLD}`, content: initrdBytes(OLD) },
  { path: `boot/vmlinuz-${NEW}`, content: kernelBytes(NEW) },
  { path: `boot/initrd.img-${NEW}`, content: initrdBytes(NEW) },
  { path: `boot/vmlinuz-${NEW}.old`, content: "a backup, never picked\n" },
  { path: "boot/config-6.1.0-18-cloud-amd64", content: "CONFIG_EXT4_FS=y\n" },
];

const TWO_VERSIONS: ImageSpec = {
  layers: [
    KERNEL_LAYER,
    [
      { path: "etc/", type: "dir" },
      { path: "etc/hostname", content: "a\n" },
    ],
  ],
  config: { cmd: ["/sbin/init"] },
};

/** The same kernel layer under another image: the artifacts are shared. */
const SHARES_LAYER: ImageSpec = {
  layers: [
    KERNEL_LAYER,
    [
      { path: "srv/", type: "dir" },
      { path: "srv/b", content: "b\n" },
    ],
  ],
  config: { cmd: ["/bin/sh"] },
};

/** Debian's links at the root, pointing at the older kernel: the link wins over the version order. */
const LINKED: ImageSpec = {
  layers: [
    KERNEL_LAYER,
    [
      { path: "vmlinuz", type: "symlink", target: `boot/vmlinuz-${OLD}` },
      { path: "initrd.img", type: "symlink", target: `/boot/initrd.img-${OLD}` },
      { path: "vmlinuz.old", type: "symlink", target: `boot/vmlinuz-${NEW}` },
    ],
  ],
  config: { cmd: ["/sbin/init"] },
};

const ARM_KERNEL = fakeBytes("Image", 400_000);
/** arm64: an unversioned gzip Image.gz, the version from the only /lib/modules directory. */
const ARM64: ImageSpec = {
  layers: [
    [
      { path: "boot/", type: "dir" },
      { path: "boot/Image.gz", content: gzipSync(ARM_KERNEL) },
      { path: "lib/", type: "dir" },
      { path: "lib/modules/", type: "dir" },
      { path: "lib/modules/6.6.0-arm64/", type: "dir" },
      { path: "lib/modules/6.6.0-arm64/modules.dep", content: "" },
    ],
  ],
  config: { cmd: ["/sbin/init"] },
};

const BROKEN_GZIP: ImageSpec = {
  layers: [
    [
      { path: "boot/", type: "dir" },
      {
        path: "boot/vmlinuz-6.1.0-1-arm64",
        content: Buffer.concat([Buffer.from([0x1f, 0x8b, 8, 0]), fakeBytes("x", 1000)]),
      },
    ],
  ],
};

const NO_KERNEL: ImageSpec = {
  layers: [
    [
      { path: "boot/", type: "dir" },
      { path: "boot/grub/", type: "dir" },
      { path: "bin/", type: "dir" },
      { path: "bin/sh", content: "sh\n", mode: 0o755 },
      // A dangling link is no kernel either.
      { path: "vmlinuz", type: "symlink", target: "boot/vmlinuz-gone" },
    ],
  ],
  config: { cmd: ["/bin/sh"] },
};

describe("boot files from images", () => {
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
  const hex = (name: string, layer: number) => image(name).layers[layer]!.digest.slice("sha256:".length);

  before(async () => {
    work = await makeTempDir("boot-kernel");
    root = join(work, "store");
    for (const [name, spec] of Object.entries({
      two: TWO_VERSIONS,
      shares: SHARES_LAYER,
      linked: LINKED,
      arm64: ARM64,
      broken: BROKEN_GZIP,
      none: NO_KERNEL,
    }))
      await ingest(name, spec);
    store = await openStore(root);
  });
  after(async () => {
    store?.close();
    if (work) await removeDir(work);
  });

  it("picks the newest of several kernels and its initrd, as artifacts keyed by the layer digest", async () => {
    const r = await extractBootFiles(store, image("two"));
    assert.deepEqual(r, {
      kernel: join(root, "artifacts", `boot-${hex("two", 0)}-boot_vmlinuz-${NEW}`),
      initrd: join(root, "artifacts", `boot-${hex("two", 0)}-boot_initrd.img-${NEW}`),
      version: NEW,
    });
    assert.deepEqual(await readFile(r.kernel!), kernelBytes(NEW));
    // The initrd stays as the image has it (gzip): the kernel unpacks it.
    assert.deepEqual(await readFile(r.initrd!), initrdBytes(NEW));
    // Recorded with the image, so GC keeps them while it is in the store.
    const row = store.catalog.getArtifact(basename(r.kernel!));
    assert.equal(row?.manifestDigest, image("two").manifestDigest);
    assert.equal(row?.format, "boot-kernel");
    assert.equal(row?.size, kernelBytes(NEW).length);
    // No temp file left behind.
    assert.deepEqual(
      (await readdir(store.tmpDir)).filter((n) => n.startsWith(".boot-")),
      [],
    );
  });

  it("shares the artifacts of a layer between images, and does not write them again", async () => {
    assert.equal(hex("shares", 0), hex("two", 0), "the same layer (reproducible builds)");
    const first = await extractBootFiles(store, image("two"));
    const tree = await openImageTree(store, image("shares"));
    // The layer's blob is gone once the tree is read: present artifacts are used without reading it.
    const blob = store.blobs.path(image("shares").layers[0]!.digest);
    await rename(blob, `${blob}.away`);
    try {
      assert.deepEqual(await extractBootFiles(store, image("shares"), undefined, { tree }), first);
      // Without the artifacts, the same call must read the layer (and so fails here).
      await rm(first.kernel!);
      await assert.rejects(extractBootFiles(store, image("shares"), undefined, { tree }), (err) =>
        isKilnError(err, "NOT_FOUND"),
      );
    } finally {
      await rename(`${blob}.away`, blob);
    }
    assert.deepEqual(await extractBootFiles(store, image("shares"), undefined, { tree }), first);
    assert.deepEqual(await readFile(first.kernel!), kernelBytes(NEW));
    assert.equal(
      store.catalog.getArtifact(basename(first.kernel!))?.manifestDigest,
      image("shares").manifestDigest,
    );
  });

  it("follows the distro's /vmlinuz and /initrd.img links", async () => {
    const out = join(work, "out-linked");
    const r = await extractBootFiles(store, image("linked"), out);
    assert.deepEqual(r, {
      kernel: join(out, `boot-${hex("linked", 0)}-boot_vmlinuz-${OLD}`),
      initrd: join(out, `boot-${hex("linked", 0)}-boot_initrd.img-${OLD}`),
      version: OLD,
    });
    assert.deepEqual(await readFile(r.kernel!), kernelBytes(OLD));
    assert.deepEqual(await readFile(r.initrd!), initrdBytes(OLD));
    // outDir: nothing recorded in the store.
    assert.deepEqual(store.catalog.artifactsOf(image("linked").manifestDigest), []);
  });

  it("decompresses a gzip arm64 Image.gz", async () => {
    const r = await extractBootFiles(store, image("arm64"));
    assert.deepEqual(r, {
      kernel: join(root, "artifacts", `boot-${hex("arm64", 0)}-boot_Image`),
      version: "6.6.0-arm64",
    });
    assert.deepEqual(await readFile(r.kernel!), ARM_KERNEL);
  });

  it("refuses a kernel that looks like gzip but is not, leaving nothing behind", async () => {
    await assert.rejects(
      extractBootFiles(store, image("broken")),
      (err) => isKilnError(err, "INVALID_ARCHIVE") && err.message.includes("/boot/vmlinuz-6.1.0-1-arm64"),
    );
    const left = (await readdir(store.artifactsDir)).filter((n) => n.includes(hex("broken", 0)));
    assert.deepEqual(left, []);
    assert.deepEqual(
      (await readdir(store.tmpDir)).filter((n) => n.startsWith(".boot-")),
      [],
    );
  });

  it("gives undefined fields for an image without a kernel", async () => {
    const r = await extractBootFiles(store, image("none"));
    assert.deepEqual(r, {});
    assert.equal(r.kernel, undefined);
    assert.equal(r.initrd, undefined);
    assert.equal(r.version, undefined);
  });

  it("orders versions as dpkg does", async () => {
    const versions = [
      "6.1.0-9-cloud-amd64",
      "6.1.0-18-cloud-amd64",
      "6.1.0-18-amd64",
      "6.10.0-1-amd64",
      "6.1.0",
      "6.1.0~rc1",
      "6.1.0+b1",
      "6.1.0a",
      "6.01.0",
      "5.15.0-105-generic",
      "5.15.0-91-generic",
      "1.0~~",
      "1.0~",
      "1.0",
    ];
    const dpkg = (a: string, op: string, b: string) =>
      run("dpkg", ["--compare-versions", a, op, b]).then(
        () => true,
        () => false,
      );
    for (const [i, a] of versions.entries()) {
      for (const b of versions.slice(i + 1)) {
        const expected = (await dpkg(a, "lt", b)) ? -1 : (await dpkg(a, "eq", b)) ? 0 : 1;
        assert.equal(Math.sign(compareVersions(a, b)), expected, `${a} vs ${b}`);
        assert.equal(Math.sign(compareVersions(b, a)), -expected || 0, `${b} vs ${a}`);
      }
    }
  });
});
