"""The benchmark CLI on CPU: configuration parsing, floor arithmetic, report formatting, end to end."""
import json
import math
import re
import sys
import time
import types

import pytest
import torch

from flashdelta.bench import __main__ as cli
from flashdelta.bench import check, configs, inputs, peers, report, roofline
from flashdelta.bench.configs import Config


# ---- configurations ----------------------------------------------------------------------------

def test_parse_lengths_and_heads():
    assert configs.parse_lengths("4096,4096") == (4096, 4096)
    assert configs.parse_lengths("28672+4096") == (28672, 4096)
    assert configs.parse_heads("16/32, 2/8") == [(16, 32), (2, 8)]
    for bad in ("", "a,b"):
        with pytest.raises(ValueError):
            configs.parse_lengths(bad)
    for bad in ("16", "16/32/4", "x/y"):
        with pytest.raises(ValueError):
            configs.parse_heads(bad)


def test_config_validation_and_labels():
    dense = Config((8192,) * 4, False, 16, 32)
    assert (dense.tokens, dense.num_seqs, dense.label) == (32768, 4, "4x8192 h16/32")
    varlen = Config((28672, 4096), True, 2, 8, 64, 64, "fp16", "fwdbwd")
    assert varlen.label == "28672+4096 h2/8 K64V64 fp16"
    assert Config((2048,), False, 2, 8, l2norm=True).label == "1x2048 h2/8 l2norm"
    for kwargs in ({"lengths": (4096, 2048), "varlen": False}, {"hv": 12, "hk": 8}, {"lengths": (0,)},
                   {"mode": "bwd"}, {"dtype": "fp8"}):
        base = dict(lengths=(1024,), varlen=False, hk=2, hv=8)
        with pytest.raises(ValueError):
            Config(**{**base, **kwargs})


def test_presets_match_design_matrix():
    fwd = configs.preset("qwen35-fwd")
    assert len(fwd) == 9 * 14 and {c.mode for c in fwd} == {"fwd"}
    labels = {c.label for c in fwd}
    assert {"1x32768 h2/8", "28672+4096 h16/32", "8x1024 h32/32", "1024+7168 h8/24"} <= labels
    bwd = configs.preset("qwen35-bwd")
    assert len(bwd) == 4 * 2 * 4 and {c.mode for c in bwd} == {"fwdbwd"}
    assert {c.tokens for c in bwd} == {8192, 32768} and "8x4096 h2/4" in {c.label for c in bwd}
    quick = configs.preset("quick", mode="fwdbwd")
    assert quick and all(c.mode == "fwdbwd" and c.tokens <= 4096 for c in quick)


def test_cli_configuration_building():
    got = cli.build_configs(cli.parse_args(["--preset", "qwen35-fwd", "--heads", "2/8,16/32", "--max-tokens", "8192"]))
    assert {(c.hk, c.hv) for c in got} == {(2, 8), (16, 32)} and max(c.tokens for c in got) == 8192
    got = cli.build_configs(cli.parse_args(["--lengths", "4096,4096", "--batch", "4", "--seqlen", "8192",
                                            "--hk", "16", "--hv", "32", "--mode", "fwdbwd", "--dtype", "fp16"]))
    assert [(c.varlen, c.lengths) for c in got] == [(True, (4096, 4096)), (False, (8192,) * 4)]
    assert all(c.mode == "fwdbwd" and c.dtype == "fp16" for c in got)
    for argv in (["--lengths", "4096"], ["--preset", "quick", "--seqlen", "4"],
                 ["--preset", "qwen35-bwd", "--mode", "fwd"], ["--batch", "2", "--heads", "1/1"],
                 ["--preset", "quick", "--heads", "3/9"], ["--seqlen", "64", "--hk", "2"]):
        with pytest.raises(ValueError):
            cli.build_configs(cli.parse_args(argv))
    assert cli.main(["--lengths", "64"]) == 2             # error message, exit status 2, no traceback
    quick = cli.build_configs(cli.parse_args(["--preset", "quick"]))
    assert cli.build_configs(cli.parse_args([])) == quick == cli.build_configs(cli.parse_args(["--out", "x"]))
    assert not any(c.l2norm for c in quick)
    l2 = cli.build_configs(cli.parse_args(["--preset", "quick", "--l2norm"]))
    assert all(c.l2norm for c in l2) and [c.lengths for c in l2] == [c.lengths for c in quick]


