/**
 * Sizes as kiln prints them: binary units (KiB, MiB, GiB, TiB), the units `--size 512M` is read in,
 * so a size comes out as it was given.
 */

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

/**
 * `314572800` → `300 MiB`, `1610612736` → `1.5 GiB`. `round: "up"` for a minimum the user must
 * meet, so the printed figure is never below the real one.
 */
export function formatSize(bytes: number, round: "nearest" | "up" = "nearest"): string {
  if (!Number.isFinite(bytes)) return "?";
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < UNITS.length - 1) {
    v /= 1024;
    i++;
  }
  if (i === 0) return `${bytes} B`;
  const scale = v >= 100 ? 1 : 10;
  const r = (round === "up" ? Math.ceil(v * scale - 1e-9) : Math.round(v * scale)) / scale;
  return `${r} ${UNITS[i]}`;
}
