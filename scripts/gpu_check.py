"""One GPU call: check the Hopper kernels against float64 references, then time them against FLA, FlashQLA
and FlashInfer (where its payload is installed).

    TILELANG_CACHE_DIR=.gpu/tlcache python scripts/gpu_check.py [--skip-check] [--skip-bench] [--skip-peers]

Writes full logs under $OUT (or ./bench-out) and prints a short table last.
"""
import argparse
import json
import os
import sys
import time
import traceback

os.environ.setdefault("FLA_FLASH_QLA", "0")     # FLA's Triton kernels, not its FlashQLA dispatch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flashdelta.bench import timing  # noqa: E402
from flashdelta.bench.configs import Config  # noqa: E402
from flashdelta.bench.inputs import InputSet, make_inputs  # noqa: E402
from flashdelta.bench.peers import FlashInfer  # noqa: E402
from flashdelta.gated_delta_rule.hopper import forward as hopper  # noqa: E402
from flashdelta.gated_delta_rule.inputs import sm_count  # noqa: E402
from flashdelta.gated_delta_rule.naive import naive_gated_delta_rule  # noqa: E402

OUT = os.environ.get("OUT", "bench-out")
os.makedirs(OUT, exist_ok=True)
LOG = open(os.path.join(OUT, "gpu_check.log"), "w")


def log(*args):
    msg = " ".join(str(a) for a in args)
    print(msg, flush=True)
    LOG.write(msg + "\n")
    LOG.flush()


def rel(a, e):
    a, e = a.double(), e.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def inputs(lens, H, HV, *, varlen, dtype=torch.bfloat16, h0=True, l2=False, strong=False, zero_heads=1,
           seed=0, dev="cuda"):
    """Harder random draws than the benchmark's: g = logsigmoid(randn)/8 (or down to -20 with
    ``strong``), beta uniform, ``zero_heads`` leading heads at g = 0; unnormalised q/k with ``l2``."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    B, T = (1, sum(lens)) if varlen else (len(lens), lens[0])
    rnd = lambda *s: torch.randn(*s, generator=gen, device=dev)
    q, k = rnd(B, T, H, 128), rnd(B, T, H, 128)
    if not l2:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    v = rnd(B, T, HV, 128)
    g = (-20 * torch.rand(B, T, HV, generator=gen, device=dev)) if strong else F.logsigmoid(rnd(B, T, HV)) / 8
    g[..., :zero_heads] = 0
    beta = torch.rand(B, T, HV, generator=gen, device=dev)
    s0 = rnd(len(lens), HV, 128, 128) if h0 else None
    cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32, device=dev) \
        if varlen else None
    return q.to(dtype), k.to(dtype), v.to(dtype), g, beta, s0, cu


def protocol_inputs(lens, H, HV, varlen):
    """The benchmark's inputs (DESIGN section 5), as the tuple ``inputs`` returns."""
    x = make_inputs(Config(tuple(lens), varlen, H, HV), "cuda")
    return x.q, x.k, x.v, x.g, x.beta, x.h0, x.cu_seqlens


def check_case(name, lens, H, HV, *, varlen, dtype=torch.bfloat16, h0=True, l2=False, strong=False,
               v_first=False, v_tile=128, reference="naive"):
    q, k, v, g, beta, s0, cu = inputs(lens, H, HV, varlen=varlen, dtype=dtype, h0=h0, l2=l2, strong=strong)
    if s0 is not None and v_first:
        s0 = s0.transpose(-1, -2).contiguous()
    scale = 128 ** -0.5
    torch.cuda.synchronize()
    o, ht = hopper.hopper_forward(q, k, v, g, beta, scale, s0, True, l2, cu, tuple(lens) if varlen else None,
                                  v_first, v_tile=v_tile)
    torch.cuda.synchronize()
    args = [x.double() if x is not None else None for x in (q, k, v, g, beta, s0)]
    if reference == "naive":
        eo, eht = naive_gated_delta_rule(*args[:5], scale=scale, initial_state=args[5], output_final_state=True, use_qk_l2norm_in_kernel=l2,
                                         cu_seqlens=cu, state_v_first=v_first)
    else:   # the exact chunked torch path in float64 (fast enough for long sequences)
        from flashdelta.gated_delta_rule.api import chunk_gated_delta_rule
        eo, eht = chunk_gated_delta_rule(*args[:5], scale=scale, initial_state=args[5], output_final_state=True,
                                         use_qk_l2norm_in_kernel=l2, cu_seqlens=cu, state_v_first=v_first,
                                         backend="torch", context_parallel=False)
    finite = bool(torch.isfinite(o).all() and torch.isfinite(ht).all())
    ro, rh = rel(o, eo), rel(ht, eht)
    ok = finite and ro <= 5e-3 and rh <= 5e-3
    log(f"check {name:40s} o {ro:.2e}  ht {rh:.2e}  finite={finite}  {'ok' if ok else 'FAIL'}")
    if not ok:      # where the error sits: per value head, and by row within the chunk
        heads = [f"{rel(o[..., h, :], eo[..., h, :]):.1e}" for h in range(o.shape[2])]
        err = (o.double() - eo).pow(2).sum(-1).sum(-1).flatten()
        ref = eo.pow(2).sum(-1).sum(-1).flatten()
        nt = err.shape[0] // 64 * 64
        by_row = (err[:nt].view(-1, 64).sum(0) / ref[:nt].view(-1, 64).sum(0)).sqrt()
        by_chunk = (err[:nt].view(-1, 64).sum(1) / ref[:nt].view(-1, 64).sum(1)).sqrt()
        log(f"    per head {heads}")
        log(f"    by row in chunk {[round(x, 4) for x in by_row.tolist()[::8]]}")
        log(f"    by chunk (first 8, last 4) {[round(x, 4) for x in by_chunk.tolist()[:8]]} "
            f"{[round(x, 4) for x in by_chunk.tolist()[-4:]]}")
    return ok


