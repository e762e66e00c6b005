/**
 * Buffers that files are read into, placed in memory where the kernel copies into them fast.
 *
 * The kernel copies page-cache bytes out with `rep movsb`. On the AMD EPYC of these machines that
 * is 4 times slower when the destination lies 1 to 31 bytes past the source, modulo 4 KiB: 122 MB
 * read in 1 MiB pieces took 80 ms instead of 20 ms. Node's large buffers come from malloc's mmap,
 * which puts them 16 bytes into a page (its chunk header), so every read at a page-aligned file
 * offset hit that case. A view from here starts at the same offset within its page as the file
 * position it is read from. The address itself is out of JavaScript's reach: where malloc put the
 * memory elsewhere the guess is wrong, which costs speed (rarely), never correctness.
 *
 * pageAligned gives memory whose address is known (a WebAssembly memory is mapped by pages), for
 * the few long-lived buffers that O_DIRECT writes need; each reserves address space of its own, so
 * it is not used for the many short-lived read buffers.
 */

const PAGE = 4096;
const WASM_PAGE = 65536;

// The one WebAssembly API used here (TypeScript's node lib does not declare the global).
declare const WebAssembly: {
  Memory: new (descriptor: { initial: number; maximum: number }) => { buffer: ArrayBuffer };
};
/** Where malloc's mmap puts a large allocation within its first page (glibc, 64-bit). */
const MALLOC_HEADER = 16;

/** Offset into a fresh allocation whose address matches `position` within a page. */
function shift(position: number): number {
  return (((position - MALLOC_HEADER) % PAGE) + PAGE) % PAGE;
}

/** A reusable buffer for reads of at most `capacity` bytes. */
export class ReadBuffer {
  readonly #memory: Buffer;

  constructor(capacity: number) {
    this.#memory = Buffer.allocUnsafeSlow(capacity + PAGE);
  }

  /** `length` bytes (≤ capacity) to read file bytes from `position` into. */
  view(position: number, length: number): Buffer {
    const at = shift(position);
    return this.#memory.subarray(at, at + length);
  }
}

/** A new buffer of `length` bytes to read file bytes from `position` into (kept by its reader). */
export function readBuffer(position: number, length: number): Buffer {
  return new ReadBuffer(length).view(position, length);
}

/**
 * `size` zeroed bytes at a page-aligned address, as O_DIRECT needs. A WebAssembly memory is mapped
 * by pages; Node's own large buffers start 16 bytes into one (malloc's header).
 */
export function pageAligned(size: number): Buffer {
  const pages = Math.ceil(size / WASM_PAGE);
  return Buffer.from(new WebAssembly.Memory({ initial: pages, maximum: pages }).buffer, 0, size);
}
