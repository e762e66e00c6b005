/**
 * VM configs: what `kiln vm-config` prints for Firecracker (JSON config file), Cloud Hypervisor and
 * QEMU (command lines), the disk order, the kernel command line and the config it carries — read
 * back by a real shell (busybox sh) the way kiln's init reads it.
 */
import assert from "node:assert/strict";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import {
  CMDLINE_BUDGET,
  configScript,
  type GuestConfig,
  kernelCmdline,
  virtioDiskName,
} from "../../src/boot/cmdline.js";
import {
  cloudHypervisorArgs,
  DEFAULT_MEMORY_MIB,
  guestMemoryMiB,
  planVm,
  qemuArgs,
} from "../../src/boot/vmm.js";
import { isKilnError } from "../../src/errors.js";
import { type Sandbox, sandbox } from "../cli/kiln.js";
import { makeTempDir, removeDir, run } from "../helpers/exec.js";
import { buildImage } from "../helpers/images.js";

const CONFIG: GuestConfig = {
  args: ["/bin/app", "it's", 'a "quoted" $HOME `x` \\ word', "line\nbreak", "--", ""],
  env: ["PATH=/usr/bin:/bin", "EMPTY=", "X=a=b", "dotted.name=1", "NOVALUE"],
  workingDir: "/srv/app",
  uid: 1000,
  gid: 100,
  groups: [10, 20],
  hostname: "web",
  systemd: false,
};

/** What kiln's init makes of a config script: busybox sh sources it and rebuilds the lists. */
async function readBack(
  script: string,
): Promise<{ vars: Record<string, string>; env: string[]; args: string[] }> {
  const dir = await makeTempDir("cfg");
  try {
    await writeFile(join(dir, "config"), script);
    // Each value NUL-terminated; the three lists separated by a \x01 marker item.
    const probe = `. "$1"
for v in KILN_UID KILN_GID KILN_GROUPS KILN_WORKDIR KILN_HOSTNAME KILN_SYSTEMD; do eval "printf '%s=%s\\0' \\"\\$v\\" \\"\\$$v\\""; done
printf '\\001\\0'
i=1; while [ $i -le "$KILN_NENV" ]; do eval "printf '%s\\0' \\"\\$KILN_ENV_$i\\""; i=$((i + 1)); done
printf '\\001\\0'
i=1; while [ $i -le "$KILN_NARGS" ]; do eval "printf '%s\\0' \\"\\$KILN_ARG_$i\\""; i=$((i + 1)); done
`;
    const out = await run("busybox", ["sh", "-c", probe, "sh", join(dir, "config")]);
    const items = out.split("\0").slice(0, -1);
    const a = items.indexOf("\x01");
    const b = items.indexOf("\x01", a + 1);
    const vars = items.slice(0, a);
    return {
      vars: Object.fromEntries(
        vars.map((kv) => [kv.slice(0, kv.indexOf("=")), kv.slice(kv.indexOf("=") + 1)]),
      ),
      env: items.slice(a + 1, b),
      args: items.slice(b + 1),
    };
  } finally {
    await removeDir(dir);
  }
}