def checks():
    cases = [
        ("batched B2 T200 h2/4 h0", dict(lens=[200, 200], H=2, HV=4, varlen=False)),
        ("batched B3 T64 h4/4 no-h0", dict(lens=[64] * 3, H=4, HV=4, varlen=False, h0=False)),
        ("T=1 h2/2", dict(lens=[1], H=2, HV=2, varlen=False)),
        ("varlen tails+empty h1/4 vfirst", dict(lens=[0, 100, 64, 136, 0, 217, 1], H=1, HV=4, varlen=True,
                                                v_first=True)),
        ("varlen l2norm h2/4", dict(lens=[300, 77, 129], H=2, HV=4, varlen=True, l2=True)),
        ("strong decay h1/2", dict(lens=[333], H=1, HV=2, varlen=False, strong=True)),
        ("fp16 varlen h2/8", dict(lens=[190, 64, 5], H=2, HV=8, varlen=True, dtype=torch.float16)),
        ("BV=64 varlen h2/4 vfirst", dict(lens=[150, 260], H=2, HV=4, varlen=True, v_tile=64, v_first=True)),
        ("long T=32768 h1/2 (torch ref)", dict(lens=[32768], H=1, HV=2, varlen=False, reference="torch")),
    ]
    ok = True
    for name, kw in cases:
        try:
            ok &= check_case(name, **kw)
        except Exception:
            log(f"check {name} ERROR\n{traceback.format_exc()}")
            ok = False
    # dynamic shapes: new lengths / new cu_seqlens compile nothing
    before = hopper.compilations
    check_case("recompile probe", lens=[97, 3], H=2, HV=4, varlen=True)
    check_case("recompile probe 2", lens=[250], H=2, HV=4, varlen=False)
    log(f"compilations during new-length calls: {hopper.compilations - before}")
    return ok


TIMING_BUDGET = timing.Budget(seconds=0.2, min_reps=30)


def timed(fn, graph: bool):
    """Median ms of ``fn`` by CUDA-graph replay or eagerly: the benchmark tool's timers."""
    measure = timing.graph if graph else timing.eager
    return measure(lambda _: fn(), 1, TIMING_BUDGET).median_ms


