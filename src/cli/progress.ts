import cliProgress from "cli-progress";
import type { ExportPhase, ExportProgress } from "../build/export.js";
import type { IngestProgress } from "../source/ingest.js";
import { formatBytes, formatDuration, shortDigest } from "./format.js";

/**
 * Progress bars for downloads on a TTY: one bar per layer being fetched and a total with blob i/n,
 * bytes, speed and ETA. Speed is a moving average over the last few seconds.
 */
export function ttyProgress(stream: NodeJS.WriteStream): IngestProgress & { stop(): void } {
  const multi = new cliProgress.MultiBar(
    {
      stream,
      hideCursor: true,
      clearOnComplete: false,
      stopOnComplete: false,
      autopadding: true,
      barsize: 20,
      fps: 8,
      format: (options, params, payload: { label: string; total: number; value: number; extra?: string }) => {
        const width = options.barsize ?? 20;
        const ratio = params.total > 0 ? Math.min(1, params.value / params.total) : 1;
        const filled = Math.round(ratio * width);
        const bar = `${"█".repeat(filled)}${"░".repeat(width - filled)}`;
        // Kept under 80 columns: cli-progress cuts longer lines to the terminal width.
        return `${payload.label} ${bar} ${`${formatBytes(params.value)}/${formatBytes(params.total)}`.padEnd(17)}${payload.extra ?? ""}`;
      },
    },
    cliProgress.Presets.shades_classic,
  );
  const bars = new Map<string, { bar: cliProgress.SingleBar; value: number; total: number; label: string }>();
  let total: cliProgress.SingleBar | undefined;
  let totalBytes = 0;
  let received = 0;
  let blobsDone = 0;
  let blobsToFetch = 0;
  const samples: [number, number][] = [];

  const totalExtra = () => {
    const now = Date.now();
    samples.push([now, received]);
    while (samples.length > 2 && now - samples[0]![0] > 5000) samples.shift();
    const [t0, b0] = samples[0]!;
    const speed = now > t0 ? ((received - b0) * 1000) / (now - t0) : 0;
    const eta = speed > 0 ? (totalBytes - received) / speed : Number.NaN;
    return ` blob ${blobsDone}/${blobsToFetch} ${formatBytes(speed)}/s ETA ${formatDuration(eta)}`;
  };

  return {
    start(plan) {
      const todo = plan.layers.filter((l) => !l.present);
      blobsToFetch = todo.length;
      totalBytes = todo.reduce((s, l) => s + l.size, 0);
      for (const l of plan.layers) {
        if (l.present) {
          stream.write(`${shortDigest(l.digest)}  already present (${formatBytes(l.size)})\n`);
        }
      }
      if (todo.length === 0) return;
      for (const l of todo) {
        const label = `${shortDigest(l.digest)}`;
        bars.set(l.digest, {
          bar: multi.create(l.size, 0, { label, total: l.size, value: 0 }),
          value: 0,
          total: l.size,
          label,
        });
      }
      total = multi.create(totalBytes, 0, { label: "total       ", extra: totalExtra() });
    },
    bytes(digest, n) {
      const b = bars.get(digest);
      if (!b) return;
      b.value += n;
      received += n;
      b.bar.update(Math.min(b.value, b.total), { label: b.label });
      total?.update(Math.min(received, totalBytes), { label: "total       ", extra: totalExtra() });
    },
    layerDone(digest) {
      blobsDone++;
      const b = bars.get(digest);
      b?.bar.update(b.total, { label: b.label, extra: " verified" });
      total?.update(Math.min(received, totalBytes), { label: "total       ", extra: totalExtra() });
    },
    stop() {
      multi.stop();
    },
  };
}

/** Plain lines for logs (non-TTY with --verbose): one line per finished layer. */
export function lineProgress(stream: NodeJS.WritableStream): IngestProgress {
  let n = 0;
  let todo = 0;
  return {
    start(plan) {
      todo = plan.layers.filter((l) => !l.present).length;
      for (const l of plan.layers) {
        stream.write(`${l.present ? "present " : "fetching"} ${l.digest} ${formatBytes(l.size)}\n`);
      }
    },
    layerDone(digest) {
      n++;
      stream.write(`verified ${digest} (${n}/${todo})\n`);
    },
  };
}

const PHASE_LABELS: Record<ExportPhase, string> = {
  reading: "reading layers",
  writing: "writing",
  copying: "copying out",
};

/** A phase's label: "writing ext4" names the format. */
function phaseLabel(phase: ExportPhase, format: string): string {
  return phase === "writing" ? `${PHASE_LABELS.writing} ${format}` : PHASE_LABELS[phase];
}