describe("guest config and kernel command line", () => {
  it("the config script survives a real shell byte for byte", async () => {
    const back = await readBack(configScript(CONFIG));
    assert.deepEqual(back.vars, {
      KILN_UID: "1000",
      KILN_GID: "100",
      KILN_GROUPS: "10 20",
      KILN_WORKDIR: "/srv/app",
      KILN_HOSTNAME: "web",
      KILN_SYSTEMD: "0",
    });
    // An entry without "=" sets nothing and is left out.
    assert.deepEqual(back.env, ["PATH=/usr/bin:/bin", "EMPTY=", "X=a=b", "dotted.name=1"]);
    assert.deepEqual(back.args, CONFIG.args);
  });

  it("refuses a NUL byte and an empty command", () => {
    assert.throws(
      () => configScript({ ...CONFIG, args: ["a\0b"] }),
      (e) => isKilnError(e, "INVALID_ARGUMENT"),
    );
    assert.throws(
      () => configScript({ ...CONFIG, args: [] }),
      (e) => isKilnError(e, "INVALID_ARGUMENT"),
    );
  });

  it("names disks as Linux does: vda … vdz, vdaa", () => {
    assert.deepEqual([0, 1, 25, 26, 27, 51, 52, 701, 702].map(virtioDiskName), [
      "vda",
      "vdb",
      "vdz",
      "vdaa",
      "vdab",
      "vdaz",
      "vdba",
      "vdzz",
      "vdaaa",
    ]);
  });

  it("a config too long for the command line goes on a config disk after the data disks", async () => {
    const big = { ...CONFIG, env: [...CONFIG.env, `BIG=${"x".repeat(4000)}`] };
    const line = kernelCmdline({
      root: "erofs-layers",
      layers: 3,
      upper: true,
      base: ["console=ttyS0"],
      config: big,
    });
    assert.ok(line.cmdline.length <= CMDLINE_BUDGET);
    assert.match(line.cmdline, /kiln\.lowers=vda,vdb,vdc kiln\.upper=vdd kiln\.cfgdisk=vde$/);
    assert.doesNotMatch(line.cmdline, /kiln\.cfg=/);
    assert.ok(line.configDisk && line.configDisk.length % 4096 === 0);
    // The init strips the NUL padding (tr -d '\0') and sources the rest.
    const back = await readBack(line.configDisk.toString("latin1").replace(/\0+$/, ""));
    assert.equal(back.env.at(-1), big.env.at(-1));

    const plan = planVm({
      vmm: "qemu",
      arch: "x86_64",
      kernel: "/k",
      initrd: "/i",
      root: "erofs-layers",
      rootDisks: ["/l0", "/l1", "/l2"],
      upper: "/up",
      config: big,
      memoryMiB: 256,
      cpus: 2,
      configDiskPath: "/cfg.img",
    });
    assert.deepEqual(
      plan.spec.disks.map((d) => [d.id, d.path, d.readOnly]),
      [
        ["layer0", "/l0", true],
        ["layer1", "/l1", true],
        ["layer2", "/l2", true],
        ["upper", "/up", false],
        ["config", "/cfg.img", true],
      ],
    );
    assert.equal(plan.configDisk?.path, "/cfg.img");
    // Without a place for the config disk: one clear error.
    assert.throws(
      () => planVm({ ...planArgs(), config: big, configDiskPath: undefined }),
      (e) => isKilnError(e, "TOO_LARGE") && /config disk/.test(e.message),
    );
  });

  it("guest memory: 512M for disk roots; an initramfs gets 3x the initrd plus 128M, in 64M steps", () => {
    const MiB = 2 ** 20;
    for (const root of ["ext4", "erofs", "erofs-layers"] as const) {
      assert.equal(guestMemoryMiB(root, 4096 * MiB), DEFAULT_MEMORY_MIB);
    }
    assert.equal(DEFAULT_MEMORY_MIB, 512);
    // Small archives keep the default.
    for (const bytes of [0, 1, 64 * MiB, 128 * MiB]) assert.equal(guestMemoryMiB("initramfs", bytes), 512);
    // The 185 MB archive that the default 512M could not unpack: 3 * 176.4 + 128 = 658 -> 704.
    assert.equal(guestMemoryMiB("initramfs", 185_000_000), 704);
    assert.equal(guestMemoryMiB("initramfs", 1024 * MiB), 3200);
    for (let bytes = 100 * MiB; bytes < 3000 * MiB; bytes += 77 * MiB + 12345) {
      const m = guestMemoryMiB("initramfs", bytes);
      assert.equal(m % 64, 0, `${bytes}`);
      assert.ok(m * MiB >= 3 * bytes + 128 * MiB, `${bytes} -> ${m}`);
      assert.ok(m === 512 || m * MiB < 3 * bytes + 192 * MiB, `${bytes} -> ${m}`);
    }
  });

  it("QEMU doubles commas in drive paths; Cloud Hypervisor refuses them", () => {
    const { spec } = planVm({ ...planArgs(), rootDisks: ["/a,b/root.erofs"] });
    assert.ok(qemuArgs(spec, "tcg").includes("file=/a,,b/root.erofs,format=raw,if=virtio,readonly=on"));
    assert.throws(
      () => cloudHypervisorArgs(spec),
      (e) => isKilnError(e, "INVALID_ARGUMENT"),
    );
    assert.deepEqual(qemuArgs(spec, "kvm").slice(0, 7), [
      "qemu-system-x86_64",
      "-M",
      "pc",
      "-accel",
      "kvm",
      "-cpu",
      "host",
    ]);
  });
});

