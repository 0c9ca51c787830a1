"""Does a control variate cut the variance of typicality draws? (docs/benchmarks.md, "Typicality engine")

    python bench/bench_control_variate.py [--images 32] [--draws 100]

Per draw, with delta = eps_c - eps_null and the null model's residual r = eps - eps_null,

    L_null - L_c = 2 delta . r - |delta|^2        (channel means, per location)

The noise in 2 delta . eps can be cancelled by c = 2 delta_hat . eps, where delta_hat comes from
*other* draws (the `width` draws nearest in t), so it is independent of this draw's eps and
E[c] = 0: d - beta c keeps the exact mean. Printed: the variance ratio (plain / with the control
variate) of the image-level score and of the per-location map, for beta = 1 and a per-image
regression beta, and the correlation of c with the term it should cancel. Uses bench_typicality's
model (Animal-MNIST, "small", 400 steps; trained and cached on first use) and its held-out images,
the paper's draws (100 i.i.d., t in [100, 700)).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from bench_typicality import ANIMALS, animal_mnist, trained_model  # noqa: E402


def draws(model, x0, conditions, n: int, seed: int = 0):
    """Per draw: d [B, N, h, w], delta [B, N, C, h, w], eps [N, C, h, w], t [N] (paper's draws)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(100, 700, (n,), generator=g)
    eps = torch.randn((n, *x0.shape[1:]), generator=g)
    batch = len(x0)
    null = model.null_condition(batch)
    d = torch.zeros(batch, n, *x0.shape[2:])
    delta = torch.zeros(batch, n, *x0.shape[1:])
    with torch.inference_mode():
        for k in range(n):
            noisy = model.scheduler.add_noise(x0, eps[k].expand_as(x0), t[k].expand(batch))
            prediction = model.predict_noise(torch.cat([noisy, noisy]), t[k].expand(2 * batch),
                                             torch.cat([null, conditions]))
            p_null, p_label = prediction[:batch], prediction[batch:]
            d[:, k] = ((p_null - eps[k]) ** 2).mean(1) - ((p_label - eps[k]) ** 2).mean(1)
            delta[:, k] = p_label - p_null
    return d, delta, eps, t


def neighbours_delta(delta, t, width: int):
    """delta_hat for each draw: the mean delta of the `width` draws nearest in t, itself excluded."""
    out = torch.zeros_like(delta)
    for k in range(len(t)):
        distance = (t - t[k]).abs().float()
        distance[k] = float("inf")
        out[:, k] = delta[:, distance.argsort()[:width]].mean(1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--held-out", type=int, default=96, help="bench_typicality's --images")
    parser.add_argument("--model-dir", default="/tmp/diffmine-bench")
    args = parser.parse_args()
    images, labels = animal_mnist()
    cached = argparse.Namespace(model_dir=args.model_dir, train_steps=400, seed=0)
    model, _ = trained_model(images[: -args.held_out], labels[: -args.held_out], cached)
    model.eval()
    x0 = images[-args.images:]
    conditions = F.one_hot(labels[-args.images:], len(ANIMALS)).float()
    d, delta, eps, t = draws(model, x0, conditions, args.draws)
    score = d.mean((2, 3))
    cancelled = (2 * delta * eps[None]).mean((2, 3, 4))  # the term the control variate targets
    print("| delta_hat from | score var ratio, beta 1 | score var ratio, fitted beta | map var ratio, beta 1 "
          "| corr(c, 2 delta.eps) |\n|---|---:|---:|---:|---:|")
    for width in (1, 2, 4, 8, 16, args.draws - 1):
        control_map = (2 * neighbours_delta(delta, t, width) * eps[None]).mean(2)  # [B, N, h, w]
        control = control_map.mean((2, 3))
        centred_s, centred_c = score - score.mean(1, keepdim=True), control - control.mean(1, keepdim=True)
        beta = (centred_s * centred_c).sum(1) / centred_c.pow(2).sum(1)
        ratio = lambda a, b: float(a.var(1).mean() / b.var(1).mean())  # noqa: E731
        correlation = float(torch.corrcoef(torch.stack([cancelled.flatten(), control.flatten()]))[0, 1])
        print(f"| {width} nearest draws | {ratio(score, score - control):.2f} | "
              f"{ratio(score, score - beta[:, None] * control):.2f} | {ratio(d, d - control_map):.2f} | "
              f"{correlation:.2f} |", flush=True)


if __name__ == "__main__":
    main()