/** Bytes per second over the last few seconds of samples. */
class Speed {
  #samples: [number, number][] = [];

  sample(done: number): number {
    const now = Date.now();
    this.#samples.push([now, done]);
    while (this.#samples.length > 2 && now - this.#samples[0]![0] > 5000) this.#samples.shift();
    const [t0, b0] = this.#samples[0]!;
    return now > t0 ? ((done - b0) * 1000) / (now - t0) : 0;
  }
}

/**
 * Export progress on a TTY: one bar per phase (reading layers, writing FORMAT, copying out) with
 * layer i/n, bytes of the phase's total (compressed layer bytes; the result's size when copying),
 * speed and ETA. Finished phases stay on screen.
 */
export function ttyExportProgress(stream: NodeJS.WriteStream): ExportProgress & { stop(): void } {
  const multi = new cliProgress.MultiBar(
    {
      stream,
      hideCursor: true,
      clearOnComplete: false,
      stopOnComplete: false,
      autopadding: true,
      barsize: 16,
      fps: 8,
      format: (options, params, payload: { label: string; extra?: string }) => {
        const width = options.barsize ?? 16;
        const ratio = params.total > 0 ? Math.min(1, params.value / params.total) : 1;
        const filled = Math.round(ratio * width);
        const bar = `${"█".repeat(filled)}${"░".repeat(width - filled)}`;
        const bytes = `${formatBytes(params.value)}/${formatBytes(params.total)}`;
        return `${payload.label.padEnd(26)} ${bar} ${bytes.padEnd(17)}${payload.extra ?? ""}`;
      },
    },
    cliProgress.Presets.shades_classic,
  );
  let format = "";
  let bar: cliProgress.SingleBar | undefined;
  let phase: ExportPhase | undefined;
  let total = 0;
  let done = 0;
  let layer = "";
  let speed = new Speed();
  const label = () => `${phaseLabel(phase!, format)}${layer}`;
  const extra = () => {
    const rate = speed.sample(done);
    const eta = rate > 0 ? (total - done) / rate : Number.NaN;
    return ` ${formatBytes(rate)}/s ETA ${formatDuration(eta)}`;
  };
  const update = () => bar?.update(Math.min(done, total), { label: label(), extra: extra() });
  return {
    start(plan) {
      format = plan.format;
      if (plan.cached) stream.write(`${plan.format} image found in the store's cache\n`);
    },
    phase(p, t) {
      phase = p;
      total = t;
      done = 0;
      layer = "";
      speed = new Speed();
      bar = multi.create(t, 0, { label: label(), extra: extra() });
    },
    layer(index, count) {
      layer = ` (layer ${index + 1}/${count})`;
      update();
    },
    bytes(n) {
      done += n;
      update();
    },
    phaseEnd() {
      done = total;
      layer = "";
      bar?.update(total, { label: label(), extra: " done" });
    },
    stop() {
      multi.stop();
    },
  };
}

/**
 * Export progress as plain lines (non-TTY with --verbose): each phase's start, each layer it moves
 * to, and its end with bytes, time and speed.
 */
export function lineExportProgress(stream: NodeJS.WritableStream): ExportProgress {
  let format = "";
  let phase: ExportPhase | undefined;
  let total = 0;
  let done = 0;
  let started = 0;
  const name = () => phaseLabel(phase!, format);
  return {
    start(plan) {
      format = plan.format;
      const bytes = plan.layers.reduce((n, l) => n + l.size, 0);
      stream.write(
        plan.cached
          ? `export: ${plan.format} image found in the store's cache\n`
          : `export: ${plan.format} from ${plan.layers.length} layer${plan.layers.length === 1 ? "" : "s"} (${formatBytes(bytes)})\n`,
      );
    },
    phase(p, t) {
      phase = p;
      total = t;
      done = 0;
      started = Date.now();
      stream.write(`${name()}: ${formatBytes(t)}\n`);
    },
    layer(index, count) {
      stream.write(`${name()}: layer ${index + 1}/${count} (${formatBytes(done)}/${formatBytes(total)})\n`);
    },
    bytes(n) {
      done += n;
    },
    phaseEnd() {
      const seconds = (Date.now() - started) / 1000;
      const rate = seconds > 0 ? `, ${formatBytes(done / seconds)}/s` : "";
      stream.write(
        `${name()}: done ${formatBytes(done)}/${formatBytes(total)} in ${seconds.toFixed(2)} s${rate}\n`,
      );
    },
  };
}
