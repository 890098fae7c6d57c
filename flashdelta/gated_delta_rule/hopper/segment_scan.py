"""Context-parallel scan kernel: the states entering each segment, S_{j+1} = M_j S_j + R_j, or R_j
where ``keep`` is 0 (truncated segments, whose M was not computed).

One CTA per (sequence, value head, V tile) walks that sequence's segments in order (``order``, padded
with a "none" segment after its last; states past the last segment are not used). M_j S_j runs on
the tensor cores in TF32 (wgmma needs B K-major, so S is staged transposed); the state, R and the sum
stay in fp32. The scan is a chain of dependent steps, so everything off the chain is loaded a step
ahead: M by TMA into two buffers, R into registers before the GEMM, segment numbers one step early.
Segment counts and all sizes are dynamic.
"""
import tilelang.language as T

ACC = "float32"


def segment_scan_kernel(K: int, BV: int, threads: int = 128):
    """The prim_func for state size K x K (K == V) and V tile BV."""
    num_seqs, max_segments = T.dynamic("num_seqs"), T.dynamic("max_segments")
    rows, v_heads = T.dynamic("rows"), T.dynamic("v_heads")     # rows = segments + 1 ("none")

    @T.prim_func
    def segment_scan(
        M: T.Tensor((rows, v_heads, K, K), T.tfloat32),    # fp32 in memory, read as tf32 by the wgmma
        R: T.Tensor((rows, v_heads, K, K), ACC),
        keep: T.Tensor((rows, v_heads), ACC),
        h0: T.Tensor((num_seqs, v_heads, K, K), ACC),
        order: T.Tensor((num_seqs, max_segments), "int32"),
        starts: T.Tensor((rows, v_heads, K, K), ACC),
    ):
        with T.Kernel(K // BV, v_heads, num_seqs, threads=threads) as (bv, h, n):
            T.pdl_sync()        # launched early (PDL): the previous kernel's writes are visible from here
            m_s = T.alloc_shared((2, K, K), T.tfloat32)
            st_s = T.alloc_shared((BV, K), T.tfloat32)
            m_full = T.alloc_barrier([threads, threads])
            S = T.alloc_fragment((K, BV), ACC)
            MS = T.alloc_fragment((K, BV), ACC)
            Rf = T.alloc_fragment((K, BV), ACC)
            segs = T.alloc_local((2,), "int32")        # this step's segment, the next one's
            keeps = T.alloc_local((1,), ACC)           # this step's keep
            v0 = bv * BV
            T.copy(h0[n, h, :, v0:v0 + BV], S)
            # M is prefetched a step ahead (TMA, two buffers), loaded even where keep is 0 (unused
            # there) so every buffer's barrier phase stays j // 2; segment numbers and keep are read a
            # step ahead too, so no step waits on a chain of small dependent loads
            segs[0] = order[n, 0]
            segs[1] = order[n, T.min(1, max_segments - 1)]
            keeps[0] = keep[segs[0], h]
            T.tma_copy(M[segs[0], h, :, :], m_s[0, :, :], barrier=m_full[0])
            T.barrier_arrive(m_full[0])
            # a plain loop: TileLang's automatic warp specialisation of a pipelined loop would give the
            # producer its own copy of S (it stages S into shared memory), which never sees updates
            for j in T.serial(max_segments):
                st = j % 2
                seg = segs[0]
                if j + 1 < max_segments:
                    T.tma_copy(M[segs[1], h, :, :], m_s[1 - st, :, :], barrier=m_full[1 - st])
                    T.barrier_arrive(m_full[1 - st])
                T.copy(R[seg, h, :, v0:v0 + BV], Rf)     # in flight under the GEMM
                T.copy(S, starts[seg, h, :, v0:v0 + BV])
                T.barrier_wait(m_full[st], (j // 2) % 2)
                if keeps[0] != 0:
                    for i, c in T.Parallel(K, BV):
                        st_s[c, i] = S[i, c]
                    T.gemm(m_s[st, :, :], st_s, MS, transpose_B=True, clear_accum=True)
                    for i, c in T.Parallel(K, BV):
                        S[i, c] = MS[i, c] + Rf[i, c]
                else:                                  # truncated: M was not computed
                    T.copy(Rf, S)
                segs[0] = segs[1]
                keeps[0] = keep[segs[1], h]
                segs[1] = order[n, T.min(j + 2, max_segments - 1)]

    return segment_scan
