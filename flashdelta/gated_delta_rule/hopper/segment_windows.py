"""Warm-up plan kernel: per (segment, value head), what the CP warm-up computes and whether the scan
applies M -- the device twin of ``segments.warmup_spans``.

One thread per (segment, value head) walks the segment's chunks backwards through the per-chunk
statistics written by ``chunk_matrices`` (summed log-decay, count of tokens breaking
0 <= beta |k|^2 <= 2), accumulating the suffix's decay until it reaches -tau. Reached with no broken
token on the way: truncated -- R over that window only, no M. Otherwise: R and M over the whole
segment. Sequences' last segments (never read by the scan) and the "none" row get empty spans.
"""
import tilelang.language as T

ACC = "float32"


def segment_windows_kernel(chunk: int, threads: int = 128, batch: int = 16):
    """``batch`` chunks' statistics are loaded before any is used, so a walk waits on one load
    latency per ``batch`` chunks instead of one per chunk (the walk was 13 us at 32 chunks)."""
    num_chunks, v_heads, rows = T.dynamic("num_chunks"), T.dynamic("v_heads"), T.dynamic("rows")

    @T.prim_func
    def segment_windows(
        stats: T.Tensor((num_chunks, v_heads, 2), ACC),   # (decay, broken tokens) per chunk
        segments: T.Tensor((rows, 5), "int32"),           # first token, length, first chunk, chunks, used
        spans: T.Tensor((rows, v_heads, 4), "int32"),     # R first, R length, M first, M length
        keep: T.Tensor((rows, v_heads), ACC),
        tau: T.float32,
    ):
        with T.Kernel(T.ceildiv(v_heads, threads), rows, threads=threads) as (bh, j):
            T.pdl_sync()        # launched early (PDL): the previous kernel's writes are visible from here
            h = bh * threads + T.get_thread_binding()
            decay = T.alloc_var(ACC, init=0.0)
            broken = T.alloc_var(ACC, init=0.0)
            window = T.alloc_var("int32", init=0)          # chunks in the window; 0 = not reached
            loaded = T.alloc_local((batch, 2), ACC)
            first, length = segments[j, 0], segments[j, 1]
            c0, count, used = segments[j, 2], segments[j, 3], segments[j, 4]
            walk = count * used
            if h < v_heads:
                for b in T.serial(T.ceildiv(walk, batch)):
                    for u in T.unroll(batch):               # clamped: in range, unused past the walk
                        back = T.max(c0 + count - 1 - b * batch - u, c0)
                        loaded[u, 0] = stats[back, h, 0]
                        loaded[u, 1] = stats[back, h, 1]
                    for u in T.unroll(batch):
                        if window == 0 and b * batch + u < walk:
                            decay += loaded[u, 0]
                            broken += loaded[u, 1]
                            if decay <= -tau:
                                window = b * batch + u + 1
                truncate = window > 0 and broken == 0
                skip = T.if_then_else(truncate, (count - window) * chunk, 0)
                spans[j, h, 0] = first + skip
                spans[j, h, 1] = (length - skip) * used
                spans[j, h, 2] = first
                spans[j, h, 3] = T.if_then_else(truncate, 0, length * used)
                keep[j, h] = T.if_then_else(truncate, 0.0, T.cast(used, ACC))

    return segment_windows
