"""``python -m flashdelta.bench.decode``: decode steps on a state pool, against FLA (Triton) and FlashInfer.

A decode step as a server runs it: B sequences of 1 (or a few) tokens, Qwen3-Next's raw gate
projections (A_log, dt_bias, sigmoid beta) and q/k l2-normalisation in the kernel, the state read
from and written back to a pool (flashdelta: slots named by ``state_indices``, in place; FlashInfer:
a dense state updated in place; FLA: a dense initial state and a new final state, the same bytes).
Per configuration it prints CUDA-graph time (what a server replays), the bytes one step must move
(the state read and written once, q/k/v/o), the achieved bandwidth and its share of this card's copy
bandwidth, measured in the same run. Outputs are checked against flashdelta's before timing.

    python -m flashdelta.bench.decode                                # the decode preset
    python -m flashdelta.bench.decode --batch 64,256 --heads 16/32 --pool fp32 --tokens 1
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import timing
from .environment import environment, short_name
from .roofline import measure

BATCHES = (1, 8, 64, 256, 512)
HEADS = ((4, 8), (16, 32), (16, 64))
POOLS = {"fp32": torch.float32, "bf16": torch.bfloat16}
D = 128


@dataclass(frozen=True)
class DecodeConfig:
    batch: int
    hk: int
    hv: int
    pool: str            # fp32 / bf16
    tokens: int          # per sequence

    @property
    def label(self) -> str:
        return f"B={self.batch} h{self.hk}/{self.hv} {self.pool} pool, {self.tokens} tok"

    def state_bytes(self) -> int:
        return self.batch * self.hv * D * D * POOLS[self.pool].itemsize * 2          # read + written

    def bytes(self) -> int:
        n = self.batch * self.tokens
        return self.state_bytes() + n * (2 * self.hk * D * 2 + 2 * self.hv * D * 2 + 2 * self.hv * 2)


def preset() -> list[DecodeConfig]:
    return [DecodeConfig(b, hk, hv, pool, t) for hk, hv in HEADS for b in BATCHES for pool in POOLS
            for t in (1, 4)]


def make_inputs(cfg: DecodeConfig, device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    B, T = cfg.batch, cfg.tokens

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=device) * scale
    # the raw gate projections in bf16, as a model produces them (FlashInfer takes them so)
    x = dict(q=rnd(B, T, cfg.hk, D).bfloat16(), k=rnd(B, T, cfg.hk, D).bfloat16(), v=rnd(B, T, cfg.hv, D).bfloat16(),
             a=rnd(B, T, cfg.hv).bfloat16(), b=rnd(B, T, cfg.hv).bfloat16(), A_log=rnd(cfg.hv, scale=0.5),
             dt_bias=rnd(cfg.hv, scale=0.5))
    slots = 2 * B                                     # half the pool idle, the slots in random order
    x["pool"] = rnd(slots, cfg.hv, D, D, scale=0.1).to(POOLS[cfg.pool])              # V-major [.., V, K]
    x["rows"] = torch.randperm(slots, generator=gen, device=device)[:B].to(torch.int32)
    x["dense"] = x["pool"][x["rows"].long()].float()  # the same states for the dense-state peers
    return x


def flashdelta_step(x, cfg, v_tile: int | None = None):
    """Our step; ``v_tile``: the decode kernel's V tile for this step (default: the tuning table's)."""
    from flashdelta import fused_recurrent_gated_delta_rule
    from flashdelta.gated_delta_rule.planner import TUNING

    def step():
        chosen = TUNING["decode_v_tile"]
        TUNING["decode_v_tile"] = v_tile or chosen
        try:
            return fused_recurrent_gated_delta_rule(
                x["q"], x["k"], x["v"], x["a"], beta=x["b"], initial_state=x["pool"], state_indices=x["rows"],
                use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=x["A_log"], dt_bias=x["dt_bias"],
                use_beta_sigmoid_in_kernel=True, state_v_first=True)[0]
        finally:
            TUNING["decode_v_tile"] = chosen
    return step


def fla_step(x, cfg):
    if cfg.pool != "fp32":
        return None, "FLA keeps fp32 states only"
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
    h0 = x["dense"]
    return (lambda: fused_recurrent_gated_delta_rule(
        x["q"], x["k"], x["v"], x["a"], beta=x["b"], initial_state=h0, output_final_state=True,
        use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=x["A_log"], dt_bias=x["dt_bias"],
        use_beta_sigmoid_in_kernel=True, state_v_first=True)[0]), None


def flashinfer_step(x, cfg):
    if cfg.tokens != 1:
        return None, "FlashInfer's pretranspose decode takes one token per sequence"
    import flashinfer.gdn_decode as gd
    state = x["dense"].to(POOLS[cfg.pool]).contiguous()
    return (lambda: gd.gated_delta_rule_decode_pretranspose(x["q"], x["k"], x["v"], state, x["A_log"], x["a"],
                                                            x["dt_bias"], x["b"], use_qk_l2norm=True)[0]), None


PEERS = {"fla": fla_step, "flashinfer": flashinfer_step}


def measure_config(cfg: DecodeConfig, peers, device, copy_bw: float, budget: timing.Budget,
                   v_tiles: tuple[int, ...] = ()) -> dict:
    """``v_tiles``: our decode kernel's V tiles to time besides the tuning table's ("flashdelta BV=t")."""
    x = make_inputs(cfg, device)
    result = {"label": cfg.label, "config": asdict(cfg), "bytes": cfg.bytes(), "impls": {}}
    steps = {"flashdelta": (flashdelta_step(x, cfg), None)}
    steps.update({f"flashdelta BV={t}": (flashdelta_step(x, cfg, t), None) for t in v_tiles})
    for name in peers:
        try:
            steps[name] = PEERS[name](x, cfg)
        except Exception as err:                 # a peer that is missing or refuses is a result
            steps[name] = (None, f"{type(err).__name__}: {str(err)[:160]}")
    fresh = {k: x[k].clone() for k in ("pool", "dense")}
    reference = None
    for name, (step, reason) in steps.items():
        entry = result["impls"][name] = {}
        if step is None:
            entry["skipped"] = reason
            continue
        try:
            x["pool"].copy_(fresh["pool"])
            x["dense"].copy_(fresh["dense"])
            out = step().float().reshape(cfg.batch, cfg.tokens, cfg.hv, D)
            if reference is None:
                reference = out
            else:
                entry["rel_err"] = ((out - reference).norm() / reference.norm()).item()
            t = timing.graph(lambda i: step(), 1, budget)
        except Exception as err:
            entry["failed"] = f"{type(err).__name__}: {str(err)[:160]}"
            continue
        us = t.median_ms * 1e3
        entry.update(us=us, tb_s=cfg.bytes() / (us * 1e-6) / 1e12, of_copy=cfg.bytes() / (us * 1e-6) / copy_bw)
    return result


def _cell(e: dict) -> str:
    return f"{e['us']:.1f} | {e['of_copy'] * 100:.0f}%" if "us" in e else "- | -"


def markdown(record: dict) -> str:
    env = record["environment"]
    lines = [f"# Decode on {env['device_name']} ({env['date']})", "",
             f"Command: `{env['command']}`; copy bandwidth {record['copy_tb_s']:.2f} TB/s (read + written).", "",
             "| config | flashdelta µs | TB/s | of copy | FLA µs | of copy | FlashInfer µs | of copy | FlashInfer / ours |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in record["results"]:
        ours, fla, fi = (r["impls"].get(n, {}) for n in ("flashdelta", "fla", "flashinfer"))
        ratio = f"{fi['us'] / ours['us']:.2f}x" if "us" in fi and "us" in ours else "-"
        lines.append(f"| {r['label']} | {ours['us']:.1f} | {ours['tb_s']:.2f} | {ours['of_copy'] * 100:.0f}% | "
                     f"{_cell(fla)} | {_cell(fi)} | {ratio} |" if "us" in ours else f"| {r['label']} | failed: "
                     f"{ours.get('failed')} |")
    tiles = sorted({n for r in record["results"] for n in r["impls"] if n.startswith("flashdelta BV=")})
    if tiles:                        # our other V tiles, same run
        lines += ["", "| config | " + " | ".join(f"{n} µs | of copy" for n in tiles) + " |",
                  "|---|" + "---|---|" * len(tiles)]
        for r in record["results"]:
            lines.append(f"| {r['label']} | " + " | ".join(_cell(r["impls"].get(n, {})) for n in tiles) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default=None, help="comma list (default: the preset's)")
    p.add_argument("--heads", default=None, help="hk/hv pairs, e.g. 16/32,4/8")
    p.add_argument("--pool", default=None, help="fp32,bf16")
    p.add_argument("--tokens", default=None, help="tokens per sequence, e.g. 1,4")
    p.add_argument("--peers", default="fla,flashinfer", help="comma list of fla, flashinfer; 'none' for none")
    p.add_argument("--budget", type=float, default=0.2, help="seconds per measurement")
    p.add_argument("--v-tiles", default="", help="our decode kernel's V tiles to time besides the default, e.g. 8")
    p.add_argument("--out", default="bench-out", help="results directory")
    p.add_argument("--name", default=None, help="file stem (default <GPU>-decode)")
    return p.parse_args(argv)


def select(args) -> list[DecodeConfig]:
    configs = preset()
    if args.batch:
        keep = {int(b) for b in args.batch.split(",")}
        configs = [c for c in configs if c.batch in keep] or [DecodeConfig(b, *HEADS[1], "fp32", 1) for b in keep]
    if args.heads:
        pairs = {tuple(int(x) for x in h.split("/")) for h in args.heads.split(",")}
        configs = [c for c in configs if (c.hk, c.hv) in pairs] or \
            [DecodeConfig(c.batch, hk, hv, c.pool, c.tokens) for c in configs for hk, hv in sorted(pairs)]
    if args.pool:
        configs = [c for c in configs if c.pool in args.pool.split(",")]
    if args.tokens:
        configs = [c for c in configs if str(c.tokens) in args.tokens.split(",")]
    return sorted(set(configs), key=lambda c: (c.hv, c.hk, c.batch, c.pool, c.tokens))


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("the decode benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    peers = [] if args.peers == "none" else [p for p in args.peers.split(",") if p]
    copy_bw = measure(device).bandwidth
    budget = timing.Budget(args.budget)
    record = {"environment": environment(device, "python -m flashdelta.bench.decode " + " ".join(argv or sys.argv[1:])),
              "copy_tb_s": copy_bw / 1e12, "results": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{short_name(record['environment']['device_name'])}-decode"
    for cfg in select(args):
        result = measure_config(cfg, peers, device, copy_bw, budget,
                                tuple(int(t) for t in args.v_tiles.split(",") if t))
        record["results"].append(result)
        # written after every configuration, so a run cut short still leaves its numbers
        (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
        (out / f"{stem}.md").write_text(markdown(record))
        print(f"{cfg.label:36s} " + "  ".join(f"{n} {e['us']:.1f} us ({e['of_copy'] * 100:.0f}%)" if "us" in e
                                              else f"{n} {e.get('skipped') or e.get('failed')}"
                                              for n, e in result["impls"].items()), flush=True)
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
