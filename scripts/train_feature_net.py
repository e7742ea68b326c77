"""Train msfp's feature network (a small Fashion-MNIST CNN) and compute its reference statistics.

Retrain the shipped files with:

    python scripts/train_feature_net.py --out src/msfp/assets/feature_net

which gives them back bit for bit only with the same torch version and CPU instruction set (``cpu_capability`` in
a new run's ``train_log.json``; the shipped log predates it); elsewhere the accuracy and FD floor differ slightly (see
the model card).

Writes ``model.safetensors``, ``config.json``, ``reference_stats.safetensors`` (mean and covariance of the
penultimate features over the 10,000 test images and over 10,000 seeded-random training images) and
``train_log.json``, all four together, atomically; other files in ``--out`` (the model card) are kept. CPU only,
seeded, single-threaded by default so it can run next to other jobs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from safetensors.torch import save_file

from msfp.data import load_fashion_mnist, to_model_range
from msfp.environment import HelpFormatter, check_minimums, check_positive, command_line, machine_info
from msfp.fileio import atomic_directory
from msfp.feature_net import CONFIG_NAME, STATS_NAME, WEIGHTS_NAME, FeatureNet, compute_features
from msfp.metrics import feature_stats, frechet_distance


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", default=None,
                   help="directory with the Fashion-MNIST IDX files (unset: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", default="runs/feature_net",
                   help="output directory: weights, config, reference statistics, train_log.json (the shipped one: "
                   "src/msfp/assets/feature_net, named explicitly so that a trial run never replaces it)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training split")
    p.add_argument("--batch", type=int, default=128, help="images per training step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (one-cycle schedule)")
    p.add_argument("--feature-dim", type=int, default=128, help="width of the feature layer the statistics use")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of training; seed + 1 picks the 10,000 reference training images")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    check_minimums(p, args, epochs=1, batch=1, feature_dim=1, threads=1)  # --feature-dim 0 failed after training
    check_positive(p, args, "lr")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_u8, train_y = load_fashion_mnist("train", args.data)
    test_u8, test_y = load_fashion_mnist("test", args.data)
    train_x, test_x = to_model_range(train_u8), to_model_range(test_u8)

    net = FeatureNet(feature_dim=args.feature_dim)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_x) / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch)
    start = time.time()
    history = []
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(train_x), generator=gen)
        total = 0.0
        for idx in perm.split(args.batch):
            x = train_x[idx]
            # Flips: the DDPM is trained with horizontal flips, so its samples may be mirrored.
            flip = torch.rand(len(x), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = torch.nn.functional.cross_entropy(net(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        net.eval()
        _, logits = compute_features(net, test_x)
        acc = (logits.argmax(1) == test_y).float().mean().item()
        history.append(dict(epoch=epoch + 1, train_loss=total / len(train_x), test_accuracy=acc,
                            elapsed_s=round(time.time() - start, 1)))
        print(json.dumps(history[-1]), file=sys.stderr)
    train_time = time.time() - start

    net.eval()
    test_feats, _ = compute_features(net, test_x)
    ref_idx = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed + 1))[:10_000]
    train_feats, train_logits = compute_features(net, train_x[ref_idx])
    mu_test, sigma_test = feature_stats(test_feats)
    mu_train, sigma_train = feature_stats(train_feats)
    stats = {k: torch.from_numpy(v) for k, v in dict(mu_test=mu_test, sigma_test=sigma_test, mu_train=mu_train,
                                                      sigma_train=sigma_train).items()}

    summary = dict(
        test_accuracy=history[-1]["test_accuracy"],
        train10k_accuracy=(train_logits.argmax(1) == train_y[ref_idx]).float().mean().item(),
        fd_train10k_vs_test=frechet_distance(mu_train, sigma_train, mu_test, sigma_test),
        parameters=sum(p.numel() for p in net.parameters()),
        epochs=args.epochs, batch=args.batch, lr=args.lr, seed=args.seed, train_time_s=round(train_time, 1),
        history=history,
        machine=machine_info(),
        command=command_line(__file__, argv),
    )
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    # All four files together or none: weights with another run's statistics would give wrong FDs.
    with atomic_directory(args.out) as tmp:
        save_file(state, tmp / WEIGHTS_NAME)
        save_file(stats, tmp / STATS_NAME, metadata=dict(
            test="all 10,000 Fashion-MNIST test images", train=f"10,000 training images (seed {args.seed + 1})"))
        (tmp / CONFIG_NAME).write_text(json.dumps(net.config, indent=2) + "\n")
        (tmp / "train_log.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