def cp_parts(lens, H, HV, varlen, flat, mats, stats, o_buf):
    """The context-parallel forward's launches alone (planner's plan), for the time breakdown."""
    from flashdelta.gated_delta_rule.context_parallel import TRUNCATION_TAU
    from flashdelta.gated_delta_rule.segments import SegmentTable
    from flashdelta.gated_delta_rule.hopper.context_parallel import scan_kernel, segment_windows
    from flashdelta.gated_delta_rule.planner import plan_forward

    dev = flat[0].device
    plan = plan_forward(tuple(lens), HV, 128, sm_count(dev), True)
    table = SegmentTable.build(plan, tuple(lens), None if varlen else lens[0], dev)
    S = table.spans.shape[0] - 1
    ag, coef = mats
    ends = torch.empty(2 * (S + 1), HV, 128 * 128, dtype=torch.float32, device=dev)
    spans, keep = segment_windows(stats, table, TRUNCATION_TAU)
    h0 = torch.zeros(len(lens), HV, 128, 128, dtype=torch.float32, device=dev)
    starts = torch.empty(S + 1, HV, 128, 128, dtype=torch.float32, device=dev)
    r_chunks = (spans[..., 1] + 63) // 64
    m_chunks = (spans[..., 3] + 63) // 64
    log(f"cp plan: {S} segments of {plan.segment_chunks} chunks, V tile {plan.v_tile}; warm-up chunk steps "
        f"R {int(r_chunks.sum())} (longest {int(r_chunks.max())}), M {int(m_chunks.sum())}; "
        f"kept M {int(keep.sum())} of {keep.numel()}")
    return {
        "cp windows": lambda: segment_windows(stats, table, TRUNCATION_TAU),
        "cp warm-up": lambda: hopper.warmup(*flat, ag, coef, spans, ends, plan.v_tile),
        "cp scan": lambda: scan_kernel()(ends[S + 1:].view(S + 1, HV, 128, 128), ends[:S + 1].view(S + 1, HV, 128, 128),
                                         keep, h0, table.order, starts),
        "cp output pass": lambda: hopper.recur(*flat, *mats, table.spans, starts.view(S + 1, HV, -1), o_buf, None,
                                               False, plan.v_tile),
    }


def backward_parts(lens, H, HV, varlen):
    """The backward's launches alone, each graph-replayed, and the whole backward (``hopper_backward``)."""
    from flashdelta.gated_delta_rule.hopper import backward as hb

    q, k, v, g, beta, s0, cu = protocol_inputs(lens, H, HV, varlen)
    seq, scale, tok, dev = tuple(lens), 128 ** -0.5, q.shape[0] * q.shape[1], q.device
    do, dht = torch.randn_like(v), torch.randn_like(s0)
    qf, kf, vf, dof = q.view(tok, H, 128), k.view(tok, H, 128), v.view(tok, HV, 128), do.view(tok, HV, 128)
    _, chunks = hopper._tables(seq, None if varlen else lens[0], dev)
    seqs = hb._walk_table(seq, None if varlen else lens[0], dev)
    a0g = torch.empty(tok, HV, 64, dtype=q.dtype, device=dev)
    ag, coef, _ = hopper.prepare(qf, kf, g, beta, chunks, HV, scale, False, a0g=a0g)
    states = torch.empty(chunks.shape[0], HV, 128, 128, dtype=q.dtype, device=dev)
    dstates, dv = torch.empty_like(states), torch.empty_like(vf)
    h0, dhtf = s0.view(len(lens), HV, -1), dht.view(len(lens), HV, -1)
    dh0 = torch.empty_like(h0)
    grads = [torch.empty(tok, H, 128, dtype=q.dtype, device=dev) for _ in range(2)] + [
        torch.empty(tok, HV, device=dev) for _ in range(2)]
    none = hopper.unused_rows(HV, 128 * 128, torch.float32, dev)
    parts = {
        "bwd prepare (+A0g)": lambda: hopper.prepare(qf, kf, g, beta, chunks, HV, scale, False, a0g=a0g),
        "bwd states": lambda: hopper.entry(hopper.recurrence_kernel("bfloat16", 128, save_states=True))(
            qf, kf, vf, ag, coef, seqs, h0, vf, none, states, 1, 0, 0),
        "bwd gradients": lambda: hopper.entry(hb.gradients_kernel("bfloat16"))(
            qf, kf, vf, dof, dv, a0g, coef, chunks, states, dstates, *grads, scale, 0),
        "bwd total": lambda: hb.hopper_backward(q, k, v, g, beta, scale, s0, False, cu, seq if varlen else None,
                                                False, do, dht),
        # the forward storing its per-chunk states, and the backward from them (no recompute)
        "fwd storing states": lambda: hopper.hopper_forward(q, k, v, g, beta, scale, s0, True, False, cu, seq, False,
                                                            save_states=True),
        "bwd total, stored states": lambda: hb.hopper_backward(q, k, v, g, beta, scale, s0, False, cu, seq, False,
                                                               do, dht, states=states),
    }
    for bv in hb.WALK_V_TILES:
        parts[f"bwd walk BV={bv}"] = lambda bv=bv: hopper.entry(hb.walk_kernel("bfloat16", bv))(
            qf, kf, dof, ag, coef, seqs, dhtf, dv, dh0, dstates, 1, 1, 0)
    return parts


