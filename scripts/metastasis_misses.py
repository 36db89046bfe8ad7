#!/usr/bin/env python
"""Which metastasis patients a metastasis-ct package misses, by the kind and size of lesion.

Scores held-out phantom head CTs through the served package (ONNX Runtime, the card's
preprocessing; slice logits max-pooled per patient, as the pipeline does) and splits the
positive patients by what their lesions are, from the phantom's ground truth:

    .venv/bin/python scripts/metastasis_misses.py --model models/metastasis-ct --seed 1000 --n 300

For every group: patients, how many each of the card's operating points detects, how
many a threshold at the negatives' 95th percentile detects, and the AUC of that group's
positives against all negatives. A diagnosis tool for a model's card and its notes, not
a second evaluation: the metrics that count are `dicomnode evaluate`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENHANCING = ("ring", "solid")


def group_of(lesions: list[dict[str, Any]]) -> str:
    """A positive patient's group: its most visible kind of lesion, then its size."""
    enhancing = [float(x["diameter_mm"]) for x in lesions if x["kind"] in ENHANCING]
    hypodense = [float(x["diameter_mm"]) for x in lesions if x["kind"] == "hypodense"]
    if enhancing and max(enhancing) >= 6.0:
        return "enhancing >= 6 mm"
    if enhancing:
        return "enhancing < 6 mm + hypodense" if hypodense else "enhancing < 6 mm only"
    return "hypodense only, >= 8 mm" if max(hypodense) >= 8.0 else "hypodense only, < 8 mm"


def auc(positive: NDArray[np.float64], negative: NDArray[np.float64]) -> float | None:
    """The project's Mann-Whitney AUC of positives against negatives; None without both."""
    from dicomnode.training.metrics import auc as roc_auc

    if not len(positive) or not len(negative):
        return None
    labels = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    return roc_auc(labels, np.r_[positive, negative])


def analyse(model: Path, seed: int, n: int, phantom_size: int | None) -> dict[str, Any]:
    from dicomnode.imaging import PreprocessSpec
    from dicomnode.inference.package import load_package
    from dicomnode.training.datasets import SampleSet
    from dicomnode.training.evaluate import score_package
    from dicomnode.training.tasks_metastasis import (
        CLASS_NAMES,
        HeadCtPhantomReader,
        HeadCtSeries,
        pool_by_patient,
    )

    truth: dict[str, tuple[int, list[dict[str, Any]]]] = {}

    class Recording(HeadCtPhantomReader):
        """Keeps each series' lesions as the listing generates it, so the truth needs
        no third generation pass after scoring."""

        def series(self, seed: int, index: int) -> HeadCtSeries:
            found = super().series(seed, index)
            truth.setdefault(found.patient_id,
                             (index, [dict(x) for x in found.truth.lesions]))
            return found

    pkg = load_package(model)
    card = pkg.card
    if card.task != "metastasis":
        raise SystemExit(f"{model}: a {card.task} package, not metastasis")
    seeds = card.provenance.get("training", {}).get("data_provenance", {}).get("seeds", {})
    used = {part: s for part, s in seeds.items() if part != "test"}
    if seed in set(used.values()):
        raise SystemExit(f"seed {seed} is one the model was trained or calibrated on: {used}")
    matrix = phantom_size or int(card.provenance["training"]["data_provenance"]["size"])
    reader = Recording(matrix)
    spec = PreprocessSpec.from_dict(list(card.preprocessing))
    samples = SampleSet("misses", reader.samples(seed, n), spec, CLASS_NAMES, reader,
                        cache=False)
    _, pooled = pool_by_patient(samples, score_package(pkg, samples).scores)
    patient_score: dict[int, float] = {}
    groups: dict[int, str] = {}
    diameters: dict[int, float] = {}
    for patient, score in zip(sorted(truth), pooled, strict=True):
        index, lesions = truth[patient]
        patient_score[index] = float(score)
        groups[index] = group_of(lesions) if lesions else "normal"
        diameters[index] = max((float(x["diameter_mm"]) for x in lesions), default=0.0)
    negative = np.array([patient_score[i] for i in range(n) if groups[i] == "normal"])
    points = {p.name: p.threshold for p in card.operating_points if p.scale == "probability"}
    if len(negative):
        points["negatives' 95th percentile"] = float(np.quantile(negative, 0.95))
    rows = []
    for name in sorted({g for g in groups.values() if g != "normal"}):
        members = [i for i in range(n) if groups[i] == name]
        scores = np.array([patient_score[i] for i in members])
        detected = {p: int((scores >= t).sum()) for p, t in points.items()}
        missed = sorted(round(diameters[i], 1) for i in members
                        if patient_score[i] < points.get("f1-optimal", 0.5))
        rows.append({"group": name, "patients": len(members), "detected": detected,
                     "auc_vs_all_negatives": auc(scores, negative),
                     "largest_diameter_mm_of_missed_at_f1_optimal": missed})
    positives = np.array([patient_score[i] for i in range(n) if groups[i] != "normal"])
    return {"model": card.name, "version": card.version, "seed": seed, "n": n,
            "phantom_size": matrix, "negatives": len(negative),
            "auc": auc(positives, negative), "thresholds": points, "groups": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models" / "metastasis-ct"))
    p.add_argument("--seed", type=int, default=1000, help="phantom seed (not a training one)")
    p.add_argument("--n", type=int, default=300, help="phantom patients")
    p.add_argument("--phantom-size", type=int, help="default: the card's training size")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    result = analyse(Path(args.model), args.seed, args.n, args.phantom_size)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['model']} {result['version']}: seed {args.seed}, {args.n} patients "
          f"({result['negatives']} without metastases), {result['phantom_size']} px phantoms; "
          f"patient AUC {result['auc']:.3f}")
    names = list(result["thresholds"])
    print("thresholds: " + ", ".join(f"{k} {v:.3f}" for k, v in result["thresholds"].items()))
    print(f"{'group':32} {'n':>4} " + " ".join(f"{k[:16]:>16}" for k in names) + "  AUC")
    for row in result["groups"]:
        cells = " ".join(f"{row['detected'][k]:>16}" for k in names)
        value = row["auc_vs_all_negatives"]
        print(f"{row['group']:32} {row['patients']:>4} {cells}  "
              + (f"{value:.3f}" if value is not None else "-"))
        if row["largest_diameter_mm_of_missed_at_f1_optimal"]:
            print(f"{'':32}      missed at f1-optimal, largest lesion (mm): "
                  f"{row['largest_diameter_mm_of_missed_at_f1_optimal']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
