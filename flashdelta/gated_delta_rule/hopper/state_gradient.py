"""Backward walk: the gradient of the state, chunks last to first, and dv.

One CTA per (sequence, value head, V tile of width BV), ``chunked_backward.state_gradient_walk`` on
the device. The state's gradient dS (K x V, fp32) stays in registers, transposed as the forward holds
S (dS^T, BV x K), so that every GEMM of its chain takes its A operand from registers. Per chunk, with
Ag and the row factors c0..c7 of ``chunk_matrices`` (DESIGN section 7):

    dV'^T = dS'^T K^T diag(c2) + dO^T P          P = Lower(c5 (Q K^T) c6^T 2^(c4 - c4^T))
    dU^T  = dV'^T Ag                             (dv = dU)
    dS^T  = c3 dS'^T + (dO^T diag(c1)) Q - (dU^T diag(c0)) K

The walk needs no forward state: dS obeys its own affine recurrence (dS = M^T dS' + G, G from dO
alone), which is also what a context-parallel backward splits. Each chunk's dS' (the gradient of the
state leaving it) is stored for ``chunk_gradients``, in q's dtype and V-major (dS'^T), as that kernel's
GEMMs read it; dh0 is the gradient left after the first chunk.

Rows past a sequence's end (the next sequence's tokens, or TMA's zeros past T) are masked out of P's
rows, dV''s columns and the row factors, so they reach neither dv nor dS. Tiles stream through TileLang's
software pipeline (``T.Pipelined``), one stage ahead.
"""
import tilelang.language as T
from tilelang.layout import make_swizzled_layout

from .chunk_matrices import COEFS

CHUNK = 64
ACC = "float32"


