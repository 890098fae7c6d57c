"""Decode kernel: the recurrence token by token, the state read from its pool slot and written back once.

One CTA per (V tile of width BV, value head, sequence). Per token t of the sequence, with the state
tile held transposed (S^T, BV x K, fp32 registers) and scalar gates::

    S   = exp(g_t) S
    e   = beta_t (v_t - S^T k_t)              (BV values: a row reduction over K)
    S   = S + k_t e^T
    o_t = scale S^T q_t                       (a second row reduction)

With ``use_qk_l2norm_in_kernel`` the norms of k_t and q_t are two more row reductions and enter as
scalars (k_t / |k_t| is never formed): e = beta (v - r_k S^T k), S += r_k k e^T, o = scale r_q S^T q.
With ``gate_in_kernel`` g is the raw projection, activated here as FLA and Qwen3-Next do
(g = -exp(A_log) softplus(g + dt_bias)), and with ``beta_scale`` > 0 beta is (beta = beta_scale *
sigmoid(beta)): in a decode step separate elementwise launches would cost more than the activation.

Decode moves the state and little else: at K = V = 128 a step reads and writes 64 KB of fp32 state
per value head against 0.75 KB of q, k, v. So the kernel is built to move the pool at copy speed:

- the state enters and leaves through shared memory in the pool's own layout and dtype, by tile
  copies (16-byte vector accesses, rows of the tile contiguous in memory), so both K-major and
  V-major pools (vLLM's and SGLang's) are read and written coalesced; the transposition to S^T
  happens between shared memory and registers, where it costs no bandwidth. The pool's row stride
  is a runtime value, so the kernel is told (``T.assume``) that rows are 16-byte aligned, which the
  host checks (``decode.pool_unsupported``): without it TileLang could not prove the alignment and
  loaded the tile 4 bytes at a time (68-75% of the copy rate on an H100);
- between the two, nothing touches memory but q, k, v (one row each per token, staged in shared
  memory and broadcast to every thread) and o;
- it is one kernel with no host work beyond its launch, so a CUDA graph of a decode step is this
  launch and nothing else.

BV = 32 with 128 threads keeps the tile at 16 KB of registers (32 a thread), so several CTAs share an
SM and their loads overlap; a batch of 64 sequences with 32 value heads is 8192 CTAs. BV = 8 on one
warp (``decode.V_TILES``) is FLA's tile: 4 KB per CTA, four times the CTAs, more of them in flight.

Rows: ``first_rows[n]`` is the slot sequence n starts from (-1 or out of range: zeros). With
``per_step``, the state after token t goes to slot ``step_rows[n, t]``; otherwise the final state goes
to ``out_rows[n]`` (-1 or out of range: not stored). Reading ``pool_in`` and writing ``pool_out``
(the same tensor for a pool updated in place) is safe because each CTA reads its tile before it
writes, and no two sequences write one slot. The pool's rows may be strided (``row_stride``
elements apart); each row is contiguous.
"""
import tilelang.language as T

ACC = "float32"
EPS = 1e-6                              # FLA's l2norm epsilon