def bench(rows, peers=True):
    fla_fwd = fqla_fwd = flashinfer = None
    if peers:
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_fwd
        except Exception as err:
            log("FLA unavailable:", err)
        try:
            from flash_qla import chunk_gated_delta_rule as fqla_fwd
        except Exception as err:
            log("FlashQLA unavailable:", err)
        flashinfer = FlashInfer()
        why = flashinfer.load(torch.device("cuda"))
        if why:
            log("FlashInfer unavailable:", why)
            flashinfer = None
    from flashdelta.gated_delta_rule.api import chunk_gated_delta_rule as ours_api

    configs = [("4x8192 hk16/hv32", [8192] * 4, 16, 32, False),
               ("1x32768 hk2/hv8", [32768], 2, 8, False),
               ("varlen 8x4096 hk4/hv16", [4096] * 8, 4, 16, True)]
    few_ctas = "1x32768 hk2/hv8"            # where context parallelism should pay: also time its parts
    for name, lens, H, HV, varlen in configs:
        q, k, v, g, beta, s0, cu = protocol_inputs(lens, H, HV, varlen)
        scale = 128 ** -0.5
        seq = tuple(lens) if varlen else None
        cu_cpu = cu.cpu() if cu is not None else None
        cands = {
            "ours(kernel)": lambda: hopper.hopper_forward(q, k, v, g, beta, scale, s0, True, False, cu, seq, False),
            "ours(kernel,BV64)": lambda: hopper.hopper_forward(q, k, v, g, beta, scale, s0, True, False, cu, seq,
                                                               False, v_tile=64),
            "ours(api)": lambda: ours_api(q, k, v, g, beta, scale=scale, initial_state=s0, output_final_state=True,
                                          cu_seqlens=cu, cu_seqlens_cpu=cu_cpu, backend="tilelang"),
            # the in-kernel l2-norm's cost (q, k are unit rows already, so the outputs agree to rounding)
            "ours(api,l2norm)": lambda: ours_api(q, k, v, g, beta, scale=scale, initial_state=s0,
                                                 output_final_state=True, use_qk_l2norm_in_kernel=True,
                                                 cu_seqlens=cu, cu_seqlens_cpu=cu_cpu, backend="tilelang"),
        }
        if name == few_ctas:
            for L in (None, 16, 32, 64):   # None: the planner's segment length
                cands[f"ours(api,CP L={L or 'plan'})"] = lambda L=L: ours_api(
                    q, k, v, g, beta, scale=scale, initial_state=s0, output_final_state=True, cu_seqlens=cu,
                    cu_seqlens_cpu=cu_cpu, backend="tilelang", context_parallel=L or True)
        if fla_fwd is not None:
            cands["fla"] = lambda: fla_fwd(q, k, v, g, beta, scale=scale, initial_state=s0,
                                           output_final_state=True, cu_seqlens=cu)
        if fqla_fwd is not None:
            cands["flashqla"] = lambda: fqla_fwd(q, k, v, g, beta, scale=scale, initial_state=s0,
                                                 output_final_state=True, cu_seqlens=cu)
        if flashinfer is not None:              # the benchmark's peer, its conventions converted once
            fi_inputs = InputSet(q, k, v, g, beta, s0, cu, cu_cpu)
            cands["flashinfer"] = lambda: flashinfer(fi_inputs)
        # where our time goes: each kernel alone, graph-replayed
        seqs, chunks = hopper._tables(tuple(lens), None if varlen else lens[0], q.device)
        tok = q.shape[0] * q.shape[1]
        flat = (q.view(tok, H, 128), k.view(tok, H, 128), v.view(tok, HV, 128))
        *mats, stats = hopper.prepare(*flat[:2], g, beta, chunks, HV, scale, False)
        o_buf = torch.empty(tok, HV, 128, dtype=q.dtype, device=q.device)
        h0f = s0.view(len(lens), HV, -1)
        ht_buf = torch.empty_like(h0f)
        parts = {"prepare": lambda: hopper.prepare(*flat[:2], g, beta, chunks, HV, scale, False)}
        for bv in hopper.V_TILES:
            parts[f"recur BV={bv}"] = lambda bv=bv: hopper.recur(*flat, *mats, seqs, h0f, o_buf, ht_buf, False, bv)
        parts.update(backward_parts(lens, H, HV, varlen))
        if name == few_ctas:
            try:
                parts.update(cp_parts(lens, H, HV, varlen, flat, mats, stats, o_buf))
            except Exception:
                log(f"bench {name} cp parts ERROR\n{traceback.format_exc()}")
        for pname, fn in parts.items():
            try:
                t = timed(fn, True)
            except Exception:
                log(f"bench {name} part {pname} ERROR\n{traceback.format_exc()}")
                continue
            rows.append((name, "  " + pname, float("nan"), t, 0.0, ""))
            log(f"bench {name:24s}   {pname:16s} graph {t:.3f} ms")
        ref = None
        for cname, fn in cands.items():
            try:
                t0 = time.perf_counter()
                o, ht = fn()
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                if ref is None:
                    ref = (o.float(), ht.float())
                    agree = "ref"
                else:
                    agree = f"{rel(o, ref[0]):.1e}/{rel(ht, ref[1]):.1e}"
                eager = timed(fn, False)
                try:
                    graph = timed(fn, True)
                except Exception as err:
                    graph = float("nan")
                    log(f"  {cname}: graph capture failed: {type(err).__name__}: {err}")
                rows.append((name, cname, eager, graph, first, agree))
                log(f"bench {name:24s} {cname:18s} eager {eager:.3f} ms  graph {graph:.3f} ms  first {first:.2f} s"
                    f"  vs-ours {agree}")
            except Exception:
                log(f"bench {name} {cname} ERROR\n{traceback.format_exc()}")


