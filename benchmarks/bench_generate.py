"""Generation speed of the Mamba language model (selective_scan.nn.MambaLMHeadModel, random weights):
time per generated token with the cache, eagerly and with the decode step replayed as a CUDA graph
(`generate(..., cuda_graph=True)`). A token's time is (T(1 + n) - T(1)) / n, T(k) being the
median wall time of a greedy `generate` of k tokens (the prefill and the first token in T(1)); the
graph's capture, once per call, is part of T(1 + n) and also timed alone. Prints a table, writes
JSON (--out). On the CPU it times the eager steps only."""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import bench_scan
from selective_scan.nn import DecodeStepGraph, InferenceParams, MambaConfig, MambaLMHeadModel

# mamba-130m's shape (d_model 768, 24 layers, GPT-NeoX vocabulary)
CONFIG_130M = dict(d_model=768, n_layer=24, vocab_size=50277, ssm_cfg=dict(d_state=16))


def median_seconds(fn, reps, sync):
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--prompt", type=int, default=16, help="prompt length")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated after the first")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="a 2-layer model of width 64 (for tests)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = dict(d_model=64, n_layer=2, vocab_size=512, ssm_cfg=dict(d_state=16)) if args.small else CONFIG_130M
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(**config), device=device, dtype=dtype).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    modes = ["eager"] + (["cuda_graph"] if device.type == "cuda" else [])
    records = []
    print(f"generation, {config['n_layer']} layers, d_model {config['d_model']}, {dtype} on {device}: "
          f"prompt {args.prompt}, {args.tokens} tokens after the first, median of {args.reps}")
    for batch in (int(b) for b in args.batches.split(",")):
        ids = torch.randint(0, config["vocab_size"], (batch, args.prompt), device=device)
        for mode in modes:
            graph = mode == "cuda_graph"
            run = lambda n: model.generate(ids, n, temperature=0, cuda_graph=graph)  # noqa: E731
            run(3)  # warm-up
            first = median_seconds(lambda: run(1), args.reps, sync)
            whole = median_seconds(lambda: run(1 + args.tokens), args.reps, sync)
            rec = dict(batch=batch, mode=mode, prompt=args.prompt, tokens=args.tokens,
                       first_token_ms=first * 1e3, per_token_ms=(whole - first) / args.tokens * 1e3)
            if graph:
                def capture():
                    params = InferenceParams(max_seqlen=args.prompt + 2, max_batch_size=batch)
                    with torch.no_grad():
                        model(ids, inference_params=params)
                        params.seqlen_offset = args.prompt
                        DecodeStepGraph(model, params, ids[:, -1:])
                rec["capture_and_prefill_ms"] = median_seconds(capture, args.reps, sync) * 1e3
            records.append(rec)
            extra = f", capture + prefill {rec['capture_and_prefill_ms']:.1f} ms" if graph else ""
            print(f"  batch {batch:4d} {mode:10s} per token {rec['per_token_ms']:8.3f} ms, "
                  f"prompt + first token {rec['first_token_ms']:.1f} ms{extra}")
    if args.out:
        machine = bench_scan.machine_info(args.device)
        for key in ("peak_mem", "fwd", "bwd", "fwdbwd"):
            machine.pop(key, None)
        machine["timing"] = "wall clock (time.perf_counter) around whole generate calls, synchronised"
        with open(args.out, "w") as f:
            json.dump(dict(machine=machine, config=config, dtype=str(dtype).replace("torch.", ""),
                           records=records), f, indent=1)
    return records


if __name__ == "__main__":
    main()
