"""scripts/metastasis_misses.py: the groups it sorts patients into and a run on the
bundled package (served path, few patients)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("metastasis_misses",
                                                  ROOT / "scripts" / "metastasis_misses.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_groups_and_auc() -> None:
    m = _script()

    def les(kind: str, d: float) -> dict[str, object]:
        return {"kind": kind, "diameter_mm": d}

    assert m.group_of([les("solid", 4.0), les("ring", 9.0)]) == "enhancing >= 6 mm"
    assert m.group_of([les("solid", 4.0)]) == "enhancing < 6 mm only"
    assert m.group_of([les("solid", 4.0), les("hypodense", 20.0)]) == (
        "enhancing < 6 mm + hypodense")
    assert m.group_of([les("hypodense", 7.9)]) == "hypodense only, < 8 mm"
    assert m.group_of([les("hypodense", 7.9), les("hypodense", 8.0)]) == (
        "hypodense only, >= 8 mm")
    assert m.auc(np.array([0.9, 0.8]), np.array([0.1, 0.85])) == pytest.approx(0.75)
    assert m.auc(np.array([0.5]), np.array([0.5])) == pytest.approx(0.5)
    assert m.auc(np.array([]), np.array([0.5])) is None


def test_run_on_the_bundled_package(capsys: pytest.CaptureFixture[str]) -> None:
    m = _script()
    model = ROOT / "models" / "metastasis-ct"
    with pytest.raises(SystemExit, match="trained or calibrated on"):
        m.analyse(model, 0, 4, 128)
    result = m.analyse(model, 1000, 8, 128)
    assert result["model"] == "metastasis-ct" and result["n"] == 8
    positives = sum(row["patients"] for row in result["groups"])
    assert positives + result["negatives"] == 8 and positives > 0
    assert {"f1-optimal", "sensitivity-0.9", "negatives' 95th percentile"} <= set(
        result["thresholds"])
    for row in result["groups"]:
        assert all(0 <= v <= row["patients"] for v in row["detected"].values())
    assert m.main(["--model", str(model), "--n", "6", "--phantom-size", "128"]) == 0
    assert "patient AUC" in capsys.readouterr().out