def recurrent_step_kernel(K: int, V: int, BV: int, dtype: str, pool_dtype: str, v_first: bool,
                          threads: int = 128):
    """The prim_func for head dims K, V, V tile BV, q/k/v dtype, pool dtype and layout (V-major with
    ``v_first``); token counts, heads, sequences, slots and the pool's row stride are dynamic."""
    num_tokens = T.dynamic("num_tokens")
    qk_heads, v_heads = T.dynamic("qk_heads"), T.dynamic("v_heads")
    num_seqs = T.dynamic("num_seqs")
    step_seqs, steps = T.dynamic("step_seqs"), T.dynamic("steps")     # num_seqs x steps, or 1 x 1 unused
    slots_in, slots_out = T.dynamic("slots_in"), T.dynamic("slots_out")
    stride_in, stride_out = T.dynamic("stride_in"), T.dynamic("stride_out")
    inner = (V, K) if v_first else (K, V)
    inner_strides = (K, 1) if v_first else (V, 1)
    tile = (BV, K) if v_first else (K, BV)
    vector = 16 // (4 if pool_dtype == "float32" else 2)     # pool elements per 16 bytes

    @T.macro
    def load_state(pool, row, slots, h, v0, S_s, S):
        if row >= 0 and row < slots:
            if v_first:
                T.copy(pool[row, h, v0:v0 + BV, 0:K], S_s)
                for i, j in T.Parallel(BV, K):
                    S[i, j] = T.cast(S_s[i, j], ACC)
            else:
                T.copy(pool[row, h, 0:K, v0:v0 + BV], S_s)
                for i, j in T.Parallel(BV, K):
                    S[i, j] = T.cast(S_s[j, i], ACC)
        else:
            T.clear(S)

    @T.macro
    def store_state(pool, row, slots, h, v0, S_s, S):
        if row >= 0 and row < slots:
            if v_first:
                for i, j in T.Parallel(BV, K):
                    S_s[i, j] = T.cast(S[i, j], pool_dtype)
                T.copy(S_s, pool[row, h, v0:v0 + BV, 0:K])
            else:
                for i, j in T.Parallel(BV, K):
                    S_s[j, i] = T.cast(S[i, j], pool_dtype)
                T.copy(S_s, pool[row, h, 0:K, v0:v0 + BV])

    @T.prim_func
    def recurrent_step(
        q: T.Tensor((num_tokens, qk_heads, K), dtype),
        k: T.Tensor((num_tokens, qk_heads, K), dtype),
        v: T.Tensor((num_tokens, v_heads, V), dtype),
        g: T.Tensor((num_tokens, v_heads), ACC),
        beta: T.Tensor((num_tokens, v_heads), ACC),
        seqs: T.Tensor((num_seqs, 3), "int32"),            # (first token, length, -) per sequence: the forward's table
        first_rows: T.Tensor((num_seqs,), "int32"),
        out_rows: T.Tensor((num_seqs,), "int32"),
        step_rows: T.Tensor((step_seqs, steps), "int32"),
        pool_in: T.StridedTensor((slots_in, v_heads, *inner), (stride_in, K * V, *inner_strides), pool_dtype),
        pool_out: T.StridedTensor((slots_out, v_heads, *inner), (stride_out, K * V, *inner_strides), pool_dtype),
        o: T.Tensor((num_tokens, v_heads, V), dtype),
        a_log: T.Tensor((v_heads,), ACC),                  # with gate_in_kernel: A_log, dt_bias per value head
        dt_bias: T.Tensor((v_heads,), ACC),
        scale: T.float32,
        beta_scale: T.float32,                              # > 0: beta = beta_scale * sigmoid(beta) (1, or 2)
        l2norm: T.int32,
        per_step: T.int32,
        gate_in_kernel: T.int32,
    ):
        with T.Kernel(V // BV, v_heads, num_seqs, threads=threads) as (bv, h, n):
            # rows 16-byte aligned (the host routes other pools elsewhere): lets the tile copies vectorise
            T.assume(stride_in % vector == 0)
            T.assume(stride_out % vector == 0)
            hk = h // (v_heads // qk_heads)
            v0 = bv * BV
            start, length = seqs[n, 0], seqs[n, 1]

            S_s = T.alloc_shared(tile, pool_dtype)
            kq_s = T.alloc_shared((2, K), ACC)              # k_t, q_t
            v_s = T.alloc_shared((BV,), ACC)
            S = T.alloc_fragment((BV, K), ACC)              # S^T
            prod = T.alloc_fragment((BV, K), ACC)
            ks = T.alloc_fragment((BV,), ACC)               # S^T k, then e
            qs = T.alloc_fragment((BV,), ACC)
            rk = T.alloc_fragment((BV,), ACC)               # 1 / |k| (every row the same)
            rq = T.alloc_fragment((BV,), ACC)

            load_state(pool_in, first_rows[n], slots_in, h, v0, S_s, S)
            for t in T.serial(length):
                tok = start + t
                for r, j in T.Parallel(2, K):
                    kq_s[r, j] = T.cast(T.if_then_else(r == 0, k[tok, hk, j], q[tok, hk, j]), ACC)
                for i in T.Parallel(BV):
                    v_s[i] = T.cast(v[tok, h, v0 + i], ACC)
                decay = T.alloc_var(ACC)
                b = T.alloc_var(ACC)
                if gate_in_kernel != 0:
                    x = g[tok, h] + dt_bias[h]
                    decay = T.exp(-T.exp(a_log[h]) * T.if_then_else(x > 20.0, x, T.log(1.0 + T.exp(x))))
                else:
                    decay = T.exp(g[tok, h])
                if beta_scale > 0.0:
                    b = beta_scale / (1.0 + T.exp(-beta[tok, h]))
                else:
                    b = beta[tok, h]
                if l2norm != 0:
                    for i, j in T.Parallel(BV, K):
                        prod[i, j] = kq_s[0, j] * kq_s[0, j]
                    T.reduce_sum(prod, rk, dim=1)
                    for i, j in T.Parallel(BV, K):
                        prod[i, j] = kq_s[1, j] * kq_s[1, j]
                    T.reduce_sum(prod, rq, dim=1)
                    for i in T.Parallel(BV):
                        rk[i] = T.rsqrt(rk[i] + EPS)
                        rq[i] = T.rsqrt(rq[i] + EPS)
                else:
                    T.fill(rk, 1.0)
                    T.fill(rq, 1.0)
                for i, j in T.Parallel(BV, K):
                    S[i, j] = S[i, j] * decay
                    prod[i, j] = S[i, j] * kq_s[0, j]
                T.reduce_sum(prod, ks, dim=1)
                for i in T.Parallel(BV):
                    ks[i] = b * (v_s[i] - rk[i] * ks[i]) * rk[i]      # e, with k's normalisation folded in
                for i, j in T.Parallel(BV, K):
                    S[i, j] = S[i, j] + kq_s[0, j] * ks[i]
                    prod[i, j] = S[i, j] * kq_s[1, j]
                T.reduce_sum(prod, qs, dim=1)
                for i in T.Parallel(BV):
                    o[tok, h, v0 + i] = T.cast(scale * rq[i] * qs[i], dtype)
                if per_step != 0:
                    store_state(pool_out, step_rows[n, t], slots_out, h, v0, S_s, S)
            if per_step == 0:
                store_state(pool_out, out_rows[n], slots_out, h, v0, S_s, S)

    return recurrent_step
