#!/usr/bin/env python3
"""How small an ECE a test set of a given size can show: the ECE a perfectly calibrated
model would have, from a package's own held-out probabilities (its evaluation/cases.json).

    .venv/bin/python scripts/ece_floor.py models/brain-tumour-mr --n 90 150 300 450

For each n: the median and 90th percentile, over --draws resamples, of the top-label ECE
(10 bins) when every case's label is drawn from the model's own probabilities. A card's
ECE target is only testable where the floor sits well below it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dicomnode.pipelines.brain_rules import sigmoid, softmax
from dicomnode.training.metrics import ece_noise_floor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--n", type=int, nargs="+", default=[150, 300])
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cases_path = args.package / "evaluation" / "cases.json"
    if not cases_path.is_file():
        print(f"{cases_path}: no per-case results (the brain packages write them)",
              file=sys.stderr)
        return 2
    logits = np.array([c["logits"] for c in json.loads(cases_path.read_text())],
                      dtype=np.float64)
    probabilities = sigmoid(logits[:, 0]) if logits.shape[1] == 1 else softmax(logits)
    print(f"{args.package.name}: probabilities of its {len(logits)} held-out cases")
    for n in args.n:
        median, high = ece_noise_floor(probabilities, n, draws=args.draws, seed=args.seed)
        print(f"  n={n:5d}: ECE of a perfectly calibrated model, median {median:.3f}, "
              f"90th percentile {high:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