# ---- roofline ----------------------------------------------------------------------------------

def test_floor_arithmetic():
    cfg = Config((4096,), False, 16, 32)
    state = 1 * 32 * 128 * 128 * 4
    assert roofline.traffic_bytes(cfg) == (512 * (16 + 32) + 8 * 32) * 4096 + 2 * state
    assert roofline.flops(cfg) == pytest.approx(164e3 * 4096 * 32)
    bwd = Config((4096,), False, 16, 32, mode="fwdbwd")
    assert roofline.flops(bwd) == pytest.approx(3.5 * roofline.flops(cfg))
    assert roofline.traffic_bytes(bwd) > 2 * roofline.traffic_bytes(cfg)

    rates = roofline.Rates(3e12, 750e12, "given")
    f = roofline.floor(cfg, rates)
    t_mem, t_math = roofline.traffic_bytes(cfg) / 3e12, roofline.flops(cfg) / 750e12
    assert f.seconds == pytest.approx(max(t_mem, t_math)) and f.bound == "memory"
    assert roofline.floor(cfg, roofline.Rates(3e12, 1e12, "given")).bound == "compute"
    half = Config((4096,), False, 16, 32, 64, 128)
    assert roofline.flops(half) == pytest.approx(roofline.flops(cfg) / 2)


def test_input_rotation_count():
    small, big = Config((2048,), False, 2, 8), Config((32768,), False, 16, 64)
    assert inputs.num_sets(big) == 1
    n = inputs.num_sets(small)
    assert 1 < n <= inputs.MAX_SETS and n * roofline.traffic_bytes(small) >= min(
        2 * inputs.L2_BYTES, inputs.MAX_SETS * roofline.traffic_bytes(small))


def test_inputs_follow_protocol():
    cfg = Config((100, 60), True, 2, 8, 32, 16, mode="fwdbwd")
    x = inputs.make_inputs(cfg, "cpu", seed=1)
    assert x.q.shape == (1, 160, 2, 32) and x.v.shape == (1, 160, 8, 16) and x.h0.shape == (2, 8, 32, 16)
    assert x.q.dtype == torch.bfloat16 and x.g.dtype == torch.float32 and x.beta.dtype == torch.float32
    assert torch.allclose(x.k.float().norm(dim=-1), torch.ones(1, 160, 2), atol=1e-2)
    assert (x.g[..., ::4] == 0).all() and (x.g[..., 1] < 0).all() and ((x.beta > 0.5) & (x.beta < 0.75)).all()
    assert x.cu_seqlens.tolist() == [0, 100, 160] and x.cu_seqlens.dtype == torch.int32
    assert all(t.requires_grad for t in x.leaves) and x.do.shape == x.v.shape and x.dht.shape == x.h0.shape
    assert not x.l2norm
    raw = inputs.make_inputs(Config((100,), False, 2, 8, 32, 16, l2norm=True), "cpu", seed=1)
    assert raw.l2norm and raw.k.float().norm(dim=-1).mean() > 3          # randn rows of 32: norm about 5.6


# ---- checks and peers ----------------------------------------------------------------------------

def test_rel_rms_and_flags():
    b = torch.ones(100)
    assert check.rel_rms(b, b) == 0 and check.rel_rms(b * 1.01, b) == pytest.approx(0.01)
    assert check.rel_rms(torch.zeros(3), torch.zeros(3)) == 0
    errs = {"o": 0.004, "ht": 0.006, "dq": 0.019, "dg": 0.03, "dk": float("nan")}
    assert check.flagged(errs) == ["ht", "dg", "dk"]


