import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { makeTempDir, removeDir, run } from "./exec.js";
import { type EntrySpec, writeLayerTar } from "./layers.js";
import type { Creds, Registry } from "./registry.js";

export type { EntrySpec } from "./layers.js";

/** One tagged image (or index) in an OCI layout directory; `ref` is skopeo's `oci:DIR:TAG`. */
export interface Layout {
  dir: string;
  tag: string;
  ref: string;
}

/** A layer: entries for GNU tar (`endBlocks: false` drops the end-of-archive blocks), or a ready tar. */
export type LayerSpec = EntrySpec[] | { entries: EntrySpec[]; endBlocks?: boolean } | { tarFile: string };

export interface ConfigSpec {
  entrypoint?: string[];
  cmd?: string[];
  env?: string[];
  workingDir?: string;
  user?: string;
  labels?: Record<string, string>;
  stopSignal?: string;
  /** e.g. "8080/tcp". */
  exposedPorts?: string[];
  volumes?: string[];
  architecture?: string;
  os?: string;
  variant?: string;
  author?: string;
  /** RFC 3339; default 2024-01-01T00:00:00Z so builds are reproducible. */
  created?: string;
}

export interface ImageSpec {
  /** Default "latest". Several images may share one layout dir under different tags. */
  tag?: string;
  layers: LayerSpec[];
  config?: ConfigSpec;
}

const CREATED = "2024-01-01T00:00:00Z";

export const MEDIA = {
  OCI_INDEX: "application/vnd.oci.image.index.v1+json",
  OCI_MANIFEST: "application/vnd.oci.image.manifest.v1+json",
  OCI_CONFIG: "application/vnd.oci.image.config.v1+json",
  OCI_LAYER: "application/vnd.oci.image.layer.v1.tar",
  OCI_LAYER_GZIP: "application/vnd.oci.image.layer.v1.tar+gzip",
  OCI_LAYER_ZSTD: "application/vnd.oci.image.layer.v1.tar+zstd",
  DOCKER_LIST: "application/vnd.docker.distribution.manifest.list.v2+json",
  DOCKER_MANIFEST: "application/vnd.docker.distribution.manifest.v2+json",
  DOCKER_CONFIG: "application/vnd.docker.container.image.v1+json",
  DOCKER_LAYER: "application/vnd.docker.image.rootfs.diff.tar",
  DOCKER_LAYER_GZIP: "application/vnd.docker.image.rootfs.diff.tar.gzip",
  IN_TOTO: "application/vnd.in-toto+json",
} as const;

/** Builds an OCI image with umoci: each layer a real tar (GNU tar), gzip-compressed by umoci. */
export async function buildImage(dir: string, spec: ImageSpec): Promise<Layout> {
  const tag = spec.tag ?? "latest";
  const image = `${dir}:${tag}`;
  if (!existsSync(join(dir, "oci-layout"))) await run("umoci", ["init", "--layout", dir]);
  await run("umoci", ["new", "--image", image]);
  const work = await makeTempDir("layers");
  try {
    for (const [i, layer] of spec.layers.entries()) {
      let tarFile: string;
      if ("tarFile" in layer) tarFile = layer.tarFile;
      else {
        tarFile = join(work, `layer-${i}.tar`);
        const entries = Array.isArray(layer) ? layer : layer.entries;
        await writeLayerTar(
          tarFile,
          entries,
          Array.isArray(layer) ? {} : { endBlocks: layer.endBlocks ?? true },
        );
      }
      await run("umoci", ["raw", "add-layer", "--image", image, "--history.created", CREATED, tarFile]);
    }
  } finally {
    await removeDir(work);
  }
  const c = spec.config ?? {};
  const args = ["config", "--image", image, "--created", c.created ?? CREATED, "--history.created", CREATED];
  const many = (flag: string, values: string[] | undefined) => {
    for (const v of values ?? []) args.push(flag, v);
  };
  many("--config.entrypoint", c.entrypoint);
  many("--config.cmd", c.cmd);
  many("--config.env", c.env);
  many("--config.exposedports", c.exposedPorts);
  many("--config.volume", c.volumes);
  many(
    "--config.label",
    Object.entries(c.labels ?? {}).map(([k, v]) => `${k}=${v}`),
  );
  if (c.workingDir !== undefined) args.push("--config.workingdir", c.workingDir);
  if (c.user !== undefined) args.push("--config.user", c.user);
  if (c.stopSignal !== undefined) args.push("--config.stopsignal", c.stopSignal);
  if (c.architecture !== undefined) args.push("--architecture", c.architecture);
  if (c.os !== undefined) args.push("--os", c.os);
  if (c.author !== undefined) args.push("--author", c.author);
  await run("umoci", args);
  const layout = { dir, tag, ref: `oci:${dir}:${tag}` };
  // umoci config has no --variant.
  if (c.variant !== undefined) {
    const variant = c.variant;
    await editConfig(layout, (cfg) => {
      cfg.variant = variant;
    });
  }
  return layout;
}

