/**
 * kiln boot end to end: a real multi-layer image (a whiteout, a file an upper layer changed, a
 * non-root USER with a supplementary group, ENV, WORKDIR, an ENTRYPOINT that prints what it sees)
 * pushed to a real registry, pulled, and booted by QEMU (TCG) with Debian's cloud kernel from
 * test/.cache/kernel (scripts/setup.sh --test fetches it) from each export format.
 */
import assert from "node:assert/strict";
import { existsSync, readdirSync } from "node:fs";
import { cp, mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { gunzipSync } from "node:zlib";
import { writeInitramfs } from "../../src/boot/initramfs.js";
import { modinfo, resolveModules } from "../../src/boot/modules.js";
import { assertFails, REPO_ROOT, type Sandbox, sandbox } from "../cli/kiln.js";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { buildImage, type EntrySpec, type ImageSpec, pushImage } from "../helpers/images.js";
import { type Registry, startRegistry } from "../helpers/registry.js";

const KERNEL_DIR = join(REPO_ROOT, "test", ".cache", "kernel");

/** The kernel and its modules dir; missing is a failure (CI runs setup.sh --test), not a skip. */
function testKernel(): { kernel: string; modules: string } {
  const boot = join(KERNEL_DIR, "boot");
  const name = existsSync(boot) ? readdirSync(boot).find((n) => n.startsWith("vmlinuz-")) : undefined;
  if (!name) throw new Error(`no kernel in ${boot}: run scripts/setup.sh --test`);
  return {
    kernel: join(boot, name),
    modules: join(KERNEL_DIR, "lib", "modules", name.slice("vmlinuz-".length)),
  };
}

async function busyboxLayer(applets: string[]): Promise<EntrySpec[]> {
  const busybox = await readFile("/bin/busybox");
  return [
    { path: "bin/", type: "dir" },
    { path: "bin/busybox", content: busybox, mode: 0o755 },
    ...applets.map((a) => ({ path: `bin/${a}`, type: "symlink" as const, target: "busybox" })),
  ];
}

const ENTRY = `#!/bin/sh
echo "ids: uid=$(id -u) gid=$(id -g) groups=$(id -G)"
echo "cwd: $(pwd)"
echo "greeting: $GREETING"
echo "home: $HOME"
echo "leak: \${KILN_UID:-none}"
echo "motd: $(cat /etc/motd)"
if [ -e /etc/doomed ]; then echo "doomed: present"; else echo "doomed: absent"; fi
echo "args: $*"
exit "$1"
`;

const FAKE_INIT = `#!/bin/sh
echo "fake-init: pid=$$ initramfs=$([ -e /kiln ] && echo visible || echo gone)"
poweroff -f
`;

describe("kiln boot", () => {
  let reg: Registry;
  let box: Sandbox;
  let work: string;
  let app: string;
  let numeric: string;
  let initImage: string;
  let initLinkImage: string;
  let bigImage: string;
  const { kernel, modules } = testKernel();

  before(async () => {
    work = await makeTempDir("boot");
    reg = await startRegistry();
    box = await sandbox();
    const layers = join(work, "oci");
    const base = await busyboxLayer(["sh", "id", "pwd", "cat", "echo", "[", "test", "poweroff"]);
    const appSpec = {
      layers: [
        [
          ...base,
          { path: "etc/", type: "dir" },
          {
            path: "etc/passwd",
            content: "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
          },
          { path: "etc/group", content: "root:x:0:\nwheel:x:10:alice\nalice:x:1000:\n" },
          { path: "etc/motd", content: "motd of layer 1\n" },
          { path: "etc/doomed", content: "deleted by layer 2\n" },
          { path: "home/", type: "dir" },
          { path: "home/alice/", type: "dir", uid: 1000, gid: 1000 },
          { path: "home/alice/work/", type: "dir", uid: 1000, gid: 1000 },
          { path: "proc/", type: "dir" },
          { path: "sys/", type: "dir" },
          { path: "dev/", type: "dir" },
          { path: "tmp/", type: "dir", mode: 0o1777 },
        ],
        [
          { path: "etc/", type: "dir" },
          { path: "etc/motd", content: "motd of layer 2\n" },
          { path: "etc/.wh.doomed", content: "" },
          { path: "entry.sh", content: ENTRY, mode: 0o755 },
        ],
      ],
      config: {
        entrypoint: ["/entry.sh"],
        cmd: ["7"],
        env: ["PATH=/bin", "GREETING=hello from kiln"],
        workingDir: "/home/alice/work",
        user: "alice",
        architecture: "amd64",
        os: "linux",
      },
    } satisfies Omit<ImageSpec, "tag">;
    const appLayout = await buildImage(layers, { tag: "app", ...appSpec });
    // The same, as a uid/gid that /etc/passwd does not list: no supplementary groups, no HOME entry.
    const numericLayout = await buildImage(layers, {
      tag: "numeric",
      ...appSpec,
      config: { ...appSpec.config, user: "1234:1234" },
    });
    const initLayout = await buildImage(layers, {
      tag: "init",
      layers: [
        [
          ...base,
          { path: "sbin/", type: "dir" },
          { path: "sbin/init", content: FAKE_INIT, mode: 0o755 },
          { path: "proc/", type: "dir" },
          { path: "sys/", type: "dir" },
          { path: "dev/", type: "dir" },
        ],
      ],
      config: { cmd: ["/sbin/init"], architecture: "amd64", os: "linux" },
    });
    // An init system reached through a symlink: /usr/sbin/init → ../lib/systemd/systemd.
    const linkLayout = await buildImage(layers, {
      tag: "init-link",
      layers: [
        [
          ...base,
          { path: "usr/", type: "dir" },
          { path: "usr/lib/", type: "dir" },
          { path: "usr/lib/systemd/", type: "dir" },
          { path: "usr/lib/systemd/systemd", content: FAKE_INIT, mode: 0o755 },
          { path: "usr/sbin/", type: "dir" },
          { path: "usr/sbin/init", type: "symlink", target: "../lib/systemd/systemd" },
        ],
      ],
      config: { cmd: ["/usr/sbin/init"], architecture: "amd64", os: "linux" },
    });
    // A 64 MiB incompressible file: a cpio root the kernel cannot unpack in a small guest.
    const bigLayout = await buildImage(layers, {
      tag: "big",
      layers: [
        [
          ...base,
          { path: "big", size: 64 * 2 ** 20 },
          { path: "proc/", type: "dir" },
          { path: "sys/", type: "dir" },
          { path: "dev/", type: "dir" },
        ],
      ],
      config: { cmd: ["/bin/echo", "big root booted"], architecture: "amd64", os: "linux" },
    });
    bigImage = (await pushImage(bigLayout, reg, "boot/big:1")).ref;
    app = (await pushImage(appLayout, reg, "boot/app:1")).ref;
    numeric = (await pushImage(numericLayout, reg, "boot/numeric:1")).ref;
    initImage = (await pushImage(initLayout, reg, "boot/init:1")).ref;
    initLinkImage = (await pushImage(linkLayout, reg, "boot/init-link:1")).ref;
    for (const ref of [app, numeric, initImage, initLinkImage, bigImage]) {
      const r = await box.kiln(["pull", ref]);
      assert.equal(r.code, 0, r.stderr);
    }
  });
  after(async () => {
    await reg?.stop();
    await box?.cleanup();
    if (work) await removeDir(work);
  });

  const boot = (ref: string, format: string, extra: string[] = []) =>
    box.kiln(["boot", ref, "--format", format, "--kernel", kernel, "--accel", "tcg", ...extra]);

  /** The facts the entrypoint printed, as name → value. */
  function facts(stdout: string): Map<string, string> {
    const m = new Map<string, string>();
    for (const line of stdout.split("\n")) {
      const x = /^(ids|cwd|greeting|home|leak|motd|doomed|args): (.*)$/.exec(line);
      if (x) m.set(x[1]!, x[2]!);
    }
    return m;
  }

  for (const format of ["ext4", "erofs", "erofs-layers", "cpio"]) {
    it(`${format}: runs the entrypoint as the image says and exits with its status`, async () => {
      const r = await boot(app, format);
      const why = `stdout:\n${r.stdout}\nstderr:\n${r.stderr}`;
      assert.equal(r.code, 7, why);
      const f = facts(r.stdout);
      assert.equal(f.get("ids"), "uid=1000 gid=1000 groups=1000 10", why);
      assert.equal(f.get("cwd"), "/home/alice/work", why);
      assert.equal(f.get("greeting"), "hello from kiln", why);
      assert.equal(f.get("home"), "/home/alice", why);
      assert.equal(f.get("leak"), "none", why);
      assert.equal(f.get("motd"), "motd of layer 2", why);
      assert.equal(f.get("doomed"), "absent", why);
      assert.equal(f.get("args"), "7", why);
      assert.match(r.stdout, /^kiln: exit status 7$/m);
      assert.doesNotMatch(r.stdout, /\r/);
    });
  }

  it("kiln initramfs; the QEMU command vm-config prints is the one kiln boot runs; args replace cmd; a bare uid:gid", async () => {
    const initrd = join(work, "initramfs.cpio.gz");
    const built = await box.json<{ modules: string[]; missing: string[] }>([
      "initramfs",
      "--kernel-modules",
      modules,
      "-o",
      initrd,
    ]);
    assert.deepEqual(built.missing, []);
    for (const m of ["virtio_blk", "virtio_pci", "erofs", "overlay"]) assert.ok(built.modules.includes(m), m);
    // Load order: every module after the ones it depends on.
    assert.ok(built.modules.indexOf("virtio_ring") < built.modules.indexOf("virtio_blk"));
    assert.ok(built.modules.indexOf("libcrc32c") < built.modules.indexOf("erofs"));

    const flags = [
      "--format",
      "ext4",
      "--kernel",
      kernel,
      "--initrd",
      initrd,
      "--accel",
      "tcg",
      "--memory",
      "384M",
    ];
    const config = await box.kiln([
      "vm-config",
      numeric,
      "--vmm",
      "qemu",
      ...flags,
      "--",
      "5",
      "extra words",
    ]);
    assert.equal(config.code, 0, config.stderr);
    const r = await box.kiln(["--verbose", "boot", numeric, ...flags, "--", "5", "extra words"]);
    assert.equal(r.code, 5, `stdout:\n${r.stdout}\nstderr:\n${r.stderr}`);
    const f = facts(r.stdout);
    assert.equal(f.get("args"), "5 extra words");
    assert.equal(f.get("ids"), "uid=1234 gid=1234 groups=1234");
    assert.equal(f.get("cwd"), "/home/alice/work");
    const ran = /^kiln: running (.*)$/m.exec(r.stderr);
    assert.ok(ran, r.stderr);
    assert.equal(ran[1], config.stdout.trim());
  });

  it("a systemd-style image boots into its /sbin/init as PID 1, root switched", async () => {
    const r = await boot(initImage, "erofs");
    assert.equal(r.code, 0, `stdout:\n${r.stdout}\nstderr:\n${r.stderr}`);
    assert.match(r.stdout, /^fake-init: pid=1 initramfs=gone$/m);
    assert.doesNotMatch(r.stdout, /kiln: exit status/);
  });

  it("an init reached through a symlink (/usr/sbin/init → systemd) is detected too (cpio)", async () => {
    const r = await boot(initLinkImage, "cpio");
    assert.equal(r.code, 0, `stdout:\n${r.stdout}\nstderr:\n${r.stderr}`);
    assert.match(r.stdout, /^fake-init: pid=1 /m);
  });

  it("cpio: guest memory sized from the archive; an initramfs that does not fit is TOO_LARGE, not INTERNAL", async () => {
    // Without --memory: 3x the initrd plus 128M (over 256M here), and it boots.
    const sized = await boot(bigImage, "cpio", ["--verbose"]);
    assert.equal(sized.code, 0, `stdout:\n${sized.stdout}\nstderr:\n${sized.stderr}`);
    assert.match(sized.stdout, /^big root booted$/m);
    const m = / -m (\d+)M? /.exec(sized.stderr);
    assert.ok(m && Number(m[1]) > 256 && Number(m[1]) % 64 === 0, sized.stderr);
    // 160M: the kernel's tmpfs (half the memory) fills while it unpacks the archive.
    const full = await boot(bigImage, "cpio", ["--memory", "160M"]);
    assert.match(full.stdout, /Initramfs unpacking failed: write error/);
    assert.match(
      assertFails(full, "TOO_LARGE"),
      /^kiln: error \[TOO_LARGE\]: not enough guest memory for the initramfs \(160 MiB for a .*\); use --memory$/,
    );
  });

  it("a kernel whose disk driver is a module, booted without modules: the init's error, in one line", async () => {
    const initrd = join(work, "no-modules.cpio.gz");
    assert.equal((await box.kiln(["initramfs", "-o", initrd])).code, 0);
    const r = await boot(app, "erofs", ["--initrd", initrd]);
    assert.equal(r.code, 1, r.stdout);
    assert.match(r.stdout, /^kiln: error: no virtio_blk driver for \/dev\/vda /m);
    assert.match(
      r.stderr,
      /^kiln: error \[INTERNAL\]: kiln's init in the guest: no virtio_blk driver .*--kernel-modules/,
    );
    assert.equal(r.stderr.split("\n").length, 2, r.stderr);
  });

  it("a missing kernel is one clear line, before any work", async () => {
    const r = await box.kiln(["boot", app, "--kernel", join(work, "no-vmlinuz")]);
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      /^kiln: error \[NOT_FOUND\]: kernel .*no-vmlinuz does not exist \(.*apt-get download/,
    );
    assert.equal(r.stderr.split("\n").length, 2);
  });
});

/** Every module comes after the modules its .modinfo says it depends on. */
async function assertLoadOrder(mods: { name: string; file: string }[]): Promise<void> {
  const names = mods.map((m) => m.name);
  for (const [i, m] of mods.entries()) {
    for (const dep of modinfo(await readFile(m.file)).depends) {
      const at = names.indexOf(dep);
      assert.ok(at >= 0 && at < i, `${m.name} is loaded before its dependency ${dep}: ${names.join(" ")}`);
    }
  }
}

describe("kernel modules of Debian's cloud kernel", () => {
  const { modules } = testKernel();

  it("from .modinfo (no modules.dep) and from depmod's modules.dep: the same order, built-ins skipped", async () => {
    const fromModinfo = await resolveModules(modules);
    const names = fromModinfo.modules.map((m) => m.name);
    assert.deepEqual(fromModinfo.missing, []);
    // ext4 is built into this kernel; virtio_blk needs virtio and virtio_ring first.
    assert.ok(!names.includes("ext4"));
    for (const dep of ["virtio", "virtio_ring"])
      assert.ok(names.indexOf(dep) < names.indexOf("virtio_blk"), dep);

    // depmod over a copy of just the modules involved (the real tool writes the real modules.dep).
    const dir = await makeTempDir("depmod");
    try {
      const version = modules.split("/").at(-1)!;
      const dest = join(dir, "lib", "modules", version);
      await mkdir(dest, { recursive: true });
      await cp(join(modules, "modules.builtin"), join(dest, "modules.builtin"));
      for (const m of fromModinfo.modules) {
        const rel = m.file.slice(modules.length + 1);
        await mkdir(join(dest, rel, ".."), { recursive: true });
        await cp(m.file, join(dest, rel));
      }
      await run("depmod", ["-b", dir, version]);
      assert.ok(existsSync(join(dest, "modules.dep")));
      const fromDep = await resolveModules(dest);
      assert.deepEqual(fromDep.modules.map((m) => m.name).sort(), [...names].sort());
      await assertLoadOrder(fromDep.modules);
      await assertLoadOrder(fromModinfo.modules);
    } finally {
      await removeDir(dir);
    }
  });

  it("kiln's initramfs carries the modules under /kiln/modules with their load order", async () => {
    const dir = await makeTempDir("initramfs");
    try {
      const out = join(dir, "i.cpio.gz");
      const r = await writeInitramfs(out, { modulesDir: modules });
      await writeFile(join(dir, "i.cpio"), gunzipSync(await readFile(out)));
      const list = await run("cpio", ["-it", "--quiet", "-F", join(dir, "i.cpio")]);
      const names = list.split("\n");
      for (const p of [
        "init",
        "kiln/init",
        "kiln/busybox",
        "dev/console",
        "kiln/modules/order",
        "kiln/bin/nsenter",
      ]) {
        assert.ok(names.includes(p), p);
      }
      for (const m of r.modules) assert.ok(names.includes(`kiln/modules/${m}.ko`), m);
    } finally {
      await removeDir(dir);
    }
  });
});
