"""Pipeline names to implementations.

Built-in pipelines are imported lazily (a node that only runs DaT quantification never
imports ONNX Runtime). Site pipelines are named in the config as ``module:attribute``
import paths, the convention of gunicorn and Celery: an import, never evaluated code.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from dicomnode.pipelines.base import Pipeline, PipelineError

BUILTIN: dict[str, str] = {
    "dat_spect": "dicomnode.pipelines.dat_spect:DatSpectPipeline",
    "pneumonia": "dicomnode.pipelines.pneumonia:PneumoniaPipeline",
    "metastasis": "dicomnode.pipelines.metastasis:MetastasisPipeline",
    "brain_tumour": "dicomnode.pipelines.brain_tumour:BrainTumourPipeline",
    "tumour_volume": "dicomnode.pipelines.tumour_volume:TumourVolumePipeline",
}


def known_pipelines(extra: Mapping[str, str] | None = None) -> list[str]:
    return sorted({*BUILTIN, *(extra or {})})


def create(name: str, extra: Mapping[str, str] | None = None) -> Pipeline:
    target = {**BUILTIN, **(extra or {})}.get(name)
    if target is None:
        raise PipelineError(f"unknown pipeline {name!r}")
    module_name, _, attr = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise PipelineError(f"pipeline {name!r}: cannot import {target}: {exc}") from exc
    pipeline: Pipeline = factory()
    return pipeline
