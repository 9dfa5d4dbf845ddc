"""The selective-copying task of the Mamba paper, trained on two small models of the same size: a
selective one (the Mamba block: delta, B, C computed from the input) and a time-invariant one (LTI,
S4-like: delta, B, C fixed learned parameters, the block otherwise the same). Prints a table, writes JSON."""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import selective_scan  # noqa: E402
from selective_scan.nn import Mamba, MambaConfig, MambaLMHeadModel  # noqa: E402


@dataclass
class CopyConfig:
    """Task: ctx_len tokens of noise (token 0) holding n_data data tokens (1..n_colors) at random
    positions, then n_data markers (token n_colors + 1); the targets are the data tokens in order,
    read at the marker positions. Models: n_layer blocks of width d_model, state size d_state."""
    ctx_len: int = 24
    n_data: int = 4
    n_colors: int = 8
    d_model: int = 32
    n_layer: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_min: float = 0.01  # the dt_proj bias init range (Mamba's default is [0.001, 0.1]); both models
    dt_max: float = 0.2
    steps: int = 800
    batch: int = 64
    lr: float = 3e-3
    warmup: int = 30
    eval_size: int = 1024
    seed: int = 0
    threads: int = 1  # per model; 0: torch's default
    device: str = "cpu"


def make_batch(cfg: CopyConfig, batch: int, generator: torch.Generator):
    """(tokens (batch, ctx_len + n_data), targets (batch, n_data))."""
    pos = torch.rand(batch, cfg.ctx_len, generator=generator).argsort(dim=1)[:, :cfg.n_data].sort(dim=1).values
    data = torch.randint(1, cfg.n_colors + 1, (batch, cfg.n_data), generator=generator)
    tokens = torch.zeros(batch, cfg.ctx_len + cfg.n_data, dtype=torch.long)
    tokens.scatter_(1, pos, data)
    tokens[:, cfg.ctx_len:] = cfg.n_colors + 1
    return tokens, data


class LTIMamba(Mamba):
    """The Mamba block with the selection removed: delta = softplus(dt_bias), B and C are learned
    (d_inner, d_state) parameters, the same for every input and timestep (a time-invariant,
    S4D-real-like SSM). in_proj, the causal conv, the z gate, D, A and out_proj are unchanged."""

    def __init__(self, d_model: int, **kwargs):
        super().__init__(d_model, **kwargs)
        self.dt_bias = nn.Parameter(self.dt_proj.bias.detach().clone())  # the same dt init
        del self.x_proj, self.dt_proj
        self.B = nn.Parameter(torch.ones(self.d_inner, self.d_state))
        self.C = nn.Parameter(torch.randn(self.d_inner, self.d_state) * self.d_state ** -0.5)

    def forward(self, hidden_states, inference_params=None):
        seqlen = hidden_states.shape[1]
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
        x = self.act(self.conv1d(x)[..., :seqlen])
        delta = torch.zeros_like(x)  # delta = softplus(0 + dt_bias): constant in time and input
        y = self.scan(x, delta, self._A(), self.B, self.C, self.D.float(), z=z, delta_bias=self.dt_bias)
        return self.out_proj(y.transpose(1, 2))


def build_model(cfg: CopyConfig, selective: bool) -> MambaLMHeadModel:
    config = MambaConfig(d_model=cfg.d_model, n_layer=cfg.n_layer, vocab_size=cfg.n_colors + 2,
                         ssm_cfg=dict(d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                                      dt_min=cfg.dt_min, dt_max=cfg.dt_max),
                         pad_vocab_size_multiple=8)
    model = MambaLMHeadModel(config)
    if not selective:
        for i, layer in enumerate(model.backbone.layers):
            layer.mixer = LTIMamba(cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                                   dt_min=cfg.dt_min, dt_max=cfg.dt_max, layer_idx=i)
    return model


def _logits(model, tokens, n_data):
    return model(tokens, num_last_tokens=n_data).logits


@torch.no_grad()
def evaluate(model, cfg: CopyConfig, tokens, targets) -> float:
    model.eval()
    correct = 0
    for i in range(0, tokens.shape[0], 256):
        pred = _logits(model, tokens[i:i + 256], cfg.n_data).argmax(-1)
        correct += (pred == targets[i:i + 256]).sum().item()
    model.train()
    return correct / targets.numel()


