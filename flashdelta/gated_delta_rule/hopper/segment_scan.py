"""Context-parallel scan kernel: the states entering each segment, S_{j+1} = M_j S_j + R_j, or R_j
where ``keep`` is 0 (truncated segments, whose M was not computed).

One CTA per (sequence, value head, V tile) walks that sequence's segments in order (``order``, padded
with a "none" segment after its last; states past the last segment are not used). M_j S_j runs on
the tensor cores in TF32 (wgmma needs B K-major, so S is staged transposed); the state, R and the sum
stay in fp32. Loads are plain 16-byte vector loads (no TMA): the scan is a few steps per sequence.
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
            m_s = T.alloc_shared((K, K), T.tfloat32)
            st_s = T.alloc_shared((BV, K), T.tfloat32)
            S = T.alloc_fragment((K, BV), ACC)
            MS = T.alloc_fragment((K, BV), ACC)
            v0 = bv * BV
            T.copy(h0[n, h, :, v0:v0 + BV], S)
            # a plain loop: TileLang's automatic warp specialisation of a pipelined loop would give the
            # TMA producer its own copy of S (it stages S into shared memory), which never sees updates
            for j in T.serial(max_segments):
                seg = order[n, j]
                T.copy(S, starts[seg, h, :, v0:v0 + BV])
                if keep[seg, h] != 0:
                    for i, c in T.Parallel(K, BV):
                        st_s[c, i] = S[i, c]
                    T.copy(M[seg, h, :, :], m_s)
                    T.gemm(m_s, st_s, MS, transpose_B=True, clear_accum=True)
                    for i, c in T.Parallel(K, BV):
                        S[i, c] = MS[i, c] + R[seg, h, i, v0 + c]
                else:                                  # truncated: M is neither computed nor read
                    T.copy(R[seg, h, :, v0:v0 + BV], S)

    return segment_scan