def test_judged_against_float64_where_it_ran_else_against_ours():
    truth = {"o": torch.ones(100), "ht": torch.ones(10)}
    near = lambda e: {"o": truth["o"] * (1 + e), "ht": truth["ht"]}
    checks = check.judge({"flashdelta": near(0.004), "FLA": near(0.006), "naive-fp64": truth}, "flashdelta")
    assert set(checks) == {"flashdelta", "FLA"} and checks["FLA"]["against"] == "naive-fp64"
    assert checks["flashdelta"]["flagged"] == [] and checks["FLA"]["flagged"] == ["o"]
    checks = check.judge({"flashdelta": near(0.004), "FLA": near(-0.002), "FlashQLA": near(-0.008)}, "flashdelta")
    assert set(checks) == {"FLA", "FlashQLA"} and checks["FLA"]["against"] == "flashdelta"
    assert checks["FLA"]["flagged"] == [] and checks["FlashQLA"]["flagged"] == ["o"]     # the bar: 0.005 + 0.005
    assert report._check({"checks": checks}).startswith("vs ours: FLA ok 6.0e-03; FlashQLA MISMATCH o 1.2e-02>0.01")
    assert check.judge({"FLA": near(0.0)}, "flashdelta") == {}                           # nothing to judge by


def test_requested_peers():
    assert peers.requested("fla, FlashQLA") == {"fla", "flashqla"} and peers.requested("none") == set()
    with pytest.raises(ValueError, match="triton"):
        peers.requested("fla,triton")
    assert cli.main(["--peers", "triton"]) == 2            # error message, exit status 2


def test_fla_dispatch_to_flashqla_is_caught(monkeypatch):
    """The FLA peer must fail loudly if fla routes the call to FlashQLA despite FLA_FLASH_QLA=0."""
    fake = types.ModuleType("flash_qla")
    fake.chunk_gated_delta_rule = lambda *a, **k: ("o", "ht")
    monkeypatch.setitem(sys.modules, "flash_qla", fake)
    fla = peers.FLATriton()
    fla.fn = lambda *a, **k: sys.modules["flash_qla"].chunk_gated_delta_rule()     # dispatching FLA
    x = inputs.make_inputs(Config((64,), False, 1, 1, 16, 16), "cpu")
    with pytest.raises(RuntimeError, match="FlashQLA"):
        with fla.watch() as seen:
            fla(x)
            seen()
    assert fake.chunk_gated_delta_rule() == ("o", "ht")        # spy removed afterwards
    fla.fn = lambda *a, **k: ("o", "ht")                        # Triton path: flash_qla untouched
    with fla.watch() as seen:
        fla(x)
        assert "not called" in seen()


@pytest.mark.parametrize("varlen", [False, True])
def test_flashinfer_conventions(monkeypatch, varlen):
    """The FlashInfer peer's conversions (packed tokens, alpha = exp(g), V-major states) round-trip: a
    fake FlashInfer computing with flashdelta in FlashInfer's conventions gives flashdelta's result."""
    import flashdelta

    def fake_prefill(q, k, v, alpha, beta, scale=None, initial_state=None, output_final_state=True,
                     cu_seqlens=None, use_cp="auto"):
        assert q.dim() == 3 and cu_seqlens.dtype == torch.int32 and alpha.min() > 0
        o, ht = flashdelta.chunk_gated_delta_rule(q[None], k[None], v[None], alpha.log()[None], beta[None],
                                                  initial_state=initial_state, output_final_state=True,
                                                  cu_seqlens=cu_seqlens, state_v_first=True)
        return o[0], ht

    module = types.ModuleType("flashinfer.gdn_prefill")
    module.chunk_gated_delta_rule = fake_prefill
    monkeypatch.setitem(sys.modules, "flashinfer", types.ModuleType("flashinfer"))
    monkeypatch.setitem(sys.modules, "flashinfer.gdn_prefill", module)
    fi = peers.FlashInfer()
    assert fi.load(torch.device("cpu")) == "needs a CUDA GPU"
    fi.fn = fake_prefill
    cfg = Config((70, 50) if varlen else (64, 64), varlen, 1, 2, 16, 16, dtype="fp32")
    x = inputs.make_inputs(cfg, "cpu")
    o, ht = fi(x)
    want_o, want_ht = flashdelta.chunk_gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, initial_state=x.h0,
                                                        output_final_state=True, cu_seqlens=x.cu_seqlens)
    assert o.shape == want_o.shape and torch.allclose(o, want_o, atol=1e-5)
    assert ht.shape == want_ht.shape and torch.allclose(ht, want_ht, atol=1e-5)
    assert "no backward" in fi.applies(Config((64,), False, 1, 2, mode="fwdbwd"))
    assert fi.applies(Config((64,), False, 1, 2)) is None and "l2-norm" in fi.applies(Config((64,), False, 1, 2,
                                                                                            l2norm=True))
    assert peers.requested("flashinfer") == {"flashinfer"}


