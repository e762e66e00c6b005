/**
 * Long synchronous work beside streams (a writer's metadata beside its file data): the work checks
 * `due()` between steps and, when it is, awaits `yield()`, which lets the event loop run what is
 * waiting (reads and writes completing, the next chunk of a data stream) before going on. Without
 * turns, the streams would stall until the work is done and the disk would sit idle meanwhile.
 */
/** How long the work runs between turns, in milliseconds. */
const SLICE_MS = 1;

export class TimeSlices {
  #since = performance.now();
  #steps = 0;

  /** The slice is used up (the clock is read every 32 steps: a read costs as much as a small step). */
  due(): boolean {
    if ((++this.#steps & 31) !== 0) return false;
    return performance.now() - this.#since >= SLICE_MS;
  }

  /** Gives the event loop a turn (I/O callbacks run before setImmediate's); a new slice starts. */
  async yield(): Promise<void> {
    await new Promise<void>((resolve) => setImmediate(resolve));
    this.#since = performance.now();
  }
}
