"""Per-chunk preparation kernel: everything about a 64-token chunk that does not depend on the state.

One CTA per (chunk, value head), all chunks of all sequences at once. For chunk rows i, j (valid rows
only, DESIGN section 2) it writes, indexed by token like the inputs:

- ``ag[t, h, :]``  = row i of ``Ag = (Gamma * A0) diag(beta)`` with ``A0 = (I + StrictLower(diag(beta) K K^T))^-1``
- ``p[t, h, :]``   = row i of ``P = scale * Gamma * Lower(Q K^T)``
- ``coef[t, h, :]`` = (e^g_i rk_i, scale e^g_i rq_i, e^(g_C - g_i) rk_i, e^g_C), g = gate cumsum in the chunk,
  g_C that of its last valid token, rq / rk the in-kernel l2-norm factors (1 when disabled).

Folding the l2-norm into row factors lets the sequential kernel read raw q / k and stay the same with
or without it. A0 is inverted by blocks: forward substitution on the four 16 x 16 diagonal blocks
(D = their inverses), then with M = D L_off (L_off the strictly block-lower part, M^4 = 0)
``A0 = (I - M (I - M (I - M))) D`` as three tf32 tensor-core GEMMs and one more for the product with D.
"""

import tilelang.language as T

CHUNK = 64
ACC = "float32"


