"""Per-chunk preparation kernel: everything about a 64-token chunk that does not depend on the state.

One CTA per (chunk, ``heads_per_cta`` value heads of one GVA group), all chunks of all sequences at
once: k is loaded and K K^T formed once, then the CTA loops over its value heads (only beta and g
differ). The whole group per CTA unless the grid would leave SMs idle (``planner.prep_heads_per_cta``).
For chunk rows i, j (valid rows only, DESIGN section 2) it writes:

- ``ag[t, h, :]``  = row i of ``Ag = (Gamma * A0) diag(beta)`` with ``A0 = (I + StrictLower(diag(beta) K K^T))^-1``
- ``a0g[t, h, :]`` = row i of ``Gamma * A0`` (FLA's gated inverse), only where ``store_a0g`` (the backward);
- ``coef[h, t, :]`` = (e^g_i rk_i, e^g_i sq_i, e^(g_C - g_i) rk_i, e^g_C, g_i log2(e), sq_i, rk_i, beta_i), g = gate
  cumsum in the chunk, g_C that of its last valid token, rk / rq the in-kernel l2-norm factors (1 when
  disabled), sq = scale rq; head-major, so a chunk's factors are one contiguous 2 KB block;
- ``stats[c, h, :]`` = (g_C, tokens with beta |k|^2 outside [0, 2]) per chunk, for context parallelism.

``P = scale Gamma * Lower(Q K^T)`` is not formed here: the sequential kernel builds it from Q K^T and
the last three factors (a round trip of 128 bytes per token and head saved). Folding the l2-norm into
row factors lets it read raw q / k and stay the same with or without it. q is read here only for its
l2-norm, row sums straight from global memory. A0 is inverted by blocks. With Kd / Ko the parts of
Kn Kn^T in / below the four 16 x 16 diagonal blocks (Kd without its diagonal), fp32 substitution gives
the diagonal blocks' inverses D = (I + diag(beta) StrictLower(Kd))^-1, and with M = D diag(beta) Ko
(M^4 = 0) ``A0 = (I + M)^-1 D = D - M D + M^2 D - M^3 D``: four wgmma GEMMs, written as X Y^T with X,
Y row-major so that every result is used as it comes out of the accumulator, never transposed (Kn Kn^T
is symmetric: Ko^T is a mask of it):

    M = (D diag(beta)) (Ko^T)^T,  V1^T = D^T - D^T M^T,  W = D^T - V1^T M^T = V2^T,  A0 = D - M W^T,

and Ag = (Gamma * A0) diag(beta) in the epilogue (beta applied last, so the backward's ``Gamma * A0``
comes out of the same accumulator).

Their operands are fp16: the same 10-bit mantissa as tf32 (and rounded, where tf32 operands are
truncated: 1e-4 relative error in Ag against 3e-4, both far below Ag's bf16 rounding), half the shared
memory traffic, and V1^T goes from the accumulator straight into the next GEMM's registers. fp16's range
needs |k|^2 < 65504 without the in-kernel l2-norm (every key with norm below 255); a larger key overflows
to inf, and such a key breaks the beta |k|^2 <= 2 condition the delta rule needs unless beta < 3e-5.

Everything that depends only on k (Ko^T, Kd) is formed once per CTA; a value head costs the
substitution, the four GEMMs and the output epilogue. Shared memory (34 KB) holds three 64 x 64 fp16
operands: ``ko`` holds Kn Kn^T (only its blocks above the diagonal, Ko^T, reach unmasked results of the
first GEMM); ``x1`` holds D diag(beta), then M; ``x2`` holds D^T, then W. The diagonal blocks need no
copies: V1^T and D^T share them, and those of D are those of W^T. Separate, zeroed-once
buffers for D diag(beta) and D^T (no per-head zeroing) measured slower: the extra live registers spill
at the 128 that four CTAs per SM allow, and three CTAs per SM are slower still.
"""

import tilelang.language as T

CHUNK = 64
ACC = "float32"
MERGE = "float16"                       # operands of the block merge's GEMMs (see the module note)
COEFS = 8                               # row factors per token and value head (see coef above)
LOG2E = 1.4426950408889634