def state_gradient_kernel(K: int, V: int, BV: int, dtype: str, stages: int = 2):
    """The prim_func for head dims K, V, V tile BV (64 or 128: one consumer warpgroup per 64 rows of
    dS^T) and q/k/v dtype; lengths and head counts are dynamic."""
    C = CHUNK
    threads = 2 * BV
    num_tokens = T.dynamic("num_tokens")
    qk_heads = T.dynamic("qk_heads")
    v_heads = T.dynamic("v_heads")
    num_seqs = T.dynamic("num_seqs")
    dht_seqs = T.dynamic("dht_seqs")       # num_seqs, or 1 for the unused placeholder
    dh0_seqs = T.dynamic("dh0_seqs")
    num_chunks = T.dynamic("num_chunks")
    ROWS = T.GemmWarpPolicy.FullRow        # each warpgroup owns 64 of the BV rows of dS^T

    @T.prim_func
    def state_gradient(
        q: T.Tensor((num_tokens, qk_heads, K), dtype),
        k: T.Tensor((num_tokens, qk_heads, K), dtype),
        do: T.Tensor((num_tokens, v_heads, V), dtype),
        ag: T.Tensor((num_tokens, v_heads, C), dtype),
        coef: T.Tensor((v_heads, num_tokens, COEFS), ACC),
        seqs: T.Tensor((num_seqs, 3), "int32"),        # (first token, length, first chunk) per sequence
        dht: T.Tensor((dht_seqs, v_heads, K * V), ACC),
        dv: T.Tensor((num_tokens, v_heads, V), dtype),
        dh0: T.Tensor((dh0_seqs, v_heads, K * V), ACC),
        dstates: T.Tensor((num_chunks, v_heads, V, K), dtype),
        has_dht: T.int32,
        store_dh0: T.int32,
        v_first: T.int32,
    ):
        with T.Kernel(V // BV, v_heads, num_seqs, threads=threads) as (bv, h, n):
            hk = h // (v_heads // qk_heads)
            v0 = bv * BV
            start = seqs[n, 0]
            length = seqs[n, 1]
            first_chunk = seqs[n, 2]

            q_s = T.alloc_shared((C, K), dtype)
            k_s = T.alloc_shared((C, K), dtype)
            do_s = T.alloc_shared((C, BV), dtype)
            ag_s = T.alloc_shared((C, C), dtype)
            cf_s = T.alloc_shared((C, COEFS), ACC)
            p_s = T.alloc_shared((C, C), dtype)
            dv_s = T.alloc_shared((C, BV), dtype)          # dU staged for its store
            T.annotate_layout({do_s: make_swizzled_layout(do_s), dv_s: make_swizzled_layout(dv_s)})

            dS = T.alloc_fragment((BV, K), ACC)            # dS^T
            dsa = T.alloc_fragment((BV, K), dtype)         # dS^T as an A operand
            qk = T.alloc_fragment((C, C), ACC)
            acc = T.alloc_fragment((BV, C), ACC)
            dvn = T.alloc_fragment((BV, C), dtype)         # dV'^T
            du = T.alloc_fragment((BV, C), ACC)            # dU^T
            dot = T.alloc_fragment((BV, C), dtype)         # (dO^T diag(c1))
            dub = T.alloc_fragment((BV, C), dtype)         # -(dU^T diag(c0))

            if has_dht != 0:
                for i, j in T.Parallel(BV, K):
                    dS[i, j] = T.if_then_else(v_first != 0, dht[n, h, (v0 + i) * K + j], dht[n, h, j * V + v0 + i])
            else:
                T.clear(dS)

            count = T.ceildiv(length, C)
            for r in T.Pipelined(count, num_stages=stages):
                c = count - 1 - r
                t0 = start + c * C
                rows = length - c * C                      # valid tokens of this chunk (> 64 = all)
                T.copy(q[t0:t0 + C, hk, 0:K], q_s)
                T.copy(k[t0:t0 + C, hk, 0:K], k_s)
                T.copy(do[t0:t0 + C, h, v0:v0 + BV], do_s)
                T.copy(ag[t0:t0 + C, h, 0:C], ag_s)
                T.copy(coef[h, t0:t0 + C, 0:COEFS], cf_s)

                T.copy(dS, dsa)
                for i, j in T.Parallel(BV, K):
                    dstates[first_chunk + c, h, v0 + i, j] = dsa[i, j]

                T.gemm(q_s, k_s, qk, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(C, C):
                    qk[i, j] = qk[i, j] * cf_s[i, 5] * cf_s[j, 6] * T.Cast(ACC, i >= j and i < rows) * T.exp2(
                        T.min(cf_s[i, 4] - cf_s[j, 4], 0.0))
                T.copy(qk, p_s)

                # dV'^T = dS'^T K^T diag(c2) + dO^T P, columns past the end masked
                T.gemm(dsa, k_s, acc, transpose_B=True, clear_accum=True, policy=ROWS)
                for i, j in T.Parallel(BV, C):
                    acc[i, j] = acc[i, j] * cf_s[j, 2]
                T.gemm(do_s, p_s, acc, transpose_A=True, policy=ROWS)
                for i, j in T.Parallel(BV, C):
                    dvn[i, j] = acc[i, j] * T.Cast(ACC, j < rows)
                T.gemm(dvn, ag_s, du, clear_accum=True, policy=ROWS)

                for i, j in T.Parallel(BV, C):
                    dv_s[j, i] = du[i, j]
                if rows >= C:
                    T.copy(dv_s, dv[t0:t0 + C, h, v0:v0 + BV])
                else:
                    for i, j in T.Parallel(C, BV):
                        if i < rows:
                            dv[t0 + i, h, v0 + j] = dv_s[i, j]

                # dS^T = c3 dS'^T + (dO^T diag(c1)) Q - (dU^T diag(c0)) K
                for i, j in T.Parallel(BV, C):
                    dot[i, j] = do_s[j, i] * cf_s[j, 1] * T.Cast(ACC, j < rows)
                    dub[i, j] = -du[i, j] * cf_s[j, 0] * T.Cast(ACC, j < rows)
                for i, j in T.Parallel(BV, K):
                    dS[i, j] = dS[i, j] * cf_s[0, 3]
                T.gemm(dot, q_s, dS, policy=ROWS)
                T.gemm(dub, k_s, dS, policy=ROWS)

            if store_dh0 != 0:
                for i, j in T.Parallel(BV, K):
                    if v_first != 0:
                        dh0[n, h, (v0 + i) * K + j] = dS[i, j]
                    else:
                        dh0[n, h, j * V + v0 + i] = dS[i, j]

    return state_gradient