def chunk_matrices_kernel(K: int, dtype: str):
    """The prim_func for head dim K and q/k dtype (``"bfloat16"`` / ``"float16"``); lengths are dynamic."""
    C = CHUNK
    B = 16                                   # diagonal block size of the triangular inverse
    num_tokens = T.dynamic("num_tokens")
    qk_heads = T.dynamic("qk_heads")
    v_heads = T.dynamic("v_heads")
    num_chunks = T.dynamic("num_chunks")

    @T.prim_func
    def chunk_matrices(
        q: T.Tensor((num_tokens, qk_heads, K), dtype),
        k: T.Tensor((num_tokens, qk_heads, K), dtype),
        g: T.Tensor((num_tokens, v_heads), ACC),
        beta: T.Tensor((num_tokens, v_heads), ACC),
        chunks: T.Tensor((num_chunks, 2), "int32"),        # (first token, valid rows) per chunk
        ag: T.Tensor((num_tokens, v_heads, C), dtype),
        p: T.Tensor((num_tokens, v_heads, C), dtype),
        coef: T.Tensor((num_tokens, v_heads, 4), ACC),
        scale: T.float32,
        l2norm: T.int32,
    ):
        # 1-D grid (no 65535 limit), value heads fastest: the heads sharing a q/k tile run together (L2
        # reuse) and write adjacent rows
        with T.Kernel(num_chunks * v_heads, threads=128) as (b,):
            h = b % v_heads
            c = b // v_heads
            t0 = chunks[c, 0]
            n = chunks[c, 1]
            hk = h // (v_heads // qk_heads)
            tx = T.get_thread_binding()
            T.annotate_min_blocks_per_sm(4)         # latency-bound: keep registers <= 128 for 4 CTAs per SM

            k_s = T.alloc_shared((C, K), dtype)
            q_s = T.alloc_shared((C, K), dtype)
            loaded = T.alloc_barrier(arrive_count=128)
            gam = T.alloc_shared((C,), ACC)
            bet = T.alloc_shared((C,), ACC)
            rk = T.alloc_shared((C,), ACC)
            rq = T.alloc_shared((C,), ACC)
            mat = T.alloc_shared((C, C), ACC)       # N, then D, then M, then Y
            mat_t = T.alloc_shared((C, C), ACC)     # B operands, stored transposed (K-major, as tf32 MMA needs)
            diag = T.alloc_shared((C, B), ACC)      # the four inverted 16 x 16 diagonal blocks, stacked
            ag_s = T.alloc_shared((C, C), dtype)    # outputs staged for wide, coalesced stores
            p_s = T.alloc_shared((C, C), dtype)

            qq = T.alloc_fragment((C, C), ACC)
            kk = T.alloc_fragment((C, C), ACC)
            acc = T.alloc_fragment((C, C), ACC)     # tf32 products (their own fragment layout)
            qk = T.alloc_fragment((C, C), ACC)
            col = T.alloc_local((B,), ACC)

            # Rows past the chunk's end belong to the next sequence (or lie past T: TMA fills zeros);
            # every use below masks them.
            T.tma_copy(k[t0:t0 + C, hk, 0:K], k_s, barrier=loaded)
            T.tma_copy(q[t0:t0 + C, hk, 0:K], q_s, barrier=loaded)
            T.barrier_arrive(loaded)
            for i in T.Parallel(C):
                gam[i] = T.if_then_else(i < n, g[t0 + i, h], 0.0)
                bet[i] = T.if_then_else(i < n, beta[t0 + i, h], 0.0)
            T.cumsum(gam, dim=0)
            T.barrier_wait(loaded, 0)

            T.gemm(k_s, k_s, kk, transpose_B=True, clear_accum=True)
            T.gemm(q_s, k_s, qk, transpose_B=True, clear_accum=True)
            # l2-norm factors from the diagonals of K K^T and Q Q^T
            for i, j in T.Parallel(C, C):
                if i == j:
                    rk[i] = T.if_then_else(l2norm != 0, T.rsqrt(kk[i, j] + 1e-6), 1.0)
            if l2norm != 0:
                T.gemm(q_s, q_s, qq, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(C, C):
                    if i == j:
                        rq[i] = T.rsqrt(qq[i, j] + 1e-6)
            else:
                for i in T.Parallel(C):
                    rq[i] = 1.0

            # N = StrictLower(diag(beta) Kn Kn^T), Kn the normalised keys
            for i, j in T.Parallel(C, C):
                mat[i, j] = T.if_then_else(i > j, kk[i, j] * bet[i] * rk[i] * rk[j], 0.0)

            # forward substitution in the diagonal blocks, one thread per (block, column), the column in
            # registers: X_i = e_i - sum_{j<i} N_ij X_j (unrolled at trace time)
            if tx < C:
                b = tx // B
                e = tx % B
                for i in list(range(B)):
                    col[i] = T.if_then_else(e == i, 1.0, 0.0) - sum(
                        [mat[b * B + i, b * B + j] * col[j] for j in range(i)], T.float32(0))
                for i in list(range(B)):
                    diag[b * B + i, e] = col[i]

            # mat_t = L_off^T, then mat = D
            for i, j in T.Parallel(C, C):
                mat_t[j, i] = T.if_then_else(i // B > j // B, mat[i, j], 0.0)
            for i, j in T.Parallel(C, C):
                mat[i, j] = T.if_then_else(i // B == j // B, diag[i, j % B], 0.0)
            T.gemm(mat, mat_t, acc, transpose_B=True, clear_accum=True)        # M = D L_off
            for i, j in T.Parallel(C, C):
                mat[i, j] = acc[i, j]
                mat_t[j, i] = T.if_then_else(i == j, 1.0, 0.0) - acc[i, j]   # Z = I - M
            for _ in T.serial(2):                                             # Z = I - M Z, twice
                T.gemm(mat, mat_t, acc, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(C, C):
                    mat_t[j, i] = T.if_then_else(i == j, 1.0, 0.0) - acc[i, j]
            for i, j in T.Parallel(C, C):
                mat[i, j] = mat_t[j, i]                                       # Y = (I + M)^-1
            for i, j in T.Parallel(C, C):
                mat_t[j, i] = T.if_then_else(i // B == j // B, diag[i, j % B], 0.0)   # D^T
            T.gemm(mat, mat_t, acc, transpose_B=True, clear_accum=True)        # A0 = Y D

            last = gam[T.max(n, 1) - 1]
            for i, j in T.Parallel(C, C):
                ag_s[i, j] = T.if_then_else(i >= j and i < n, acc[i, j] * T.exp(gam[i] - gam[j]) * bet[j], 0.0)
            for i, j in T.Parallel(C, C):
                p_s[i, j] = T.if_then_else(i >= j and i < n,
                                           qk[i, j] * T.exp(gam[i] - gam[j]) * rq[i] * rk[j] * scale, 0.0)
            for i, j in T.Parallel(C, C):
                if i < n:
                    ag[t0 + i, h, j] = ag_s[i, j]
                    p[t0 + i, h, j] = p_s[i, j]
            for i in T.Parallel(C):
                if i < n:
                    coef[t0 + i, h, 0] = T.exp(gam[i]) * rk[i]
                    coef[t0 + i, h, 1] = T.exp(gam[i]) * rq[i] * scale
                    coef[t0 + i, h, 2] = T.exp(last - gam[i]) * rk[i]
                    coef[t0 + i, h, 3] = T.exp(last)

    return chunk_matrices
