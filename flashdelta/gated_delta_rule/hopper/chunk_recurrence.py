"""Sequential forward kernel: walks the chunks of one sequence, state in registers.

One CTA per (sequence, value head, V tile of width BV). The state stays in fp32 registers of the
consumer warpgroups (transposed, see below), with a q/k-dtype copy in registers as a GEMM operand.
Per chunk, with Ag and the row factors c0..c6 from ``chunk_matrices`` (DESIGN section 2):

    W  = V - c0 * (K S)          V' = Ag W
    P  = Lower(c5 * (Q K^T) * c6^T * 2^(c4 - c4^T))
    O  = c1 * (Q S) + P V'
    S  = c3 * S + K^T (c2 * V')

The consumers hold the state transposed (S^T, BV x K) and compute everything transposed:
W^T = V^T - (K S)^T diag(c0), V'^T = W^T Ag^T, S^T = c3 S^T + (diag(c2) V')^T K and
O^T = (Q S)^T diag(c1) + V'^T P^T. Every one of these GEMMs takes its A operand from registers
(wgmma RS: S^T for K S and Q S, W^T, V'^T), so neither the state nor V' goes through shared memory;
only P, which depends on the chunk's tiles alone, is formed elsewhere (see below).

Chunks are loaded whole (TMA; rows past the sequence's end belong to the next sequence or lie past T
and come back as zeros). Rows past the end are neutralised by zeroing their row factors: their V'
rows never reach a valid output (Ag and P are lower triangular) or the state (c2 = 0), and their
outputs are not stored. The zeroing is a product with the row mask, not a select: a select's load
became a branch per element, three times slower (the factors are finite either way). Lengths are
dynamic: sequences come from a table of (first token, length, row of ht for the final state, -1 for
none).

Context parallelism's warm-up (``warmup=True``) runs the state part only: no q, P or output. Its grid
is doubled along V: the first half computes R (the state reached from zero over a token span), the
second half starts from identity columns and treats v as zero, so its final "state" is the span's
transition M. Spans are per (segment, value head): (R first token, R length, M first token, M length),
so the truncation test can shorten R to a window and skip M (length 0) where the gate allows it. R is
written to ``ht[n]``, M to ``ht[num_seqs + n]``.

The backward's state recompute (``save_states=True``) is the same state-only walk from h0 over whole
sequences; it stores the q/k-dtype copy of S^T that the GEMMs read as each chunk begins (what the
backward's per-chunk kernel needs, in the precision its GEMMs take it).

Warp specialisation is written out (not TileLang's automatic pipelining) so the GEMMs can run
asynchronously around the state's dependency chain. An auxiliary warpgroup streams each chunk's tiles
into three stages (one ``full`` mbarrier per stage, TMA transaction counts; one ``empty`` barrier
released when every reader is done with the stage) and forms each chunk's P into one of two buffers
(``p_full`` / ``p_free``), a chunk ahead of the consumers. With the output on the consumers the step
is short enough that two stages (loads one step ahead) left them waiting for tiles: 3.8 against
2.7 µs a chunk at 4x8192 h16/32 (H100); the third fits in the shared memory the hand-overs freed.
The consumers store O^T transposed into o_s, and o leaves by TMA store. An earlier design formed
the whole output (Q S, P, P V') on the auxiliary warpgroup from copies of S^T and V'^T in shared
memory; its hand-overs paced the walk (without the output, the chunk step was 2.6x shorter). One
warpgroup both loads and forms P because a fourth (a producer of its own) would cap registers at
128 a thread, and the consumers would spill.
"""
import tilelang.language as T
from tilelang.layout import make_swizzled_layout

from .chunk_matrices import COEFS

CHUNK = 64
ACC = "float32"
AUX_THREADS = 128                       # one warpgroup: streams the tiles and forms each chunk's P