type Json = Record<string, unknown>;
interface Desc {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
  platform?: Json;
}

const REF_NAME = "org.opencontainers.image.ref.name";

/** Writes a blob into the layout; returns its descriptor. */
export async function writeBlob(dir: string, mediaType: string, bytes: Buffer): Promise<Desc> {
  const hex = createHash("sha256").update(bytes).digest("hex");
  await writeFile(join(dir, "blobs", "sha256", hex), bytes);
  return { mediaType, digest: `sha256:${hex}`, size: bytes.length };
}

export async function readBlob(dir: string, digest: string): Promise<Buffer> {
  return readFile(join(dir, "blobs", "sha256", digest.replace(/^sha256:/, "")));
}

/** The descriptor index.json gives the layout's tag (a manifest or an index). */
export async function tagDescriptor(layout: Layout): Promise<Desc> {
  const index = JSON.parse(await readFile(join(layout.dir, "index.json"), "utf8")) as { manifests: Desc[] };
  const d = index.manifests.find((m) => m.annotations?.[REF_NAME] === layout.tag);
  if (!d) throw new Error(`OCI layout ${layout.dir} has no tag ${layout.tag}`);
  return d;
}

/** Points the layout's tag at `desc` (replacing what it named before). */
export async function setTag(layout: Layout, desc: Desc): Promise<void> {
  const file = join(layout.dir, "index.json");
  const index = JSON.parse(await readFile(file, "utf8")) as { manifests: Desc[] };
  index.manifests = index.manifests.filter((m) => m.annotations?.[REF_NAME] !== layout.tag);
  index.manifests.push({ ...desc, annotations: { ...desc.annotations, [REF_NAME]: layout.tag } });
  await writeFile(file, JSON.stringify(index));
}

/** Rewrites the tagged manifest's JSON (new blob, tag moved to it); for odd media types, annotations. */
export async function editManifest(layout: Layout, edit: (manifest: Json) => void): Promise<void> {
  const desc = await tagDescriptor(layout);
  const manifest = JSON.parse((await readBlob(layout.dir, desc.digest)).toString("utf8")) as Json;
  edit(manifest);
  const { annotations: _, ...rest } = desc;
  const next = await writeBlob(layout.dir, desc.mediaType, Buffer.from(JSON.stringify(manifest)));
  await setTag(layout, { ...rest, digest: next.digest, size: next.size });
}

/** Rewrites the tagged image's config JSON, then its manifest to point at the new config. */
export async function editConfig(layout: Layout, edit: (config: Json) => void): Promise<void> {
  const desc = await tagDescriptor(layout);
  const manifest = JSON.parse((await readBlob(layout.dir, desc.digest)).toString("utf8")) as { config: Desc };
  const config = JSON.parse((await readBlob(layout.dir, manifest.config.digest)).toString("utf8")) as Json;
  edit(config);
  const next = await writeBlob(layout.dir, manifest.config.mediaType, Buffer.from(JSON.stringify(config)));
  await editManifest(layout, (m) => {
    m.config = { ...(m.config as Desc), digest: next.digest, size: next.size };
  });
}

export interface MultiArchOptions {
  tag?: string;
  /** Add a BuildKit-style attestation manifest (platform unknown/unknown). Default true. */
  attestation?: boolean;
}

/**
 * An OCI index of linux/amd64 and linux/arm64/v8 images, each with `/etc/arch` naming its
 * architecture and its own extra layer, plus (by default) an in-toto attestation manifest
 * annotated `vnd.docker.reference.type: attestation-manifest`. The per-arch images stay tagged
 * `TAG-amd64` and `TAG-arm64`.
 */
