"""Backward, per chunk: dq, dk, dbeta and dg of one 64-token chunk and GVA group.

``chunked_backward.chunk_local_gradients`` on the device: one CTA per (q/k head, chunk), all chunks
at once, looping over the group's value heads, from the state entering the chunk (``chunk_recurrence``
in its ``save_states`` variant), the gradient of the state leaving it and dv (both from
``state_gradient``), dO, and the gated inverse ``A0g = Gamma * A0`` (``chunk_matrices`` with
``store_a0g``). With Q~ = scale Q, K and Q after the l2-norm, b = e^gamma, Ag = A0g diag(beta)
(DESIGN section 7):

    U = V - diag(b) K S          V' = Ag U          P = Gamma * (Q~ K^T)
    dV' = diag(b_C / b) K dS' + P^T dO              dP = Gamma * (dO V'^T)
    dQ~ = diag(b) dO S^T + dP K
    dK  = dP^T Q~ + diag(b_C / b) V' dS'^T - diag(b) dU S^T + (H + H^T) K
    dAg = dV' U^T,   dbeta_j = sum_i dAg_ij A0g_ij + sum_j' dLg_jj' (Gamma * K K^T)_jj'
    dLg = -StrictLower(A0g^T Y A0g^T),  Y = StrictLower(dAg) diag(beta),  H = dLg * Gamma * beta_i

and dgamma_i, every e^gamma factor's term (+ row i of each gated product for e^gamma_i, - column j
for e^-gamma_j, the state's ``b_C <dS', S>`` on the last row), reverse-summed into dg (each row sums its own tail: 64 shared reads, no scan), all in fp32.

Rows past the chunk's end are made what the PyTorch path pads with: q, k, v, dO and dv rows zeroed,
beta 0, gamma held at the last valid row's, A0g's rows the identity's. Then no mask is needed anywhere
else and the kernel computes exactly the specification. dq and dk are summed over the group in
registers (q and k are loaded once, dq and dk written once per q/k head in q's dtype: no fp32 round
trip, no sum on the host). With the in-kernel l2-norm (``l2norm``) they go through its backward in the
epilogue, dq = r (dq^ - q^ <q^, dq^>) with q^ = r q, from what the CTA holds: Q~ = s q^ (s = scale)
and the row factor s r, so dq = s r (dQ~ - Q~ <Q~, dQ~> / s^2) for dQ~ the accumulated gradient of Q~
(dq^ = s dQ~); the same for k with Kn = r_k k and r_k. s = 0 gives dq = 0, as it should.

Loads are TMA, each tile group on its own mbarrier and waited for just before its first use, so the
first value head's GEMMs start while its later tiles land. The next value head's tiles are issued as
soon as the current one has read each buffer for the last time (S^T, dS'^T, dO and dv after the dK
terms, U after dAg; A0g and the row factors into a second buffer at the start), under the rest of the
current head's work. A loop over chunks instead would need the q / k buffers twice; one chunk per CTA
keeps every chunk's CTAs independent.

Shared memory (225 KB of the 227) holds q, k, v (then U), dO, dv, V' and dV' (64 x 128 each), S^T and
dS'^T (128 x 128), two buffers of A0g and the row factors, and two 64 x 64 operands reused as the walk
goes (Ag, then P, then A0g^T's product, then H; dP, then Y).
"""
import tilelang.language as T

from .chunk_matrices import COEFS

CHUNK = 64
ACC = "float32"


