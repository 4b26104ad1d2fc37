"""Memory at scale, measured on this machine's CPU: gradient checkpointing and memory-mapped corpora.

    python benchmarks/memory.py --out benchmarks/results/memory/memory_cpu.json

1. Gradient checkpointing: peak resident memory of one BD3 training forward + backward (the tiny
   recipe's model shape, a long batch so activations dominate), with and without recomputation,
   each in a fresh process (peak RSS, `ru_maxrss`, minus the process's RSS before the forward).
2. The corpus: a training process's private memory (RssAnon) after loading a corpus and reading
   200 random micro-batches from it, for corpora of growing size, as today's memory-mapped shards
   (`TokenArray`) and as the int64 tensor in memory that the corpus used to be (`torch.load`).
   Shared, evictable page-cache pages of the mapped file are reported apart (RssFile).
Each measurement runs in its own subprocess, so no process's allocator history leaks into another.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHECKPOINTING = r"""
import json, resource, sys, torch
torch.set_num_threads(2)
from onpolicy.model import DiffusionTransformer, DiffusionTransformerConfig
recompute, batch, seq = sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
config = DiffusionTransformerConfig(vocab_size=2048, hidden_size=256, num_hidden_layers=6,
                                    num_attention_heads=4, block_size=32, mask_token_id=3)
model = DiffusionTransformer(config).train()
model.gradient_checkpointing = recompute
ids = torch.randint(5, 2048, (batch, seq))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss = model(ids, clean_input_ids=ids).logits.float().logsumexp(-1).mean()
loss.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mb": peak / 1024, "before_mb": before / 1024, "step_mb": (peak - before) / 1024,
                  "grad_norm": float(torch.stack([p.grad.norm() for p in model.parameters()]).norm())}))
"""

CORPUS = r"""
import json, sys, torch
torch.set_num_threads(1)
from onpolicy.data.corpus import TokenArray
from onpolicy.trainers.common import batch_rows
kind, path, rows, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}

base = status()
data = torch.load(path, weights_only=True) if kind == "tensor" else TokenArray(path, rows, seq, "uint16")
checksum = 0
for step in range(200):
    checksum += int(data[batch_rows(step, 0, 0, 1, 16, 1, rows, 0)].sum())
now = status()
print(json.dumps({"anon_mb": now["RssAnon"] - base["RssAnon"], "file_mb": now["RssFile"] - base["RssFile"],
                  "checksum": checksum}))
"""


def run(code: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--corpus-rows", type=int, nargs="+", default=[20_000, 80_000, 320_000])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    import torch

    results = {"gradient_checkpointing": {}, "corpus": []}
    for recompute in (False, True):
        results["gradient_checkpointing"]["on" if recompute else "off"] = run(CHECKPOINTING, int(recompute),
                                                                              args.batch, args.seq)
    gc = results["gradient_checkpointing"]
    gc["step_memory_ratio_on_over_off"] = round(gc["on"]["step_mb"] / gc["off"]["step_mb"], 3)
    gc["shape"] = {"batch": args.batch, "seq": args.seq,
                   "model": "d256 x 6 layers, vocab 2048 (tiny recipe), BD3 (2L)"}
    print("gradient checkpointing:", json.dumps(gc))

    seq = 256
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.corpus_rows:
            tokens = torch.randint(0, 2048, (rows, seq), generator=torch.Generator().manual_seed(0))
            pt, shard = Path(tmp, f"{rows}.pt"), Path(tmp, f"{rows}.bin")
            torch.save(tokens, pt)
            from onpolicy.data.corpus import TokenArray

            TokenArray.write(shard, tokens, 2048)
            del tokens
            tensor, mapped = run(CORPUS, "tensor", pt, rows, seq), run(CORPUS, "shards", shard, rows, seq)
            assert tensor["checksum"] == mapped["checksum"], "the two corpora gave different batches"
            row = {"rows": rows, "tokens": rows * seq, "int64_mb": rows * seq * 8 / 2**20,
                   "shard_mb": rows * seq * 2 / 2**20, "tensor_anon_mb": round(tensor["anon_mb"], 1),
                   "shards_anon_mb": round(mapped["anon_mb"], 1),
                   "shards_file_mb": round(mapped["file_mb"], 1)}
            results["corpus"].append(row)
            print("corpus:", json.dumps(row))
            pt.unlink()
            shard.unlink()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