def chunk_matrices_kernel(K: int, dtype: str):
    """The prim_func for head dim K and q/k dtype (``"bfloat16"`` / ``"float16"``); lengths are dynamic."""
    C = CHUNK
    B = 16                                   # diagonal block size of the triangular inverse
    num_tokens = T.dynamic("num_tokens")
    qk_heads = T.dynamic("qk_heads")
    v_heads = T.dynamic("v_heads")
    num_chunks = T.dynamic("num_chunks")
    a0g_tokens = T.dynamic("a0g_tokens")

    @T.prim_func
    def chunk_matrices(
        q: T.Tensor((num_tokens, qk_heads, K), dtype),
        k: T.Tensor((num_tokens, qk_heads, K), dtype),
        g: T.Tensor((num_tokens, v_heads), ACC),
        beta: T.Tensor((num_tokens, v_heads), ACC),
        chunks: T.Tensor((num_chunks, 2), "int32"),        # (first token, valid rows) per chunk
        ag: T.Tensor((num_tokens, v_heads, C), dtype),
        coef: T.Tensor((v_heads, num_tokens, COEFS), ACC),
        stats: T.Tensor((num_chunks, v_heads, 2), ACC),
        a0g: T.Tensor((a0g_tokens, v_heads, C), dtype),     # num_tokens, or 1 for the unused placeholder
        scale: T.float32,
        l2norm: T.int32,
        heads_per_cta: T.int32,                            # divides the GVA group
        store_a0g: T.int32,
    ):
        # heads fastest: neighbouring CTAs read neighbouring q / k rows; no index is decoded by a
        # division (a dynamic divisor costs a chain of instructions before k's load can be issued).
        # At most 65535 chunks a launch (``forward.prepare`` launches longer tables in pieces).
        group = v_heads // qk_heads
        with T.Kernel(group // heads_per_cta, qk_heads, num_chunks, threads=128) as (part, hk, c):
            T.pdl_sync()        # launched early (PDL): the previous kernel's writes are visible from here
            t0 = chunks[c, 0]
            n = chunks[c, 1]
            tx = T.get_thread_binding()
            # head numbers held in registers: as expressions, their divisions were redone at every store
            heads = T.alloc_local((2,), "int32")    # this CTA's first value head, its last
            heads[0] = hk * group + part * heads_per_cta
            heads[1] = heads[0] + heads_per_cta - 1
            T.annotate_min_blocks_per_sm(4)         # 34 KB of shared memory; 4 CTAs per SM at <= 128 registers

            k_s = T.alloc_shared((C, K), dtype)
            loaded = T.alloc_barrier(arrive_count=128)
            gam = T.alloc_shared((C,), ACC)
            bet = T.alloc_shared((C,), ACC)
            rk = T.alloc_shared((C,), ACC)
            sq = T.alloc_shared((C,), ACC)          # scale * rq
            qhalf = T.alloc_shared((2, C), ACC)     # |q|^2 over each half of a row
            k2 = T.alloc_shared((C,), ACC)          # |k|^2 after the l2-norm (for the CP statistics)
            kd = T.alloc_shared((C, B), ACC)        # Kd, the four blocks stacked (rows read by the substitution)
            ko_s = T.alloc_shared((C, C), MERGE)    # Kn Kn^T (symmetric: Ko^T above the block diagonal)
            x1_s = T.alloc_shared((C, C), MERGE)    # D diag(beta), then M
            x2_s = T.alloc_shared((C, C), MERGE)    # D^T, then W
            out_s = T.view(x1_s, dtype=dtype)       # Ag staged over M once the last GEMM has read it

            qn = T.alloc_local((1,), ACC)
            qv = T.alloc_local((K // 2,), dtype)    # half a row of q
            kk = T.alloc_fragment((C, C), ACC)
            acc = T.alloc_fragment((C, C), ACC)     # all wgmma accumulators: one layout, mixed freely
            v1 = T.alloc_fragment((C, C), MERGE)    # V1^T, the third GEMM's A operand, from registers
            col = T.alloc_local((B,), ACC)
            factors = T.alloc_local((COEFS,), ACC)
            broken = T.alloc_fragment((C, 2), ACC)  # per row: (g_C on the last valid row, norm condition broken)
            chunk_stat = T.alloc_fragment((2,), ACC)
            gb = T.alloc_local((1,), ACC)           # this thread's g (threads < 64) or beta of the next head

            # Rows past the chunk's end belong to the next sequence (or lie past T: TMA fills zeros);
            # beta is 0 there and those output rows are not stored.
            T.tma_copy(k[t0:t0 + C, hk, 0:K], k_s, barrier=loaded)
            T.barrier_arrive(loaded)
            # the first head's g and beta, under k's load
            row = tx % C
            if row < n:
                gb[0] = T.if_then_else(tx < C, g[t0 + row, heads[0]], beta[t0 + row, heads[0]])
            else:
                gb[0] = 0.0
            # q's norms straight from global memory (q has no other use here), under k's load: two threads
            # a row, a serial sum each (a (C, K) fragment took 64 registers and made the kernel spill); rows
            # past the chunk repeat its last row (in bounds; their factors are never stored)
            if l2norm != 0:
                half = tx // C
                for j in T.unroll(K // 16):             # all eight 16-byte loads in flight at once
                    for e in T.vectorized(8):
                        qv[j * 8 + e] = q[t0 + T.min(row, n - 1), hk, half * (K // 2) + j * 8 + e]
                qn[0] = 0.0
                for e in T.unroll(K // 2):
                    qn[0] += T.Cast(ACC, qv[e]) * T.Cast(ACC, qv[e])
                qhalf[half, row] = qn[0]
                for i in T.Parallel(C):
                    sq[i] = T.rsqrt(qhalf[0, i] + qhalf[1, i] + 1e-6) * scale
            else:
                for i in T.Parallel(C):
                    sq[i] = scale
            T.barrier_wait(loaded, 0)

            # k's l2-norm factors from the diagonal of K K^T
            T.gemm(k_s, k_s, kk, transpose_B=True, clear_accum=True)
            for i, j in T.Parallel(C, C):
                if i == j:
                    rk[i] = T.if_then_else(l2norm != 0, T.rsqrt(kk[i, j] + 1e-6), 1.0)
            # the head-independent parts
            for i, j in T.Parallel(C, C):
                kk[i, j] = kk[i, j] * rk[i] * rk[j]
            for i, j in T.Parallel(C, C):
                if i == j:
                    k2[i] = kk[i, j]
            for i, j in T.Parallel(C, C):
                ko_s[i, j] = kk[i, j]
                if i // B == j // B:
                    kd[i, j % B] = T.if_then_else(i != j, kk[i, j], 0.0)

            # g and beta of a head are loaded one head ahead, their latency hidden behind the previous head
            for r in T.serial(heads_per_cta):
                h = heads[0] + r
                if tx < C:
                    gam[row] = gb[0]
                else:
                    bet[row] = gb[0]
                if row < n:
                    gb[0] = T.if_then_else(tx < C, g[t0 + row, T.min(h + 1, heads[1])],
                                           beta[t0 + row, T.min(h + 1, heads[1])])
                T.cumsum(gam, dim=0)
                for i, j in T.Parallel(C, C):
                    if i // B != j // B:
                        x1_s[i, j] = 0.0
                        x2_s[i, j] = 0.0

                # D by substitution, unrolled at trace time, the vector in registers; each thread writes a
                # column of its matrix (consecutive threads, consecutive addresses) and reads Kd by rows.
                # Threads 0-63: column e of block bk, x_i = [i == e] - beta_i sum_{j<i} Kd_ij x_j -> D diag(beta).
                # Threads 64-127: row e of block bk, x_j = [j == e] - sum_{i>j} x_i beta_i Kd_ji -> D^T.
                bk = (tx % C) // B
                e = tx % B
                if tx < C:
                    for i in list(range(B)):
                        col[i] = T.if_then_else(e == i, 1.0, 0.0) - bet[bk * B + i] * sum(
                            [kd[bk * B + i, j] * col[j] for j in range(i)], T.float32(0))
                    for i in list(range(B)):
                        x1_s[bk * B + i, bk * B + e] = col[i] * bet[bk * B + e]
                else:
                    for j in list(reversed(range(B))):
                        col[j] = T.if_then_else(e == j, 1.0, 0.0) - sum(
                            [col[i] * kd[bk * B + j, i] for i in range(j + 1, B)], T.float32(0))
                        x2_s[bk * B + j, bk * B + e] = col[j]
                        col[j] = col[j] * bet[bk * B + j]

                # Epilogues update the accumulator first and store it in a second loop: a loop that reads
                # shared memory and writes it gets a barrier in every iteration. Select (always in bounds),
                # not if_then_else: a branch per element costs more than the load.
                T.gemm(x1_s, ko_s, acc, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(C, C):
                    x1_s[i, j] = T.Select(i // B > j // B, acc[i, j], 0.0)         # M
                T.gemm(x2_s, x1_s, acc, transpose_B=True, clear_accum=True)
                # x2 holds D^T here, zero outside the diagonal blocks: no mask
                for i, j in T.Parallel(C, C):
                    acc[i, j] = T.Cast(ACC, x2_s[i, j]) - acc[i, j]
                T.copy(acc, v1)                                                     # V1^T
                T.gemm(v1, x1_s, acc, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(C, C):
                    acc[i, j] = T.Cast(ACC, x2_s[i, j]) - acc[i, j]
                T.copy(acc, x2_s)                                                   # W
                T.gemm(x1_s, x2_s, acc, transpose_B=True, clear_accum=True)

                # A0: D (= W^T) on the diagonal blocks, -M W^T below; both are exactly 0 above the
                # diagonal, so Gamma needs no mask, only a finite exponent.
                for i, j in T.Parallel(C, C):
                    acc[i, j] = (T.Select(i // B == j // B, T.Cast(ACC, x2_s[j, i]), 0.0) - acc[i, j]) * T.exp(
                        (gam[i] - gam[j]) * T.Cast(ACC, i >= j))
                if store_a0g != 0:
                    for i, j in T.Parallel(C, C):
                        if i < n:
                            a0g[t0 + i, h, j] = acc[i, j]
                for i, j in T.Parallel(C, C):
                    out_s[i, j] = acc[i, j] * bet[j]
                if n >= C:                                  # a full chunk: one TMA store
                    T.copy(out_s, ag[t0:t0 + C, h, 0:C])
                else:
                    for i, j in T.Parallel(C, C):
                        if i < n:
                            ag[t0 + i, h, j] = out_s[i, j]
                # the row factors, one thread per row, two 16-byte stores each
                if tx < n:
                    last = gam[T.max(n, 1) - 1]
                    factors[0] = T.exp(gam[tx]) * rk[tx]
                    factors[1] = T.exp(gam[tx]) * sq[tx]
                    factors[2] = T.exp(last - gam[tx]) * rk[tx]
                    factors[3] = T.exp(last)
                    factors[4] = gam[tx] * LOG2E
                    factors[5] = sq[tx]
                    factors[6] = rk[tx]
                    factors[7] = bet[tx]
                    for j in T.vectorized(COEFS):
                        coef[h, t0 + tx, j] = factors[j]
                # context parallelism's truncation test (segments.chunk_stats): the chunk's summed g, and
                # how many of its tokens break 0 <= beta |k|^2 <= 2
                for i, j in T.Parallel(C, 2):
                    broken[i, j] = T.if_then_else(
                        j == 0, T.Select(i == n - 1, gam[i], 0.0),
                        T.Select(i < n and (bet[i] * k2[i] < 0.0 or bet[i] * k2[i] > 2.0), 1.0, 0.0))
                T.reduce_sum(broken, chunk_stat, dim=0)
                for j in T.Parallel(2):
                    stats[c, h, j] = chunk_stat[j]

    return chunk_matrices
