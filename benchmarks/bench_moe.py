"""Fast expert-choice MoE (`microdit.moe`) vs the one-hot einsum formulation of the released code.

One forward + backward of a single MoE layer at MicroDiT_XL_2 widths, on the same weights and
inputs, timed alternately in one process; peak memory of one forward + backward measured per
variant (CUDA: max_memory_allocated; CPU: growth of the peak RSS, each variant in a fresh subprocess).

    python benchmarks/bench_moe.py                       # CPU, float32, block 13, T = 256 and 1024
    python benchmarks/bench_moe.py --device cuda --bf16  # GPU, bf16 autocast
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_moe import one_hot_expert_choice  # noqa: E402

from microdit.models import MicroDiT_XL_2  # noqa: E402
from microdit.moe import ExpertChoiceMoE  # noqa: E402


def xl_moe_widths(block: str) -> tuple[int, int]:
    """(dim, hidden) of an XL MoE block: "13" is backbone block 13, "mixer" the mixer's MoE."""
    with torch.device("meta"):
        xl = MicroDiT_XL_2()
    mlp = xl.patch_mixer[1].mlp if block == "mixer" else xl.blocks[int(block)].mlp
    if not isinstance(mlp, ExpertChoiceMoE):
        raise SystemExit(f"block {block} of MicroDiT_XL_2 is dense; MoE blocks are 1, 3, ..., 25 and 'mixer'")
    return mlp.dim, mlp.hidden_dim


def setup(args, block: str, tokens: int):
    torch.manual_seed(0)
    dim, hidden = xl_moe_widths(block)
    moe = ExpertChoiceMoE(dim, hidden, num_experts=8, capacity=2.0).to(args.device)
    x = torch.randn(args.batch, tokens, dim, device=args.device, requires_grad=True)
    upstream = torch.randn(args.batch, tokens, dim, device=args.device)
    fast = lambda: moe(x)  # noqa: E731
    ref = lambda: one_hot_expert_choice(x, moe.gate.weight, moe.w1, moe.w2, moe.capacity)  # noqa: E731
    return moe, x, upstream, {"fast": fast, "one-hot": ref}


def step(fn, moe, x, upstream, bf16: bool, device: str) -> None:
    ctx = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if bf16 else nullcontext()
    with ctx:
        out = fn()
    (out.float() * upstream).sum().backward()
    x.grad = None
    moe.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_both(args, block: str, tokens: int) -> dict[str, float]:
    moe, x, upstream, variants = setup(args, block, tokens)
    times = {name: [] for name in variants}
    for name, fn in variants.items():  # warm-up
        step(fn, moe, x, upstream, args.bf16, args.device)
    for _ in range(args.repeats):  # alternate so background load hits both alike
        for name, fn in variants.items():
            sync(args.device)
            start = time.perf_counter()
            step(fn, moe, x, upstream, args.bf16, args.device)
            sync(args.device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def peak_memory(args, block: str, tokens: int, variant: str) -> float:
    """Bytes of extra memory at the peak of one forward + backward (activations, weight gradients)
    beyond inputs and weights."""
    if args.device.startswith("cuda"):
        moe, x, upstream, variants = setup(args, block, tokens)
        step(variants[variant], moe, x, upstream, args.bf16, args.device)  # warm-up (cuBLAS workspace etc.)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(variants[variant], moe, x, upstream, args.bf16, args.device)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # CPU: a fresh process per variant, so the peak RSS is this variant's alone.
    cmd = [sys.executable, __file__, "--_rss", variant, "--tokens", str(tokens), "--batch", str(args.batch),
           "--block", block, "--threads", str(args.threads)] + (["--bf16"] if args.bf16 else [])
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip())


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_child(args) -> None:
    moe, x, upstream, variants = setup(args, args.block[0], args.tokens[0])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak-RSS mark (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    step(variants[args._rss], moe, x, upstream, args.bf16, args.device)
    print(max(_status_kib("VmHWM") - before, 0) * 1024)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024], help="tokens per sample (256 = 256 px, 1024 = 512 px)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--block", nargs="+", default=["13"], help="XL MoE blocks whose widths to use: 1, 3, ..., 25, or 'mixer'")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU runs)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--_rss", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args._rss:
        return rss_child(args)

    print(f"MoE layer fwd+bwd vs one-hot reference: 8 experts, capacity 2, batch {args.batch}, "
          f"{args.device}{' bf16 autocast' if args.bf16 else ' fp32'}, threads {args.threads}, median of {args.repeats}")
    print(f"{'block':>6} {'dim':>5} {'hidden':>6} {'T':>5} {'fast s':>8} {'one-hot s':>9} {'speedup':>8} "
          f"{'fast MiB':>9} {'one-hot MiB':>11} {'mem ratio':>9}")
    rows = []
    for block in args.block:
        dim, hidden = xl_moe_widths(block)
        for tokens in args.tokens:
            t = time_both(args, block, tokens)
            mem = {v: peak_memory(args, block, tokens, v) for v in ("fast", "one-hot")}
            row = dict(block=block, dim=dim, hidden=hidden, tokens=tokens, fast_s=t["fast"], onehot_s=t["one-hot"],
                       speedup=t["one-hot"] / t["fast"], fast_mib=mem["fast"] / 2**20, onehot_mib=mem["one-hot"] / 2**20,
                       memory_ratio=mem["one-hot"] / max(mem["fast"], 1))
            rows.append(row)
            print(f"{block:>6} {dim:>5} {hidden:>6} {tokens:>5} {row['fast_s']:>8.3f} {row['onehot_s']:>9.3f} "
                  f"{row['speedup']:>7.2f}x {row['fast_mib']:>9.1f} {row['onehot_mib']:>11.1f} {row['memory_ratio']:>8.2f}x",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps({"batch": args.batch, "device": args.device, "bf16": args.bf16,
                                         "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
