"""The decode benchmark's host side: configuration selection, byte counts and the table (no GPU)."""
from flashdelta.bench import decode


def test_selection_and_bytes():
    args = decode.parse_args(["--batch", "64", "--heads", "16/32", "--pool", "fp32,bf16", "--tokens", "1"])
    configs = decode.select(args)
    assert [c.label for c in configs] == ["B=64 h16/32 bf16 pool, 1 tok", "B=64 h16/32 fp32 pool, 1 tok"]
    fp32 = next(c for c in configs if c.pool == "fp32")
    assert fp32.state_bytes() == 64 * 32 * 128 * 128 * 4 * 2
    assert fp32.bytes() > fp32.state_bytes()
    assert len(decode.preset()) == len(decode.BATCHES) * len(decode.HEADS) * 2 * 2


def test_markdown_table():
    record = {"environment": {"device_name": "NVIDIA H100", "date": "2026-12-07", "command": "x"},
              "copy_tb_s": 3.0,
              "results": [{"label": "B=64 h16/32 fp32 pool, 1 tok",
                           "impls": {"flashdelta": {"us": 100.0, "tb_s": 2.7, "of_copy": 0.9},
                                     "fla": {"us": 110.0, "tb_s": 2.4, "of_copy": 0.8},
                                     "flashinfer": {"skipped": "not installed"}}}]}
    text = decode.markdown(record)
    assert "| B=64 h16/32 fp32 pool, 1 tok | 100.0 | 2.70 | 90% | 110.0 | 80% | - | - | - |" in text


def test_other_v_tiles_get_their_own_table():
    args = decode.parse_args(["--v-tiles", "8"])
    assert args.v_tiles == "8"
    record = {"environment": {"device_name": "NVIDIA H100", "date": "2026-12-08", "command": "x"},
              "copy_tb_s": 3.0,
              "results": [{"label": "B=64 h16/32 fp32 pool, 1 tok",
                           "impls": {"flashdelta": {"us": 100.0, "tb_s": 2.7, "of_copy": 0.9},
                                     "flashdelta BV=8": {"us": 80.0, "tb_s": 3.3, "of_copy": 0.95}}}]}
    text = decode.markdown(record)
    assert "| config | flashdelta BV=8 µs | of copy |" in text
    assert "| B=64 h16/32 fp32 pool, 1 tok | 80.0 | 95% |" in text


def test_a_step_on_another_v_tile_leaves_the_table_as_it_was(monkeypatch):
    from flashdelta.gated_delta_rule import planner
    seen = []
    monkeypatch.setattr("flashdelta.fused_recurrent_gated_delta_rule",
                        lambda *a, **k: seen.append(planner.TUNING["decode_v_tile"]) or (None,))
    before = planner.TUNING["decode_v_tile"]
    decode.flashdelta_step({n: None for n in ("q", "k", "v", "a", "b", "pool", "rows", "A_log", "dt_bias")},
                           None, 8)()
    assert seen == [8] and planner.TUNING["decode_v_tile"] == before