export async function buildMultiArch(dir: string, opts: MultiArchOptions = {}): Promise<Layout> {
  const tag = opts.tag ?? "latest";
  const arches = [
    { architecture: "amd64", os: "linux" },
    { architecture: "arm64", os: "linux", variant: "v8" },
  ];
  const manifests: Desc[] = [];
  for (const p of arches) {
    const image = await buildImage(dir, {
      tag: `${tag}-${p.architecture}`,
      layers: [
        [
          { path: "etc/", type: "dir" },
          { path: "etc/arch", content: `${p.architecture}\n` },
        ],
        [
          { path: "opt/", type: "dir" },
          { path: `opt/${p.architecture}.txt`, content: `only on ${p.architecture}${p.variant ?? ""}\n` },
        ],
      ],
      config: { ...p, cmd: ["/bin/sh"], env: [`ARCH=${p.architecture}`] },
    });
    const { annotations: _, ...d } = await tagDescriptor(image);
    manifests.push({ ...d, mediaType: MEDIA.OCI_MANIFEST, platform: p });
  }
  if (opts.attestation ?? true) {
    const statement = Buffer.from(
      JSON.stringify({
        _type: "https://in-toto.io/Statement/v0.1",
        predicateType: "https://spdx.dev/Document",
        subject: [{ name: "kiln-test", digest: { sha256: manifests[0]!.digest.slice(7) } }],
        predicate: { spdxVersion: "SPDX-2.3" },
      }),
    );
    const layer = await writeBlob(dir, MEDIA.IN_TOTO, statement);
    layer.annotations = { "in-toto.io/predicate-type": "https://spdx.dev/Document" };
    const config = await writeBlob(
      dir,
      MEDIA.OCI_CONFIG,
      Buffer.from(
        JSON.stringify({
          architecture: "unknown",
          os: "unknown",
          config: {},
          rootfs: { type: "layers", diff_ids: [layer.digest] },
        }),
      ),
    );
    const manifest = { schemaVersion: 2, mediaType: MEDIA.OCI_MANIFEST, config, layers: [layer] };
    const d = await writeBlob(dir, MEDIA.OCI_MANIFEST, Buffer.from(JSON.stringify(manifest)));
    manifests.push({
      ...d,
      annotations: {
        "vnd.docker.reference.digest": manifests[0]!.digest,
        "vnd.docker.reference.type": "attestation-manifest",
      },
      platform: { architecture: "unknown", os: "unknown" },
    });
  }
  const index = { schemaVersion: 2, mediaType: MEDIA.OCI_INDEX, manifests };
  const layout = { dir, tag, ref: `oci:${dir}:${tag}` };
  await setTag(layout, await writeBlob(dir, MEDIA.OCI_INDEX, Buffer.from(JSON.stringify(index))));
  return layout;
}

export interface RegistryAccess {
  /** Default: the registry's first user when it has auth; `null` = anonymous. */
  creds?: Creds | null;
  /** `false` skips certificate checks on a TLS registry (default: trust its caFile). */
  tlsVerify?: false;
}

/** skopeo flags to reach `registry`; `side` is "src", "dest" or "" (inspect, delete). */
export function skopeoFlags(
  registry: Registry,
  side: "src" | "dest" | "",
  access: RegistryAccess = {},
): string[] {
  const p = side === "" ? "--" : `--${side}-`;
  const flags: string[] = [];
  if (!registry.tls || access.tlsVerify === false) flags.push(`${p}tls-verify=false`);
  else flags.push(`${p}cert-dir`, registry.certDir!);
  const creds = access.creds === undefined ? registry.users[0] : access.creds;
  if (creds && (registry.auth !== "none" || access.creds))
    flags.push(`${p}creds`, `${creds.user}:${creds.pass}`);
  return flags;
}

export function skopeo(args: readonly string[]): Promise<string> {
  return run("skopeo", ["--insecure-policy", ...args]);
}

export interface PushOptions extends RegistryAccess {
  /** Default "oci" (as built); "v2s2" converts to Docker schema 2 media types. */
  format?: "oci" | "v2s2";
  /** Default "gzip" (as built). zstd and none go through a separate local copy first. */
  compression?: "gzip" | "zstd" | "none";
}

