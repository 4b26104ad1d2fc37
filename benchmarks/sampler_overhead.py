"""The sampler's fixed cost per forward, before and after a change, in one run on one machine.

    python benchmarks/sampler_overhead.py --before /tmp/before --out
    benchmarks/results/sampler/sampler_overhead_cpu.json

`--before` is a checkout of the earlier code (e.g. `git worktree add /tmp/before 8c068c1`). Each
implementation runs in its own subprocess (a Python process imports one `onpolicy`), and the two take
turns `--rounds` times so machine noise hits both alike; medians are reported. The models have the
tiny recipe's shape (d256, 6 layers, vocab 2,048) with random weights: the cost of a forward does not
depend on what the weights learned, and decoding runs a fixed number of tokens (no EOS stop).
Measured per setting: ms per forward (model time / forwards), forwards, and tokens/s (batch 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

MEASURE = r'''
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
from onpolicy.model import DiffusionTransformer, DiffusionTransformerConfig
from onpolicy.sampling import SamplerConfig, generate
from onpolicy.tokenizer import SpecialTokens
special = SpecialTokens(pad=0, bos=1, eos=2, mask=3, sep=4, vocab_size=2048)
out = {}
for name, attention, block in (("ar", "causal", 1), ("block 4", "block_causal", 4),
                               ("block 32", "block_causal", 32)):
    torch.manual_seed(0)
    config = DiffusionTransformerConfig(vocab_size=2048, hidden_size=256, num_hidden_layers=6,
                                        num_attention_heads=4, attention=attention, block_size=block,
                                        mask_token_id=3)
    model = DiffusionTransformer(config).eval()
    cfg = SamplerConfig(max_new_tokens=96, block_size=block, stop_at_eos=False)
    prompt = [list(range(10, 90))]
    generate(model, prompt, special, cfg)  # warm-up
    runs = [generate(model, prompt, special, cfg) for _ in range(3)]
    tokens = sum(len(t.tokens[0]) for t in runs)
    out[name] = {"ms_per_forward": 1000 * sum(t.model_seconds for t in runs) / sum(t.forwards for t in runs),
                 "forwards": runs[0].forwards, "tokens_per_s": tokens / sum(t.seconds for t in runs),
                 "sampler_overhead": 1 - sum(t.model_seconds for t in runs) / sum(t.seconds for t in runs)}
print(json.dumps(out))
'''


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="checkout of the earlier code")
    p.add_argument("--after", default=str(Path(__file__).resolve().parent.parent),
                   help="checkout of the new code (default: this one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/sampler/sampler_overhead_cpu.json")
    args = p.parse_args()
    samples: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for which in ("before", "after"):
            path = getattr(args, which)
            res = subprocess.run([sys.executable, "-c", MEASURE, path, str(args.threads)],
                                 capture_output=True, text=True, check=True)
            samples[which].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {which}: "
                  + ", ".join(f"{k} {v['ms_per_forward']:.2f} ms/fwd" for k, v in samples[which][-1].items()),
                  flush=True)
    summary = {}
    for which, runs in samples.items():
        summary[which] = {name: {key: statistics.median(run[name][key] for run in runs)
                                 for key in runs[0][name]} for name in runs[0]}
    # paired by round (both ran back to back), then the median: robust to a slow round
    summary["after/before"] = {name: {key: statistics.median(a[name][key] / b[name][key] for a,
                                                             b in zip(samples["after"], samples["before"]))
                                      for key in samples["after"][0][name]} for name in samples["after"][0]}
    report = {"benchmark": "sampler fixed cost per forward", "threads": args.threads, "rounds": args.rounds,
              "model": "d256 x 6 layers, vocab 2048, random weights; 80-token prompt, 96 new tokens, batch "
                       "1, one token per step",
              "median": summary, "runs": samples}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    for name in summary["after"]:
        b, a, r = summary["before"][name], summary["after"][name], summary["after/before"][name]
        print(f"{name:9s} ms/forward {b['ms_per_forward']:.2f} -> {a['ms_per_forward']:.2f} "
              f"(x{r['ms_per_forward']:.2f})   forwards "
              f"{b['forwards']:.0f} -> {a['forwards']:.0f}   tokens/s {b['tokens_per_s']:.0f} -> "
              f"{a['tokens_per_s']:.0f} (x{r['tokens_per_s']:.2f})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
