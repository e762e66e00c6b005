/**
 * Pulling from a registry into an open store: the registry client, credentials and source that a
 * pull needs, built from user-facing options. The CLI's `pull` and the service's builds share it.
 */
import type { ImageRef } from "../reference/reference.js";
import type { RegistryOptions } from "../registry/client.js";
import type { Platform } from "../registry/platform.js";
import type { Store } from "../store/store.js";
import {
  type BlobTap,
  type IngestProgress,
  type IngestResult,
  ingestImage,
  type TappedLayer,
} from "./ingest.js";

export interface RegistryPullOptions {
  /** `user:pass`; otherwise credentials come from the docker config (DOCKER_CONFIG or ~/.docker). */
  creds?: string | undefined;
  insecureRegistries?: string[] | undefined;
  caFile?: string | undefined;
  registryMirrors?: string[] | undefined;
  /** Layers downloaded at once (default 3). */
  concurrency?: number | undefined;
  /** Transport tuning (timeouts, retries); mostly for tests. */
  registry?:
    | Omit<RegistryOptions, "credentials" | "insecureRegistries" | "caFile" | "registryMirrors">
    | undefined;
  env?: NodeJS.ProcessEnv | undefined;
}

export interface PullIntoOptions extends RegistryPullOptions {
  platform?: Platform | undefined;
  progress?: IngestProgress | undefined;
  signal?: AbortSignal | undefined;
  /** Also gives each layer fetched to a tap (see IngestOptions.tap). */
  tap?: ((layer: TappedLayer) => BlobTap | undefined) | undefined;
}

/** Pulls `ref` into `store`, verified; blobs already present are not fetched. */
export async function pullInto(
  store: Store,
  ref: ImageRef,
  opts: PullIntoOptions = {},
): Promise<IngestResult> {
  const env = opts.env ?? process.env;
  // Loaded here, not at the top: a CLI command that does not pull does not pay for undici.
  const [{ RegistryClient }, { dockerCredentials }, { RegistrySource }] = await Promise.all([
    import("../registry/client.js"),
    import("../registry/credentials.js"),
    import("./registry.js"),
  ]);
  const client = new RegistryClient({
    ...opts.registry,
    env,
    insecureRegistries: opts.insecureRegistries,
    caFile: opts.caFile,
    registryMirrors: opts.registryMirrors,
    credentials: dockerCredentials({ explicit: opts.creds, env }),
  });
  const source = new RegistrySource(ref, client);
  try {
    return await ingestImage(store, source, {
      platform: opts.platform,
      concurrency: opts.concurrency,
      progress: opts.progress,
      signal: opts.signal,
      tap: opts.tap,
    });
  } finally {
    await source.close();
    await client.close();
  }
}