export interface Pushed {
  /** `127.0.0.1:PORT/REPO:TAG`. */
  ref: string;
  /** Digest of the pushed manifest (or index). */
  digest: string;
}

/**
 * Pushes a layout's tag to `registry` as `repoTag` with skopeo (an index with all its images).
 * zstd/uncompressed layers are made locally first and pushed with --preserve-digests: skopeo
 * would otherwise reuse gzip blobs the registry already has.
 */
export async function pushImage(
  image: Layout,
  registry: Registry,
  repoTag: string,
  opts: PushOptions = {},
): Promise<Pushed> {
  const compression = opts.compression ?? "gzip";
  const format = opts.format === "v2s2" ? ["--format", "v2s2"] : [];
  if (opts.format === "v2s2" && compression === "zstd") throw new Error("Docker schema 2 has no zstd layers");
  const all = (await tagDescriptor(image)).mediaType === MEDIA.OCI_INDEX ? ["--all"] : [];
  const ref = `${registry.host}/${repoTag}`;
  const work = await makeTempDir("push");
  try {
    const digestFile = join(work, "digest");
    const dest = [...skopeoFlags(registry, "dest", opts), "--digestfile", digestFile];
    if (compression === "gzip") {
      await skopeo(["copy", "-q", ...all, ...format, ...dest, image.ref, `docker://${ref}`]);
    } else {
      const stage =
        compression === "zstd" ? `oci:${join(work, "stage")}:${image.tag}` : `dir:${join(work, "stage")}`;
      const how = compression === "zstd" ? ["--dest-compress-format", "zstd"] : ["--dest-decompress"];
      await skopeo(["copy", "-q", ...all, ...format, ...how, image.ref, stage]);
      await skopeo(["copy", "-q", ...all, "--preserve-digests", ...dest, stage, `docker://${ref}`]);
    }
    return { ref, digest: (await readFile(digestFile, "utf8")).trim() };
  } finally {
    await removeDir(work);
  }
}

export interface RawImage {
  /** The exact manifest (or index) bytes the registry serves, and their digest. */
  manifest: Buffer;
  manifestDigest: string;
  /** The manifest's mediaType field, else inferred (umoci writes OCI manifests without one). */
  mediaType: string;
  /** Parsed manifest, for convenience. */
  json: Json;
  /** Config bytes and digest; absent for an index. */
  config?: Buffer;
  configDigest?: string;
}

/** The manifest and config of `repoTag` exactly as the registry serves them (skopeo inspect --raw). */
export async function inspectRaw(
  registry: Registry,
  repoTag: string,
  access: RegistryAccess = {},
): Promise<RawImage> {
  const ref = `docker://${registry.host}/${repoTag}`;
  const flags = skopeoFlags(registry, "", access);
  const manifest = await run("skopeo", ["inspect", "--raw", ...flags, ref], { binary: true });
  const json = JSON.parse(manifest.toString("utf8")) as Json;
  const mediaType =
    typeof json.mediaType === "string"
      ? json.mediaType
      : Array.isArray(json.manifests)
        ? MEDIA.OCI_INDEX
        : MEDIA.OCI_MANIFEST;
  const out: RawImage = { manifest, manifestDigest: sha256(manifest), mediaType, json };
  if (!Array.isArray(json.manifests)) {
    out.config = await run("skopeo", ["inspect", "--config", "--raw", ...flags, ref], { binary: true });
    out.configDigest = sha256(out.config);
  }
  return out;
}

/** `docker save`-style archive of the layout's image, tagged `nameTag` (e.g. "example/app:1"). */
export async function toDockerArchive(image: Layout, file: string, nameTag: string): Promise<string> {
  await skopeo(["copy", "-q", image.ref, `docker-archive:${file}:${nameTag}`]);
  return file;
}

/** An OCI archive (tar of an OCI layout) holding the image under its tag. */
export async function toOciArchive(image: Layout, file: string): Promise<string> {
  await skopeo(
    ["copy", "-q", ...((await tagDescriptor(image)).mediaType === MEDIA.OCI_INDEX ? ["--all"] : [])].concat([
      image.ref,
      `oci-archive:${file}:${image.tag}`,
    ]),
  );
  return file;
}

export function sha256(bytes: Buffer): string {
  return `sha256:${createHash("sha256").update(bytes).digest("hex")}`;
}