function planArgs() {
  return {
    vmm: "qemu" as const,
    arch: "x86_64" as const,
    kernel: "/k",
    initrd: "/i",
    root: "erofs" as const,
    rootDisks: ["/root.erofs"],
    config: CONFIG,
    memoryMiB: 256,
    cpus: 1,
  };
}

/** Cloud Hypervisor's flags kiln uses, and whether each takes values. */
const CH_FLAGS = new Set([
  "--kernel",
  "--initramfs",
  "--cmdline",
  "--disk",
  "--memory",
  "--cpus",
  "--serial",
  "--console",
]);

describe("kiln vm-config", () => {
  let box: Sandbox;
  let work: string;
  let initrd: string;

  before(async () => {
    box = await sandbox();
    work = await makeTempDir("vmconfig");
    await buildImage(join(work, "oci"), {
      tag: "app",
      layers: [
        [
          { path: "etc/", type: "dir" },
          { path: "etc/passwd", content: "root:x:0:0::/root:/bin/sh\nweb:x:33:33::/var/www:/bin/sh\n" },
          { path: "app", content: "#!/bin/sh\n", mode: 0o755 },
        ],
        [{ path: "data.txt", content: "layer 2\n" }],
      ],
      config: { entrypoint: ["/app"], cmd: ["serve"], env: ["MODE=prod"], user: "web", workingDir: "/srv" },
    });
    const r = await box.kiln(["import", join(work, "oci"), "--tag", "vm/app:1"]);
    assert.equal(r.code, 0, r.stderr);
    // vm-config only names the kernel and initrd; any files do.
    await mkdir(join(work, "boot"));
    initrd = join(work, "boot", "initramfs.cpio.gz");
    await writeFile(initrd, "");
  });
  after(async () => {
    await box?.cleanup();
    if (work) await removeDir(work);
  });

  const kernelFile = () => join(work, "boot", "vmlinuz-test");

  it("firecracker: a JSON config file with the layer disks in order, read-only, and Firecracker's boot args", async () => {
    await writeFile(kernelFile(), "");
    const r = await box.kiln([
      "vm-config",
      "vm/app:1",
      "--vmm",
      "firecracker",
      "--format",
      "erofs-layers",
      "--kernel",
      kernelFile(),
      "--initrd",
      initrd,
      "--memory",
      "1G",
      "--cpus",
      "2",
    ]);
    assert.equal(r.code, 0, r.stderr);
    const config = JSON.parse(r.stdout) as {
      "boot-source": { kernel_image_path: string; initrd_path: string; boot_args: string };
      drives: { drive_id: string; path_on_host: string; is_root_device: boolean; is_read_only: boolean }[];
      "machine-config": { vcpu_count: number; mem_size_mib: number };
    };
    assert.equal(config["boot-source"].kernel_image_path, kernelFile());
    assert.equal(config["boot-source"].initrd_path, initrd);
    const args = config["boot-source"].boot_args.split(" ");
    for (const w of [
      "console=ttyS0",
      "reboot=k",
      "panic=1",
      "pci=off",
      "kiln.root=erofs-layers",
      "kiln.lowers=vda,vdb",
      "kiln.halt=reboot",
    ]) {
      assert.ok(args.includes(w), `${w} in ${config["boot-source"].boot_args}`);
    }
    assert.deepEqual(
      config.drives.map((d) => [
        d.drive_id,
        d.path_on_host.split("/").at(-1),
        d.is_root_device,
        d.is_read_only,
      ]),
      [
        ["layer0", "layer-000.erofs", false, true],
        ["layer1", "layer-001.erofs", false, true],
      ],
    );
    assert.deepEqual(config["machine-config"], { vcpu_count: 2, mem_size_mib: 1024 });
    // The layer files are the store's export, listed bottom first by its layers.json.
    const dir = config.drives[0]!.path_on_host.replace(/\/layer-000\.erofs$/, "");
    const list = JSON.parse(await readFile(join(dir, "layers.json"), "utf8")) as {
      layers: { file: string }[];
    };
    assert.deepEqual(
      list.layers.map((l) => join(dir, l.file)),
      config.drives.map((d) => d.path_on_host),
    );
    // The config on the command line is the image's, as the init will read it.
    const cfg = args.find((w) => w.startsWith("kiln.cfg="))!.slice("kiln.cfg=".length);
    const back = await readBack(Buffer.from(cfg, "base64").toString("utf8"));
    assert.deepEqual(back.args, ["/app", "serve"]);
    assert.equal(back.vars.KILN_UID, "33");
    assert.equal(back.vars.KILN_WORKDIR, "/srv");
    assert.ok(back.env.includes("MODE=prod"));
    assert.ok(back.env.includes("HOME=/var/www"));
  });

  it("cloud-hypervisor: a command line of flags it knows, the root read-only on the serial console", async () => {
    await writeFile(kernelFile(), "");
    const r = await box.json<{ argv: string[] }>([
      "vm-config",
      "vm/app:1",
      "--vmm",
      "cloud-hypervisor",
      "--format",
      "ext4",
      "--kernel",
      kernelFile(),
      "--initrd",
      initrd,
      "--",
      "migrate",
    ]);
    const argv = r.argv;
    assert.equal(argv[0], "cloud-hypervisor");
    const values = new Map<string, string[]>();
    let flag = "";
    for (const a of argv.slice(1)) {
      if (a.startsWith("--")) {
        assert.ok(CH_FLAGS.has(a), `unknown flag ${a}`);
        assert.ok(!values.has(a), `repeated flag ${a}`);
        flag = a;
        values.set(a, []);
      } else {
        assert.ok(flag, `value ${a} before any flag`);
        values.get(flag)!.push(a);
      }
    }
    for (const [f, v] of values) assert.ok(v.length >= 1, `${f} without a value`);
    assert.deepEqual(values.get("--kernel"), [kernelFile()]);
    assert.deepEqual(values.get("--initramfs"), [initrd]);
    assert.equal(values.get("--disk")!.length, 1);
    assert.match(values.get("--disk")![0]!, /^path=\/[^,]+\.ext4,readonly=on$/);
    assert.deepEqual(values.get("--memory"), ["size=512M"]);
    assert.deepEqual(values.get("--cpus"), ["boot=1"]);
    assert.deepEqual(values.get("--serial"), ["tty"]);
    assert.deepEqual(values.get("--console"), ["off"]);
    const cmdline = values.get("--cmdline")![0]!.split(" ");
    assert.ok(cmdline.includes("console=ttyS0") && cmdline.includes("kiln.root=ext4"));
    const cfg = cmdline.find((w) => w.startsWith("kiln.cfg="))!.slice("kiln.cfg=".length);
    assert.deepEqual((await readBack(Buffer.from(cfg, "base64").toString("utf8"))).args, ["/app", "migrate"]);
  });

  it("flags that need files written say so, in one line", async () => {
    await writeFile(kernelFile(), "");
    const base = ["vm-config", "vm/app:1", "--vmm", "qemu", "--kernel", kernelFile()];
    for (const [extra, pattern] of [
      [["--format", "ext4"], /--initrd/],
      [["--format", "cpio", "--initrd", initrd], /--output-dir/],
      [["--format", "ext4", "--initrd", initrd, "--rw"], /--output-dir/],
      [["--format", "ext4", "--initrd", initrd, "--upper", initrd], /erofs-layers/],
    ] as const) {
      const r = await box.kiln([...base, ...extra]);
      assert.equal(r.code, 2, r.stdout);
      assert.match(r.stderr, /^kiln: error \[INVALID_ARGUMENT\]: /);
      assert.match(r.stderr, pattern);
      assert.equal(r.stderr.split("\n").length, 2, r.stderr);
    }
  });
});
