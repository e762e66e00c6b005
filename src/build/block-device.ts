/** Writing a finished image onto a block device in place (a disk, a partition, a loop device). */
import { constants } from "node:fs";
import { type FileHandle, open, readFile, stat } from "node:fs/promises";
import { KilnError } from "../errors.js";
import { formatSize } from "../sizes.js";

/** A block device's size in bytes, from sysfs (Linux); undefined where it cannot be read. */
export async function blockDeviceSize(path: string): Promise<number | undefined> {
  const { rdev } = await stat(path);
  // Linux's dev_t encoding (glibc's gnu_dev_major/minor).
  const major = ((rdev >> 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
  const minor = (rdev & 0xff) | ((rdev >> 12) & ~0xff);
  try {
    const sectors = Number((await readFile(`/sys/dev/block/${major}:${minor}/size`, "utf8")).trim());
    return Number.isSafeInteger(sectors) ? sectors * 512 : undefined;
  } catch {
    return undefined;
  }
}

/** Refuses an image of `bytes` bytes that does not fit on the device at `path`. */
export async function checkFitsDevice(path: string, bytes: number): Promise<void> {
  const size = await blockDeviceSize(path);
  if (size === undefined) {
    throw new KilnError("INVALID_ARGUMENT", `cannot write ${path}: the block device's size cannot be read`);
  }
  if (bytes > size) {
    throw new KilnError(
      "TOO_LARGE",
      `cannot write ${path}: the image (${formatSize(bytes, "up")}) is larger than the device (${formatSize(size)})`,
      { details: { bytes, deviceBytes: size } },
    );
  }
}

/**
 * Refuses a block device something holds: a mounted filesystem, a partition in use, a device-mapper
 * target.
 */
export async function checkDeviceFree(path: string): Promise<void> {
  await (await openExclusive(path)).close();
}

/**
 * Opens a block device read-write, without O_CREAT or O_TRUNC. O_EXCL claims it while it is written:
 * Linux fails it with EBUSY on a device something holds.
 */
async function openExclusive(path: string): Promise<FileHandle> {
  return open(path, constants.O_RDWR | constants.O_EXCL).catch((err: NodeJS.ErrnoException) => {
    if (err.code === "EBUSY") {
      throw new KilnError("INVALID_ARGUMENT", `cannot write ${path}: the device is in use (mounted?)`);
    }
    throw err;
  });
}

const CHUNK = 1 << 20;

/**
 * Copies the file `src` onto the block device `dev` from its first byte, every byte (zeros too: the
 * device's old content is not a hole), and flushes it. The device is never truncated or replaced;
 * bytes past the image stay as they were.
 */
export async function writeToDevice(
  src: string,
  dev: string,
  onBytes?: ((n: number) => void) | undefined,
): Promise<number> {
  const size = (await stat(src)).size;
  await checkFitsDevice(dev, size);
  const input = await open(src, "r");
  try {
    const output = await openExclusive(dev);
    try {
      const buf = Buffer.allocUnsafe(CHUNK);
      let pos = 0;
      while (pos < size) {
        const { bytesRead } = await input.read(buf, 0, Math.min(CHUNK, size - pos), pos);
        if (bytesRead === 0) throw new KilnError("INTERNAL", `${src} ended early while written to ${dev}`);
        let done = 0;
        while (done < bytesRead) {
          const { bytesWritten } = await output.write(buf, done, bytesRead - done, pos + done);
          if (bytesWritten === 0) throw new KilnError("STORE", `${dev} accepts no more bytes`);
          done += bytesWritten;
        }
        onBytes?.(bytesRead);
        pos += bytesRead;
      }
      await output.sync();
      return size;
    } finally {
      await output.close();
    }
  } finally {
    await input.close();
  }
}
