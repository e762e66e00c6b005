/** Prometheus metrics of the service, on a registry of its own (not prom-client's global one). */
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from "prom-client";
import type { ImageManager } from "../build/manager.js";

export function serviceMetrics(manager: ImageManager): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: "kiln_" });
  const durations = new Histogram({
    name: "kiln_build_duration_seconds",
    help: "Time from a build's start to ready or failed, by format",
    labelNames: ["format", "status"],
    // Builds take from well under a second (cached, small) to many minutes (big images, slow registries).
    buckets: [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800],
    registers: [registry],
  });
  const pulls = new Counter({
    name: "kiln_pulls_total",
    help: "Pulls from registries by builds, by result",
    labelNames: ["result"],
    registers: [registry],
  });
  new Gauge({
    name: "kiln_queue_length",
    help: "Builds waiting to start",
    registers: [registry],
    collect() {
      this.set(manager.queueLength());
    },
  });
  new Gauge({
    name: "kiln_images",
    help: "Requested images by status",
    labelNames: ["status"],
    registers: [registry],
    collect() {
      const counts: Record<string, number> = { pending: 0, pulling: 0, converting: 0, ready: 0, failed: 0 };
      for (const i of manager.listImages()) counts[i.status] = (counts[i.status] ?? 0) + 1;
      for (const [status, n] of Object.entries(counts)) this.set({ status }, n);
    },
  });
  new Gauge({
    name: "kiln_blob_bytes",
    help: "Bytes of blobs (manifests, configs, layers) in the store",
    registers: [registry],
    async collect() {
      this.set(await manager.totalBlobBytes());
    },
  });
  new Gauge({
    name: "kiln_artifact_bytes",
    help: "Bytes of exported filesystems in the store",
    registers: [registry],
    collect() {
      this.set(manager.totalImageBytes());
    },
  });
  manager.on("finished", ({ image, seconds }) =>
    durations.observe({ format: image.format, status: image.status }, seconds),
  );
  manager.on("pulled", ({ ok }) => pulls.inc({ result: ok ? "ok" : "error" }));
  return registry;
}
