#!/usr/bin/env python
"""kNN time for N_train x N_test features with both backends, and whether they agree on top-1.

    python tools/bench_knn.py --train 50000 --test 10000 --dim 512

Features are clustered random vectors (10 classes), as a stand-in for real backbone features of that size.
"""
import argparse
import time

import torch

from ssl_bocb.eval.knn import knn_classify


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=50000)
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--noise", type=float, default=8.0, help="noise scale around the class centres")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(args.classes, args.dim, generator=g)
    ytr = torch.randint(0, args.classes, (args.train,), generator=g)
    yte = torch.randint(0, args.classes, (args.test,), generator=g)
    ftr = centers[ytr] + args.noise * torch.randn(args.train, args.dim, generator=g)
    fte = centers[yte] + args.noise * torch.randn(args.test, args.dim, generator=g)
    print(f"{args.train} train x {args.test} test features of dim {args.dim}, {torch.get_num_threads()} threads")
    res = {}
    for backend in ("torch", "faiss"):
        t = time.time()
        res[backend] = knn_classify(ftr, ytr, fte, yte, ks=(10, 20, 100, 200), backend=backend)
        print(f"{backend:6s} backend: {time.time() - t:6.2f} s for k in (10, 20, 100, 200); "
              f"top-1 at k=20 {res[backend][20]['top1']:.2f}")
    same = all(res["torch"][k]["top1"] == res["faiss"][k]["top1"] for k in (10, 20, 100, 200))
    print(f"backends agree on top-1 for every k: {same}")


if __name__ == "__main__":
    main()