def tune(path):
    """Forced layouts (unsplit / CP with L chunks per segment) x V tiles on few-CTA shapes: the data the
    planner's TUNING constants are fitted to. Writes {config: {layout: graph ms}} to ``path``."""
    from flashdelta.gated_delta_rule.hopper.context_parallel import hopper_cp_forward
    from flashdelta.gated_delta_rule.planner import Plan, _segments, plan_forward

    sms = sm_count(torch.device("cuda"))
    heads = [(2, 8), (4, 16), (8, 32), (16, 64)]
    lengths = [[32768], [8192], [2048], [28672, 4096], [1024, 7168], [2048] * 4, [8192] * 4]
    results = {}
    for H, HV in heads:
        for lens in lengths:
            q, k, v, g, beta, s0, cu = protocol_inputs(lens, H, HV, True)
            seq, scale = tuple(lens), 128 ** -0.5
            name = f"{'+'.join(map(str, lens))} hk{H}/hv{HV}"
            row = {}
            for bv in hopper.V_TILES:
                row[f"unsplit BV={bv}"] = timed(lambda bv=bv: hopper.hopper_forward(
                    q, k, v, g, beta, scale, s0, True, False, cu, seq, False, v_tile=bv), True)
                for L in (4, 8, 16, 32, 64):
                    if L * 64 >= max(lens):
                        continue
                    plan = Plan(bv, L, _segments(seq, L))
                    row[f"CP L={L} BV={bv}"] = timed(lambda plan=plan: hopper_cp_forward(
                        q, k, v, g, beta, scale, s0, True, False, cu, seq, False, plan), True)
            chosen = plan_forward(seq, HV, 128, sms)
            pick = f"CP L={chosen.segment_chunks} BV={chosen.v_tile}" if chosen.context_parallel \
                else f"unsplit BV={chosen.v_tile}"
            best = min(row, key=row.get)
            results[name] = {"times": row, "planner": pick, "best": best}
            log(f"tune {name:28s} best {best:18s} {row[best]:.3f} ms   planner {pick:18s} "
                f"{row.get(pick, float('nan')):.3f} ms   unsplit {row['unsplit BV=128']:.3f}")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-peers", action="store_true", help="time ours only (peers compile for minutes)")
    ap.add_argument("--tune", action="store_true", help="time forced layouts for the planner (tune.json)")
    args = ap.parse_args()
    log("device:", torch.cuda.get_device_name(), "torch", torch.__version__)
    t = time.perf_counter()
    for name, build in hopper.variants():
        build()
    log(f"kernels loaded in {time.perf_counter() - t:.2f} s ({hopper.compilations} builds)")
    ok = True
    if not args.skip_check:
        ok = checks()
    if args.tune:
        tune(os.path.join(OUT, "tune.json"))
    rows = []
    if not args.skip_bench:
        bench(rows, peers=not args.skip_peers)
    log("\n=== summary ===")
    log(f"correctness: {'all ok' if ok else 'FAILURES (see above)'}")
    log(f"{'config':24s} {'impl':18s} {'eager ms':>9s} {'graph ms':>9s}")
    for name, cname, eager, graph, first, agree in rows:
        log(f"{name:24s} {cname:18s} {eager:9.3f} {graph:9.3f}  {agree}")
    with open(os.path.join(OUT, "gpu_check.json"), "w") as f:
        json.dump({"ok": ok, "rows": rows}, f)


if __name__ == "__main__":
    main()