# ---- report ------------------------------------------------------------------------------------

def _timing(ms):
    return {"median_ms": ms, "min_ms": ms, "max_ms": ms, "reps": 20}


def _record():
    impl = lambda g, e, **kw: {"status": "ok", "first_call_s": 1.5, "path": "tilelang",
                              "graph": _timing(g), "eager": _timing(e), **kw}
    results = [
        {"label": "1x32768 h2/8", "config": {}, "input_sets": 1, "floor": {"ms": 0.1, "bound": "memory",
                                                                           "bytes": 1, "flops": 1},
         "impls": {"flashdelta": impl(0.2, 0.25), "FLA": impl(1.0, 1.2, path="Triton"),
                   "FlashQLA": impl(0.3, 0.6, path="flash_qla")},
         "checks": {"FLA": {"errors": {"o": 0.002, "ht": 0.001}, "flagged": []},
                    "FlashQLA": {"errors": {"o": 0.009, "ht": 0.001}, "flagged": ["o"]}}},
        {"label": "4096+4096 h16/32", "config": {}, "input_sets": 3, "floor": None,
         "impls": {"flashdelta": impl(0.5, 0.6), "FLA": {"status": "failed", "reason": "RuntimeError: boom"},
                   "FlashQLA": {"status": "skipped", "reason": "not here"}},
         "checks": {}},
    ]
    return {"environment": {"device_name": "NVIDIA H100 80GB HBM3", "driver": "570.1", "date": "2026-11-25",
                            "command": "flashdelta-bench --preset quick", "versions": {"torch": "2.13"}},
            "settings": {"mode_label": "fwd", "graph": True, "timing_note": "timing: test"},
            "rates": {"bandwidth": 3e12, "gemm": 750e12, "source": "measured", "bytes_note": "b", "flops_note": "f"},
            "skipped": {}, "results": results}