def train_one(cfg: CopyConfig, selective: bool, log_every: int = 0) -> dict:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, selective).to(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    eval_tokens, eval_targets = make_batch(cfg, cfg.eval_size, torch.Generator().manual_seed(cfg.seed + 12345))
    eval_tokens, eval_targets = eval_tokens.to(cfg.device), eval_targets.to(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    loss_val = float("nan")
    curve = []
    for step in range(cfg.steps):
        tokens, targets = make_batch(cfg, cfg.batch, gen)
        tokens, targets = tokens.to(cfg.device), targets.to(cfg.device)
        logits = _logits(model, tokens, cfg.n_data)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_val = loss.item()
        if log_every and (step + 1) % log_every == 0:
            acc = evaluate(model, cfg, eval_tokens[:256], eval_targets[:256])
            curve.append((step + 1, loss_val, acc))
            print(f"  {'selective' if selective else 'LTI':9s} step {step + 1:5d} loss {loss_val:.4f} "
                  f"acc {acc:.3f} ({time.perf_counter() - t0:.1f} s)", flush=True)
    train_s = time.perf_counter() - t0
    acc = evaluate(model, cfg, eval_tokens, eval_targets)
    return {"model": "selective" if selective else "LTI", "params": n_params, "final_loss": loss_val,
            "accuracy": acc, "train_seconds": train_s, "ms_per_step": 1000 * train_s / max(cfg.steps, 1), "curve": curve}


def _train_worker(job) -> dict:
    cfg_dict, selective, log_every = job
    cfg = CopyConfig(**cfg_dict)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return train_one(cfg, selective, log_every)


def run(cfg: Optional[CopyConfig] = None, log_every: int = 0, workers: int = 0) -> dict:
    """Train both models on `cfg` and return {"config", "results": [selective, LTI], "machine", ...}.

    workers=2 trains the two models at once in two processes (each with cfg.threads threads);
    0 picks 2 on a CPU with at least two cores, else 1. Results do not depend on it."""
    cfg = cfg or CopyConfig()
    if workers <= 0:
        workers = 2 if (os.cpu_count() or 1) >= 2 and cfg.device == "cpu" else 1
    jobs = [(asdict(cfg), True, log_every), (asdict(cfg), False, log_every)]
    t0 = time.perf_counter()
    if workers >= 2:
        with mp.get_context("spawn").Pool(2) as pool:
            results = pool.map(_train_worker, jobs)
    else:
        results = [_train_worker(job) for job in jobs]
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "selective_scan": selective_scan.__version__, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
               "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    return {"config": asdict(cfg), "workers": workers, "results": results, "machine": machine,
            "chance_accuracy": 1.0 / cfg.n_colors, "wall_seconds": time.perf_counter() - t0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    for name, default in asdict(CopyConfig()).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    ap.add_argument("--log-every", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0, help="processes (1 or 2; 0: 2 on a multi-core CPU)")
    ap.add_argument("--out", type=str, default="")
    args = vars(ap.parse_args(argv))
    out, log_every, workers = args.pop("out"), args.pop("log_every"), args.pop("workers")
    cfg = CopyConfig(**args)
    report = run(cfg, log_every, workers)
    print(f"selective copying: {cfg.n_data} data tokens among {cfg.ctx_len} (vocab {cfg.n_colors}), "
          f"{cfg.n_layer} layers, d_model {cfg.d_model}, d_state {cfg.d_state}, {cfg.steps} steps of {cfg.batch}")
    print(f"{'model':10s} {'params':>8s} {'accuracy':>9s} {'loss':>8s} {'train s':>8s} {'ms/step':>8s}")
    for r in report["results"]:
        print(f"{r['model']:10s} {r['params']:8d} {r['accuracy']:9.3f} {r['final_loss']:8.4f} "
              f"{r['train_seconds']:8.1f} {r['ms_per_step']:8.1f}")
    print(f"chance {report['chance_accuracy']:.3f}; wall time {report['wall_seconds']:.1f} s "
          f"({report['workers']} process{'es' if report['workers'] > 1 else ''})")
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
