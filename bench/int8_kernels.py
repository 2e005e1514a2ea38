"""Which int8 path is fast on this CPU: the ranker's linear layers at a ranking batch's shape.

    python bench/int8_kernels.py [--tokens 2240] [--threads 1] [--compile]

Times SmolLM2-135M's MLP shapes (576 → 1,536 → 576, four pairs) on `--tokens` rows (a batch
of 8 prompts of ~280 tokens) in fp32, torchao's weight-only int8 (what `--int8` serves),
torchao's dynamic int8 (int8 activations too) and, for reference, the deprecated
torch.ao.quantization dynamic int8 on fbgemm's kernels; each with its largest output error
relative to fp32. `--compile` also times torchao's dynamic int8 under torch.compile (slow to
compile). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
import warnings

import torch


def timed(model, x, repeats: int) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        y = model(x)                                      # warm-up: weights are packed lazily
        t0 = time.perf_counter()
        for _ in range(repeats):
            y = model(x)
    return (time.perf_counter() - t0) / repeats, y


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2240)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                      quantize_)
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [torch.nn.Linear(576, 1536), torch.nn.Linear(1536, 576)]
    fp32 = torch.nn.Sequential(*layers).eval()
    x = torch.randn(args.tokens, 576)
    base_s, ref = timed(fp32, x, args.repeats)
    rows = {"fp32": {"seconds": base_s}}

    def record(name, model):
        s, y = timed(model, x, args.repeats)
        rows[name] = {"seconds": s, "speedup": base_s / s,
                      "max_rel_error": float((y - ref).abs().max() / ref.abs().max())}

    wo = copy.deepcopy(fp32)
    quantize_(wo, Int8WeightOnlyConfig(set_inductor_config=False))
    record("torchao weight-only int8", wo)
    dyn = copy.deepcopy(fp32)
    quantize_(dyn, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    record("torchao dynamic int8", dyn)
    if args.compile:
        record("torchao dynamic int8, compiled", torch.compile(dyn))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                   # its deprecation warning: the point
        from torch.ao.quantization import quantize_dynamic
        legacy = quantize_dynamic(copy.deepcopy(fp32), {torch.nn.Linear}, dtype=torch.qint8)
    record("torch.ao dynamic int8 (deprecated, fbgemm)", legacy)
    print(json.dumps({"tokens": args.tokens, "threads": args.threads, "torch": torch.__version__,
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