def chunk_gradients_kernel(K: int, V: int, dtype: str, threads: int = 256):
    """The prim_func for head dims K, V and q/k/v dtype; lengths and head counts are dynamic."""
    C = CHUNK
    num_tokens = T.dynamic("num_tokens")
    qk_heads = T.dynamic("qk_heads")
    v_heads = T.dynamic("v_heads")
    num_chunks = T.dynamic("num_chunks")

    @T.macro
    def row_sum(x, out, terms, row, dim):
        """terms[row, :] = the sum of the fragment x over ``dim`` (1: per row, 0: per column), through ``out``."""
        T.reduce_sum(x, out, dim=dim)
        for i in T.Parallel(C):
            terms[row, i] = out[i]

    @T.macro
    def load(tiles, bars, i):
        """TMA loads of (source, shared tile) pairs, landing on ``bars[i]`` (every thread arrives once)."""
        for src, dst in tiles:
            T.tma_copy(src, dst, barrier=bars[i])
        T.barrier_arrive(bars[i])

    @T.prim_func
    def chunk_gradients(
        q: T.Tensor((num_tokens, qk_heads, K), dtype),
        k: T.Tensor((num_tokens, qk_heads, K), dtype),
        v: T.Tensor((num_tokens, v_heads, V), dtype),
        do: T.Tensor((num_tokens, v_heads, V), dtype),
        dv: T.Tensor((num_tokens, v_heads, V), dtype),
        a0g: T.Tensor((num_tokens, v_heads, C), dtype),
        coef: T.Tensor((v_heads, num_tokens, COEFS), ACC),
        chunks: T.Tensor((num_chunks, 2), "int32"),        # (first token, valid rows) per chunk
        states: T.Tensor((num_chunks, v_heads, V, K), dtype),
        dstates: T.Tensor((num_chunks, v_heads, V, K), dtype),
        dq: T.Tensor((num_tokens, qk_heads, K), dtype),
        dk: T.Tensor((num_tokens, qk_heads, K), dtype),
        dbeta: T.Tensor((num_tokens, v_heads), ACC),
        dg: T.Tensor((num_tokens, v_heads), ACC),
        scale: T.float32,
        l2norm: T.int32,
    ):
        with T.Kernel(qk_heads, num_chunks, threads=threads) as (hk, c):
            group = v_heads // qk_heads
            t0 = chunks[c, 0]
            n = chunks[c, 1]

            q_s = T.alloc_shared((C, K), dtype)
            k_s = T.alloc_shared((C, K), dtype)
            v_s = T.alloc_shared((C, V), dtype)            # V, then U
            do_s = T.alloc_shared((C, V), dtype)
            dv_s = T.alloc_shared((C, V), dtype)
            vn_s = T.alloc_shared((C, V), dtype)           # V'
            dvn_s = T.alloc_shared((C, V), dtype)          # dV'
            st_s = T.alloc_shared((V, K), dtype)           # S^T
            dst_s = T.alloc_shared((V, K), dtype)          # dS'^T
            a0g_s = T.alloc_shared((2, C, C), dtype)       # value head r in a0g_s[r % 2]: r + 1's loads under r
            cf_s = T.alloc_shared((2, C, COEFS), ACC)
            x1_s = T.alloc_shared((C, C), dtype)           # Ag, P, Y A0g^T, H
            dp_s = T.alloc_shared((C, C), dtype)            # dP, then Y
            gam = T.alloc_shared((C,), ACC)                # gamma log2(e), held past the end
            bet = T.alloc_shared((C,), ACC)
            terms = T.alloc_shared((10, C), ACC)           # the row / column sums below, one row each
            sdot = T.alloc_shared((1,), ACC)               # <dS', S>
            dgam = T.alloc_shared((C,), ACC)
            # q / k; per value head: S^T and dS'^T; dO and dv; V; A0g and the row factors (two buffers)
            qk_full, s_full, d_full, v_full = 0, 1, 2, 3
            bars = T.alloc_barrier([threads] * 6)

            cv = T.alloc_fragment((C, V), ACC)
            qk = T.alloc_fragment((C, C), ACC)
            dpf = T.alloc_fragment((C, C), ACC)
            cc = T.alloc_fragment((C, C), ACC)
            dqf = T.alloc_fragment((C, K), ACC)
            dkf = T.alloc_fragment((C, K), ACC)
            ck = T.alloc_fragment((C, K), ACC)
            red = [T.alloc_fragment((C,), ACC) for _ in range(9)]
            sd = T.alloc_fragment((V // 4, K), ACC)
            sdr = T.alloc_fragment((V // 4,), ACC)
            sdt = T.alloc_fragment((1,), ACC)

            h0 = hk * group
            load([(q[t0:t0 + C, hk, 0:K], q_s), (k[t0:t0 + C, hk, 0:K], k_s)], bars, qk_full)
            load([(a0g[t0:t0 + C, h0, 0:C], a0g_s[0, :, :]), (coef[h0, t0:t0 + C, 0:COEFS], cf_s[0, :, :])], bars, 4)
            load([(states[c, h0, 0:V, 0:K], st_s), (dstates[c, h0, 0:V, 0:K], dst_s)], bars, s_full)
            load([(do[t0:t0 + C, h0, 0:V], do_s), (dv[t0:t0 + C, h0, 0:V], dv_s)], bars, d_full)
            load([(v[t0:t0 + C, h0, 0:V], v_s)], bars, v_full)

            # Q~ and K as the PyTorch path pads them (module note); the factors are the group's own
            T.barrier_wait(bars[qk_full], 0)
            T.barrier_wait(bars[4], 0)
            for i, j in T.Parallel(C, K):
                q_s[i, j] = q_s[i, j] * cf_s[0, i, 5] * T.Cast(ACC, i < n)
                k_s[i, j] = k_s[i, j] * cf_s[0, i, 6] * T.Cast(ACC, i < n)
            T.clear(dqf)
            T.clear(dkf)

            for r in T.serial(group):
                h = hk * group + r
                b = r % 2
                T.barrier_wait(bars[4 + b], (r // 2) % 2)
                for i in T.Parallel(C):
                    gam[i] = cf_s[b, T.min(i, n - 1), 4]
                    bet[i] = cf_s[b, i, 7] * T.Cast(ACC, i < n)
                for i, j in T.Parallel(C, C):
                    a0g_s[b, i, j] = T.Select(i < n, T.Cast(ACC, a0g_s[b, i, j]), T.Cast(ACC, i == j))
                for i, j in T.Parallel(C, C):
                    x1_s[i, j] = a0g_s[b, i, j] * bet[j]                                 # Ag
                if r + 1 < group:       # the other buffer was last read in iteration r - 1
                    T.sync_threads()
                    T.fence_proxy_async()
                    load([(a0g[t0:t0 + C, h + 1, 0:C], a0g_s[1 - b, :, :]),
                          (coef[h + 1, t0:t0 + C, 0:COEFS], cf_s[1 - b, :, :])], bars, 4 + 1 - b)
                T.barrier_wait(bars[v_full], r % 2)
                T.barrier_wait(bars[d_full], r % 2)
                for i, j in T.Parallel(C, V):
                    v_s[i, j] = v_s[i, j] * T.Cast(ACC, i < n)
                    do_s[i, j] = do_s[i, j] * T.Cast(ACC, i < n)
                    dv_s[i, j] = dv_s[i, j] * T.Cast(ACC, i < n)

                # <dS', S>, a quarter of the rows at a time
                T.barrier_wait(bars[s_full], r % 2)
                T.clear(sdr)
                for part in T.serial(4):
                    for i, j in T.Parallel(V // 4, K):
                        row = part * (V // 4) + i
                        sd[i, j] = T.Cast(ACC, st_s[row, j]) * T.Cast(ACC, dst_s[row, j])
                    T.reduce_sum(sd, sdr, dim=1, clear=False)
                T.reduce_sum(sdr, sdt, dim=0)
                sdot[0] = sdt[0]

                # U = V - diag(b) K S, V' = Ag U
                T.gemm(k_s, st_s, cv, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(C, V):
                    v_s[i, j] = v_s[i, j] - T.exp2(gam[i]) * cv[i, j]
                T.gemm(x1_s, v_s, cv, clear_accum=True)
                T.copy(cv, vn_s)

                # P = Gamma * (Q~ K^T); dV' = diag(b_C / b) K dS' + P^T dO
                T.gemm(q_s, k_s, qk, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(C, C):
                    x1_s[i, j] = qk[i, j] * T.Cast(ACC, i >= j) * T.exp2(T.min(gam[i] - gam[j], 0.0))
                T.gemm(k_s, dst_s, cv, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(C, V):
                    cv[i, j] = cv[i, j] * T.exp2(gam[C - 1] - gam[i])
                T.gemm(x1_s, do_s, cv, transpose_A=True)
                T.copy(cv, dvn_s)

                # dP = Gamma * (dO V'^T); its gate terms F = dP * (Q~ K^T)
                T.gemm(do_s, vn_s, dpf, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(C, C):
                    dpf[i, j] = dpf[i, j] * T.Cast(ACC, i >= j) * T.exp2(T.min(gam[i] - gam[j], 0.0))
                T.copy(dpf, dp_s)
                for i, j in T.Parallel(C, C):
                    cc[i, j] = dpf[i, j] * qk[i, j]
                row_sum(cc, red[0], terms, 0, 1)
                row_sum(cc, red[1], terms, 1, 0)

                # dQ~ += diag(b) dO S^T + dP K (the first term's gate term: rows of Q~ * it)
                T.gemm(do_s, st_s, ck, clear_accum=True)
                for i, j in T.Parallel(C, K):
                    ck[i, j] = ck[i, j] * T.exp2(gam[i])
                for i, j in T.Parallel(C, K):
                    dqf[i, j] = dqf[i, j] + ck[i, j]
                    ck[i, j] = ck[i, j] * q_s[i, j]
                row_sum(ck, red[2], terms, 2, 1)
                T.gemm(dp_s, k_s, dqf)

                # dK += diag(b_C / b) V' dS'^T - diag(b) dU S^T + dP^T Q~ (+ through Lg, below)
                T.gemm(vn_s, dst_s, ck, clear_accum=True)
                for i, j in T.Parallel(C, K):
                    ck[i, j] = ck[i, j] * T.exp2(gam[C - 1] - gam[i])
                for i, j in T.Parallel(C, K):
                    dkf[i, j] = dkf[i, j] + ck[i, j]
                    ck[i, j] = ck[i, j] * k_s[i, j]
                row_sum(ck, red[3], terms, 3, 1)                                 # the state's input
                T.gemm(dv_s, st_s, ck, clear_accum=True)
                for i, j in T.Parallel(C, K):
                    ck[i, j] = -ck[i, j] * T.exp2(gam[i])
                for i, j in T.Parallel(C, K):
                    dkf[i, j] = dkf[i, j] + ck[i, j]
                    ck[i, j] = ck[i, j] * k_s[i, j]
                row_sum(ck, red[4], terms, 4, 1)
                if r + 1 < group:       # S^T, dS'^T, dO and dv are read for the last time above
                    T.sync_threads()
                    T.fence_proxy_async()
                    load([(states[c, h + 1, 0:V, 0:K], st_s), (dstates[c, h + 1, 0:V, 0:K], dst_s)], bars, s_full)
                    load([(do[t0:t0 + C, h + 1, 0:V], do_s), (dv[t0:t0 + C, h + 1, 0:V], dv_s)], bars, d_full)
                T.gemm(dp_s, q_s, dkf, transpose_A=True)

                # dAg = dV' U^T: beta's direct term, and Y = StrictLower(dAg) diag(beta)
                T.gemm(dvn_s, v_s, cc, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(C, C):
                    dp_s[i, j] = cc[i, j] * bet[j] * T.Cast(ACC, i > j)
                for i, j in T.Parallel(C, C):
                    cc[i, j] = cc[i, j] * a0g_s[b, i, j]
                row_sum(cc, red[5], terms, 5, 0)
                if r + 1 < group:       # U is read for the last time above
                    T.sync_threads()
                    T.fence_proxy_async()
                    load([(v[t0:t0 + C, h + 1, 0:V], v_s)], bars, v_full)

                # dLg = -StrictLower(A0g^T (Y A0g^T))
                T.gemm(dp_s, a0g_s[b, :, :], cc, transpose_B=True, clear_accum=True)
                T.copy(cc, x1_s)
                T.gemm(a0g_s[b, :, :], x1_s, dpf, transpose_A=True, clear_accum=True)
                T.gemm(k_s, k_s, qk, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(C, C):
                    qk[i, j] = qk[i, j] * T.Cast(ACC, i > j) * T.exp2(T.min(gam[i] - gam[j], 0.0))  # Gamma * K K^T
                    dpf[i, j] = -dpf[i, j] * T.Cast(ACC, i > j)                                   # dLg
                for i, j in T.Parallel(C, C):
                    cc[i, j] = dpf[i, j] * qk[i, j]
                row_sum(cc, red[6], terms, 6, 1)                                 # beta's term through Lg
                for i, j in T.Parallel(C, C):
                    cc[i, j] = cc[i, j] * bet[i]                                    # dLg * Lg
                row_sum(cc, red[7], terms, 7, 1)
                row_sum(cc, red[8], terms, 8, 0)
                for i, j in T.Parallel(C, C):
                    x1_s[i, j] = dpf[i, j] * bet[i] * T.exp2(T.min(gam[i] - gam[j], 0.0))         # H
                T.gemm(x1_s, k_s, dkf)
                T.gemm(x1_s, k_s, dkf, transpose_A=True)

                # dgamma per row, the state's terms on the last row (b_C <dS', S> and the state input's
                # terms, whose b_C factors enter there), reverse-summed into dg
                for i in T.Parallel(C):
                    dgam[i] = (terms[0, i] - terms[1, i] + terms[2, i] - terms[3, i] + terms[4, i]
                               + terms[7, i] - terms[8, i])
                for i in T.Parallel(C):
                    if i == C - 1:
                        dgam[i] = dgam[i] + T.exp2(gam[C - 1]) * sdot[0] + sum([terms[3, r_] for r_ in range(C)],
                                                                               T.float32(0))
                for i in T.Parallel(C):
                    terms[9, i] = sum([T.Select(r_ >= i, dgam[r_], 0.0) for r_ in range(C)], T.float32(0))
                for i in T.Parallel(C):
                    if i < n:
                        dbeta[t0 + i, h] = terms[5, i] + terms[6, i]
                        dg[t0 + i, h] = terms[9, i]

            # through the l2-norm's backward where it is on (module note; sq and rk are the group's; the
            # row sums of a C x K fragment, as red[2] and red[3] were)
            T.clear(red[2])
            T.clear(red[3])
            if l2norm != 0:
                for i, j in T.Parallel(C, K):
                    ck[i, j] = dqf[i, j] * q_s[i, j]
                T.reduce_sum(ck, red[2], dim=1)
                for i, j in T.Parallel(C, K):
                    ck[i, j] = dkf[i, j] * k_s[i, j]
                T.reduce_sum(ck, red[3], dim=1)
            last = (group - 1) % 2
            inv = T.if_then_else(scale != 0.0, 1.0 / scale, 0.0)
            for i, j in T.Parallel(C, K):
                if i < n:
                    dq[t0 + i, hk, j] = T.if_then_else(l2norm != 0,
                                                       cf_s[last, i, 5] * (dqf[i, j] - q_s[i, j] * red[2][i] * inv * inv),
                                                       dqf[i, j] * scale)
                    dk[t0 + i, hk, j] = T.if_then_else(
                        l2norm != 0, cf_s[last, i, 6] * (dkf[i, j] - k_s[i, j] * red[3][i]), dkf[i, j])

    return chunk_gradients
