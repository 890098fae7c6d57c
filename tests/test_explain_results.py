"""scripts/explain_results.py: the traffic model of our passes and the table it draws from results."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("explain_results", ROOT / "scripts" / "explain_results.py")
explain = importlib.util.module_from_spec(spec)
spec.loader.exec_module(explain)


def config(lengths, hk, hv):
    return {"lengths": list(lengths), "tokens": sum(lengths), "hk": hk, "hv": hv}


def test_unsplit_passes_count_every_tensor_once():
    moved = explain.pass_bytes(config([32768], 2, 8), None)
    # prep: k (256 B / token / q-k head), g + beta (8), Ag (128) and factors (32) per value head
    assert moved["prep"] == 32768 * (2 * 256 + 8 * (8 + 128 + 32))
    # recurrence: q and k, then v, Ag, factors and o per value head, plus h0 and the final state
    assert moved["recurrence"] == 32768 * (2 * 512 + 8 * (256 + 128 + 32 + 256)) + 2 * 8 * 128 * 128 * 4


def test_context_parallel_adds_its_passes():
    cfg = config([32768], 2, 8)
    unsplit, split = explain.pass_bytes(cfg, None), explain.pass_bytes(cfg, 32)
    assert set(split) == {"prep", "warm-up", "scan", "output pass"}
    assert split["prep"] == unsplit["prep"]
    assert split["output pass"] > unsplit["recurrence"] and split["warm-up"] > 0 and split["scan"] > 0
    # the in-kernel l2-norm makes prep read q too
    assert explain.pass_bytes(cfg, 32, l2norm=True)["prep"] - split["prep"] == 32768 * 2 * 256


def test_segment_length_from_the_reported_path():
    assert explain.segment_chunks_of("tilelang, context parallel: 16 segments of 32 chunks, V tile 128") == 32
    assert explain.segment_chunks_of("tilelang, unsplit, V tile 64") is None


def test_table_lists_only_rows_below_the_target(monkeypatch, capsys):
    record = ROOT / "benchmarks" / "results" / "H100-fwd-hv16.json"
    monkeypatch.setattr("sys.argv", ["explain_results.py", str(record), "--target", "1.2"])
    explain.main()
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "config" not in line]
    ratios = [float(line.split("|")[4]) for line in table]
    assert table and all(r <= 1.2 for r in ratios)         # printed to two decimals