def test_report_formatting(tmp_path):
    record = _record()
    d = report.derived(record["results"][0])
    assert d["speedup"]["FLA"] == {"graph": pytest.approx(5.0), "eager": pytest.approx(4.8)}
    assert d["fraction_of_floor"]["graph"] == pytest.approx(0.5)
    md = report.markdown(record)
    row = next(line for line in md.splitlines() if line.startswith("| 1x32768"))
    for piece in ("0.200 / 0.250", "5.00x / 4.80x", "1.50x / 2.40x", "0.100 (mem)", "0.5 (graph)",
                  "vs ours: FLA ok 2.0e-03", "FlashQLA MISMATCH o 9.0e-03>0.01", "1.25"):
        assert piece in row
    row2 = next(line for line in md.splitlines() if line.startswith("| 4096+4096"))
    assert "FAILED" in row2 and "skip" in row2
    assert "4096+4096 h16/32: FLA FAILED: RuntimeError: boom" in md and "driver 570.1" in md
    report.write_json(record, tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["results"][0]["speedup"]["FlashQLA"]["graph"] == pytest.approx(1.5)
    pytest.importorskip("matplotlib")
    assert report.plot(record, tmp_path / "r.png") is None and (tmp_path / "r.png").stat().st_size > 0


def test_report_backward_and_memory_columns():
    record = _record()
    first = record["results"][0]["impls"]
    first["flashdelta"].update(bwd_eager=_timing(0.15), peak_mib=300.4)
    first["FLA"].update(bwd_eager=_timing(0.75), peak_mib=512.0)
    md = report.markdown(record)
    head = next(line for line in md.splitlines() if line.startswith("| config"))
    assert "bwd alone ms, eager" in head and "peak MiB" in head
    row = next(line for line in md.splitlines() if line.startswith("| 1x32768"))
    assert "| 0.150 / 0.750 / — |" in row and "| 300 / 512 / — |" in row
    assert len(row.split("|")) == len(head.split("|"))
    assert "bwd alone" not in report.markdown(_record())


def test_report_shows_flashinfer_where_a_run_has_it():
    record = _record()
    assert "FlashInfer" not in report.markdown(record)
    impls = record["results"][0]["impls"]
    impls["FlashInfer"] = dict(impls["FLA"], graph=_timing(0.4), eager=_timing(0.5), path="flashinfer")
    md = report.markdown(record)
    head = next(line for line in md.splitlines() if line.startswith("| config"))
    row = next(line for line in md.splitlines() if line.startswith("| 1x32768"))
    assert "FlashInfer ms (graph / eager)" in head and "FlashInfer/ours" in head and "2.00x / 2.00x" in row
    assert len(row.split("|")) == len(head.split("|"))
    assert report.derived(record["results"][0])["speedup"]["FlashInfer"]["graph"] == pytest.approx(2.0)


def test_stem_from_gpu_name():
    from flashdelta.bench.environment import short_name
    assert short_name("NVIDIA H100 80GB HBM3") == "H100"
    assert short_name("NVIDIA H200") == "H200"
    assert short_name("CPU x86_64 (2 cores)") == "cpu"


def test_source_digest_names_the_code():
    from flashdelta.bench import environment
    digest = environment.source_digest()
    assert re.fullmatch(r"[0-9a-f]{12}", digest) and environment.source_digest() == digest
    assert environment.environment(torch.device("cpu"), "cmd")["flashdelta_sources"] == digest


# ---- end to end ----------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the quick preset")
def test_quick_preset_end_to_end_on_cpu(tmp_path, capsys):
    start = time.perf_counter()
    assert cli.main(["--preset", "quick", "--out", str(tmp_path), "--bandwidth", "3", "--gemm-rate", "750"]) == 0
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"quick preset took {elapsed:.0f} s on CPU (issue: < 60 s on 2 cores)"
    out = capsys.readouterr().out
    assert "No CUDA device" in out and "FLA skipped" in out
    record = json.loads((tmp_path / "cpu-fwd.json").read_text())
    assert len(record["results"]) == len(configs.QUICK)
    for r in record["results"]:
        ours = r["impls"]["flashdelta"]
        assert ours["status"] == "ok" and ours["path"].startswith("torch") and ours["eager"]["median_ms"] > 0
        assert "graph" not in ours and r["floor"]["ms"] > 0
        assert r["checks"]["flashdelta"]["flagged"] == [] and r["checks"]["flashdelta"]["against"] == "naive-fp64"
        assert math.isfinite(r["fraction_of_floor"]["eager"])
    assert (tmp_path / "cpu-fwd.md").read_text().count("\n| ") == 1 + len(configs.QUICK)
    assert (tmp_path / "cpu-fwd.png").exists() or "plot skipped" in out


@pytest.mark.parametrize("l2norm", [False, True])
def test_fwdbwd_end_to_end_on_cpu(tmp_path, l2norm):
    argv = ["--lengths", "100,60", "--hk", "1", "--hv", "2", "-K", "16", "-V", "16", "--mode", "fwdbwd",
            "--device", "cpu", "--reps", "2", "--out", str(tmp_path), "--name", "tiny"] + ["--l2norm"] * l2norm
    assert cli.main(argv) == 0
    r = json.loads((tmp_path / "tiny.json").read_text())["results"][0]
    assert r["config"]["l2norm"] == l2norm and r["label"].endswith(" l2norm") == l2norm
    errors = r["checks"]["flashdelta"]["errors"]
    assert set(errors) == {"o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0"} and not r["checks"]["flashdelta"]["flagged"]
    assert r["impls"]["flashdelta"]["eager"]["reps"] == 2


# ---- failures and mismatches are reported, never hidden -------------------------------------------

class _Scaled(peers.Impl):
    """A fake peer: flashdelta's torch path, with o scaled (a wrong answer) or raising."""

    def __init__(self, name, factor=1.0, fail=False):
        self.name, self.factor, self.fail = name, factor, fail

    def __call__(self, inp):
        if self.fail:
            raise RuntimeError("kernel exploded\nsecond line")
        from flashdelta import chunk_gated_delta_rule
        o, ht = chunk_gated_delta_rule(inp.q, inp.k, inp.v, inp.g, inp.beta, initial_state=inp.h0,
                                       output_final_state=True, cu_seqlens=inp.cu_seqlens, backend="torch")
        return o * self.factor, ht


def test_runner_reports_peer_failure_and_mismatch():
    from flashdelta.bench import timing
    from flashdelta.bench.runner import measure_config
    ours = peers.FlashDelta("torch")
    ours.load(torch.device("cpu"))
    impls = [ours, _Scaled("FLA", factor=1.02), _Scaled("FlashQLA", fail=True), _Scaled("same")]
    cfg = Config((70, 58), True, 1, 2, 16, 16)
    r = measure_config(cfg, impls, torch.device("cpu"), None, timing.Budget(0, 2, 2), use_graph=False)
    assert r["impls"]["FlashQLA"] == {"status": "failed", "reason": "RuntimeError: kernel exploded"}
    assert r["checks"]["FLA"]["flagged"] == ["o"] and r["checks"]["FLA"]["errors"]["o"] == pytest.approx(0.02 / 1.02, rel=0.05)
    assert r["checks"]["same"]["flagged"] == [] and r["impls"]["FLA"]["eager"]["reps"] == 2
    assert "FLA MISMATCH o" in report._check(r)


# ---- the CUDA timers' control flow, with torch.cuda faked -----------------------------------------

class _FakeEvent:
    clock = [0.0]

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = self.clock[0]

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return other.t - self.t


def test_cuda_timers_with_fake_device(monkeypatch):
    from contextlib import nullcontext

    from flashdelta.bench import timing
    calls = []

    def fn(i):                      # each call "takes" 2 ms of device time
        calls.append(i)
        _FakeEvent.clock[0] += 2.0

    class FakeGraph:
        def replay(self):
            for i in range(3):
                fn(i)

    fake = types.SimpleNamespace(Event=_FakeEvent, synchronize=lambda *a: None, Stream=lambda: types.SimpleNamespace(
        wait_stream=lambda s: None), current_stream=lambda: types.SimpleNamespace(wait_stream=lambda s: None),
        stream=lambda s: nullcontext(), CUDAGraph=FakeGraph, graph=lambda g: nullcontext(),
        set_stream=lambda s: restored.append(s))
    restored = []
    monkeypatch.setattr(timing.torch, "cuda", fake)
    t = timing.eager(fn, 3, timing.Budget(0.1, 5, 100))
    assert t.median_ms == 2.0 and t.reps == 50 and set(calls) == {0, 1, 2}
    t = timing.graph(fn, 3, timing.Budget(0.0, 7, 7))
    assert t.median_ms == pytest.approx(2.0) and t.reps == 7          # per call: replay time / sets

    t = timing.host(fn, 3, timing.Budget(0.0, 4, 4))
    assert t.reps == 4 and t.median_ms < 1.0            # host wall time, not the fake device's 2 ms

    def capture_fails(g):           # e.g. a host sync inside the captured call
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(fake, "graph", capture_fails)
    with pytest.raises(RuntimeError, match="capturing"):
        timing.graph(fn, 3, timing.Budget(0.0, 7, 7))
    assert len(restored) == 1                                        # the caller's stream is put back


def test_rerun_selects_the_close_rows(tmp_path):
    rec = _record()                  # FlashQLA / ours: 1.5 on 1x32768 h2/8; no FlashQLA time on the other row
    rec["results"][0]["config"] = {"lengths": [32768], "varlen": False, "hk": 2, "hv": 8, "k_dim": 128,
                                   "v_dim": 128, "dtype": "bf16", "mode": "fwd"}
    report.write_json(rec, tmp_path / "old.json")
    got = cli.build_configs(cli.parse_args(["--rerun", str(tmp_path / "old.json"), "--below", "1.6"]))
    assert [c.label for c in got] == ["1x32768 h2/8"]        # a record older than the l2norm field
    for extra in (["--below", "1.03"], ["--preset", "quick"]):     # nothing left; shapes from two places
        with pytest.raises(ValueError):
            cli.build_configs(cli.parse_args(["--rerun", str(tmp_path / "old.json"), *extra]))


def test_merge_split_runs(tmp_path):
    a, b = _record(), _record()
    b["results"] = b["results"][:1]
    for name, rec in (("a", a), ("b", b)):
        report.write_json(rec, tmp_path / f"{name}.json")
    argv = ["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path), "--name", "all"]
    assert cli.main(argv) == 0
    merged = json.loads((tmp_path / "all.json").read_text())
    assert len(merged["results"]) == 3 and merged["settings"]["mode_label"] == "fwd"
    assert (tmp_path / "all.md").read_text().count("| 1x32768 h2/8 |") == 2