def chunk_recurrence_kernel(K: int, V: int, BV: int, dtype: str, threads: int = 256, warmup: bool = False,
                            stages: int = 3, save_states: bool = False, output: bool = False):
    """The prim_func for head dims K, V, V tile BV and q/k/v dtype; lengths and head counts are dynamic.

    ``threads``: consumer threads (BV // 64 warpgroups); the CTA has ``AUX_THREADS`` more.
    ``warmup``: the state-only variant (q, o and h0 are not read or written; ``seqs`` holds spans).
    ``stages``: buffers of the streamed tiles; chunk c + stages - 1 loads while the consumers work on c.
    ``save_states``: the backward's state recompute: state only, from h0, the state entering every chunk
    into ``states`` (q's dtype, V-major: S^T); the third column of ``seqs`` is the sequence's first chunk.
    With ``output`` as well: the forward of a call that will be differentiated, o and the final state as
    usual and those states besides (so its backward recomputes none); ``seqs`` has the first chunk in a
    fourth column.
    """
    C = CHUNK
    num_tokens = T.dynamic("num_tokens")
    qk_heads = T.dynamic("qk_heads")
    v_heads = T.dynamic("v_heads")
    num_seqs = T.dynamic("num_seqs")
    h0_seqs = T.dynamic("h0_seqs")          # num_seqs, or 1 for the unused placeholder
    ht_seqs = T.dynamic("ht_seqs")
    state_chunks = T.dynamic("state_chunks")   # chunks of all sequences, or 1 for the unused placeholder
    state_only = warmup or (save_states and not output)
    table = (num_seqs, v_heads, 4) if warmup else (num_seqs, 4) if save_states and output else (num_seqs, 3)
    halves = 2 if warmup else 1             # warm-up: R CTAs, then M CTAs
    ROWS = T.GemmWarpPolicy.FullRow         # the consumers' GEMMs: each warpgroup owns 64 of the BV rows
    readers = threads if state_only else threads + AUX_THREADS          # threads that read each stage
    # Registers: the consumers take what the auxiliary warpgroup gives back. setmaxnreg.inc waits until
    # the CTA's pool (its launch allocation, not the SM's 64K) has them: asking for more hangs.
    launch_regs = min(240, 65536 // (threads + AUX_THREADS) // 8 * 8)
    aux_regs = 24 if state_only else 72
    consumer_regs = min(240, (launch_regs * (threads + AUX_THREADS) - aux_regs * AUX_THREADS) // threads // 8 * 8)

    @T.macro
    def load_chunk(q, k, v, ag, coef, q_s, k_s, v_s, ag_s, cf_s, full, empty, c, start, hk, h, v0):
        """Chunk c's tiles into stage c % stages, once every reader is done with chunk c - stages."""
        st = c % stages
        t0 = start + c * C
        T.barrier_wait(empty[st], (c // stages + 1) % 2)
        if not state_only:
            T.tma_copy(q[t0:t0 + C, hk, 0:K], q_s[st, :, :], barrier=full[st])
        T.tma_copy(k[t0:t0 + C, hk, 0:K], k_s[st, :, :], barrier=full[st])
        T.tma_copy(v[t0:t0 + C, h, v0:v0 + BV], v_s[st, :, :], barrier=full[st])
        T.tma_copy(ag[t0:t0 + C, h, 0:C], ag_s[st, :, :], barrier=full[st])
        T.tma_copy(coef[h, t0:t0 + C, 0:COEFS], cf_s[st, :, :], barrier=full[st])
        T.barrier_arrive(full[st])

    @T.prim_func
    def chunk_recurrence(
        q: T.Tensor((num_tokens, qk_heads, K), dtype),
        k: T.Tensor((num_tokens, qk_heads, K), dtype),
        v: T.Tensor((num_tokens, v_heads, V), dtype),
        ag: T.Tensor((num_tokens, v_heads, C), dtype),
        coef: T.Tensor((v_heads, num_tokens, COEFS), ACC),
        seqs: T.Tensor(table, "int32"),        # (first token, length, ht row or -1) per sequence; warm-up: spans
        h0: T.Tensor((h0_seqs, v_heads, K * V), ACC),
        o: T.Tensor((num_tokens, v_heads, V), dtype),
        ht: T.Tensor((ht_seqs, v_heads, K * V), ACC),
        states: T.Tensor((state_chunks, v_heads, V, K), dtype),
        has_h0: T.int32,
        store_ht: T.int32,
        v_first: T.int32,
    ):
        # a 3-D grid (the caller launches at most 65535 sequences at a time): a 1-D grid decoded with
        # divisions by the dynamic head count measured 8-35% slower (divisions redone in the loop)
        with T.Kernel((V // BV) * halves, v_heads, num_seqs, threads=threads + AUX_THREADS) as (bt, h, n):
            T.pdl_sync()        # launched early (PDL): the previous kernel's writes are visible from here
            hk = h // (v_heads // qk_heads)
            bv = bt % (V // BV)
            is_m = bt // (V // BV)                         # warm-up: 1 = this CTA computes M columns
            v0 = bv * BV
            if warmup:
                start = seqs[n, h, 2 * is_m]
                length = seqs[n, h, 2 * is_m + 1]
                ht_row = n + is_m * num_seqs
            else:
                start = seqs[n, 0]
                length = seqs[n, 1]
                ht_row = seqs[n, 2]
            first_chunk = seqs[n, 3] if save_states and output else ht_row

            # the stages of the streamed tiles, two buffers of P (the auxiliary warpgroup forms chunk
            # d + 1's while the consumers use chunk d's), the output tile
            if not state_only:
                q_s = T.alloc_shared((stages, C, K), dtype)
                p_s = T.alloc_shared((2, C, C), dtype)
                o_s = T.alloc_shared((C, BV), dtype)
            k_s = T.alloc_shared((stages, C, K), dtype)
            if state_only:
                q_s = k_s                                      # not loaded: the state-only walk reads no q
            v_s = T.alloc_shared((stages, C, BV), dtype)
            ag_s = T.alloc_shared((stages, C, C), dtype)
            cf_s = T.alloc_shared((stages, C, COEFS), ACC)
            full = T.alloc_barrier([AUX_THREADS] * stages)         # the auxiliary threads' arrivals + TMA bytes
            empty = T.alloc_barrier([readers] * stages)    # every reading thread, after the stage's last use
            if not state_only:
                p_full = T.alloc_barrier([AUX_THREADS, AUX_THREADS])   # P of the chunk is in p_s
                p_free = T.alloc_barrier([threads, threads])           # its P V' is done
            # v_s and o_s are accessed row-wise by the accumulator fragments (8 rows of BV * 2 bytes per
            # warp access): unswizzled, every row of a warp falls on the same banks (8-way conflicts)
            if state_only:
                T.annotate_layout({v_s: make_swizzled_layout(v_s)})
            else:
                T.annotate_layout({v_s: make_swizzled_layout(v_s), o_s: make_swizzled_layout(o_s)})

            # the state transposed, S^T (BV x K): every GEMM of its chain then takes its A operand from
            # registers (S^T, W^T, V'^T) and nothing on the chain goes through shared memory
            S = T.alloc_fragment((BV, K), ACC)
            sa = T.alloc_fragment((BV, K), dtype)           # S^T as the A operand of K S and Q S
            acc = T.alloc_fragment((BV, C), ACC)
            accb = T.alloc_fragment((BV, C), dtype)
            if not state_only:
                ot = T.alloc_fragment((BV, C), ACC)            # O^T of the chunk
                vb = T.alloc_fragment((BV, C), dtype)          # V'^T, the A operand of P V'
                qk = T.alloc_fragment((C, C), ACC)             # auxiliary warpgroup

            tx = T.get_thread_binding()
            if tx >= threads:
                # The auxiliary warpgroup: per chunk d, P = Lower(c5 (Q K^T) c6^T 2^(c4 - c4^T)) into
                # p_s[d % 2] (a straight-line epilogue: a mask product, the exponent clamped to stay
                # finite above the diagonal; staged by one fragment copy, stmatrix), then the loads of
                # chunk d + stages - 1 into the stage chunk d - 1 leaves. Chunk d + 1 has landed before
                # the consumers finish chunk d, so its P is ready before they need it.
                T.set_max_nreg(aux_regs, 0)
                num_chunks = T.ceildiv(length, C)
                for c in T.serial(T.min(num_chunks, stages - 1)):
                    load_chunk(q, k, v, ag, coef, q_s, k_s, v_s, ag_s, cf_s, full, empty, c, start, hk, h, v0)
                for d in T.serial(num_chunks):
                    st = d % stages
                    ps = d % 2
                    if not state_only:
                        T.barrier_wait(full[st], (d // stages) % 2)
                        T.gemm(q_s[st, :, :], k_s[st, :, :], qk, transpose_B=True, clear_accum=True)
                        for i, j in T.Parallel(C, C):
                            qk[i, j] = qk[i, j] * cf_s[st, i, 5] * cf_s[st, j, 6] * T.Cast(ACC, i >= j) * T.exp2(
                                T.min(cf_s[st, i, 4] - cf_s[st, j, 4], 0.0))
                        T.barrier_arrive(empty[st])
                        T.barrier_wait(p_free[ps], (d // 2 + 1) % 2)     # P V' of chunk d - 2 is done
                        T.copy(qk, p_s[ps, :, :])
                        T.fence_proxy_async()
                        T.barrier_arrive(p_full[ps])
                    if d + stages - 1 < num_chunks:
                        load_chunk(q, k, v, ag, coef, q_s, k_s, v_s, ag_s, cf_s, full, empty, d + stages - 1, start,
                                   hk, h, v0)
            elif tx < threads:
                T.set_max_nreg(consumer_regs, 1)
                if warmup:
                    for i, j in T.Parallel(BV, K):
                        S[i, j] = T.if_then_else(j == v0 + i, T.cast(is_m, ACC), 0.0)
                elif has_h0 != 0:
                    for i, j in T.Parallel(BV, K):
                        S[i, j] = T.if_then_else(v_first != 0, h0[n, h, (v0 + i) * K + j], h0[n, h, j * V + v0 + i])
                else:
                    T.clear(S)
                T.copy(S, sa)

                v_keep = T.cast(1 - is_m, ACC)
                for c in T.serial(T.ceildiv(length, C)):
                    st = c % stages
                    ps = c % 2
                    rows = length - c * C                  # valid tokens of this chunk (> 64 = all)
                    if save_states:                        # S^T entering chunk c
                        for i, j in T.Parallel(BV, K):
                            states[first_chunk + c, h, v0 + i, j] = sa[i, j]
                    T.barrier_wait(full[st], (c // stages) % 2)
                    # (K S)^T and, off the chain, (Q S)^T: both take S^T from registers
                    T.wgmma_gemm(sa, k_s[st, :, :], acc, transpose_B=True, clear_accum=True, policy=ROWS)
                    if not state_only:
                        T.wgmma_gemm(sa, q_s[st, :, :], ot, transpose_B=True, clear_accum=True, policy=ROWS)
                        T.wait_wgmma(1)
                    else:
                        T.wait_wgmma(0)
                    # W^T = v_keep V^T - (K S)^T diag(c0): columns are tokens
                    for i, j in T.Parallel(BV, C):
                        accb[i, j] = v_keep * v_s[st, j, i] - cf_s[st, j, 0] * T.Cast(ACC, j < rows) * acc[i, j]
                    # V'^T = W^T Ag^T
                    T.wgmma_gemm(accb, ag_s[st, :, :], acc, transpose_B=True, clear_accum=True, policy=ROWS)
                    for i, j in T.Parallel(BV, K):                 # under Ag W
                        S[i, j] = S[i, j] * cf_s[st, 0, 3]
                    T.wait_wgmma(0)
                    for i, j in T.Parallel(BV, C):
                        accb[i, j] = acc[i, j] * cf_s[st, j, 2] * T.Cast(ACC, j < rows)
                    # S^T = c3 S^T + (c2 V')^T K
                    T.wgmma_gemm(accb, k_s[st, :, :], S, policy=ROWS)
                    if not state_only:
                        # O^T = (Q S)^T diag(c1) + V'^T P^T
                        T.copy(acc, vb)
                        for i, j in T.Parallel(BV, C):
                            ot[i, j] = ot[i, j] * cf_s[st, j, 1]
                        T.barrier_wait(p_full[ps], (c // 2) % 2)
                        T.wgmma_gemm(vb, p_s[ps, :, :], ot, transpose_B=True, policy=ROWS)
                    T.wait_wgmma(0)
                    T.barrier_arrive(empty[st])
                    T.copy(S, sa)
                    if not state_only:
                        T.barrier_arrive(p_free[ps])
                        T.tma_store_wait()                      # the previous chunk's store has read o_s
                        for i, j in T.Parallel(BV, C):
                            o_s[j, i] = ot[i, j]
                        T.fence_proxy_async()                   # o_s is read by the TMA store below
                        t0 = start + c * C
                        if rows >= C:
                            T.tma_copy(o_s, o[t0:t0 + C, h, v0:v0 + BV])
                        else:                                   # the last chunk stops inside the tile
                            for i, j in T.Parallel(C, BV):
                                if i < rows:
                                    o[t0 + i, h, v0 + j] = o_s[i, j]
                if not state_only:
                    T.tma_store_wait()                          # o_s must outlive the last store

                if store_ht != 0:
                    if ht_row >= 0:
                        for i, j in T.Parallel(BV, K):
                            if v_first != 0:
                                ht[ht_row, h, (v0 + i) * K + j] = S[i, j]
                            else:
                                ht[ht_row, h, j * V + v0 + i] = S[i, j]

    return chunk_recurrence
