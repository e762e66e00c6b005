/** The output formats of `kiln export`; kept apart so the CLI can check flags without loading the writers. */
export type ExportFormat = "ext4" | "erofs" | "erofs-layers" | "cpio";
export const EXPORT_FORMATS: readonly ExportFormat[] = ["ext4", "erofs", "erofs-layers", "cpio"];
