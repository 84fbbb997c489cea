"""The pruning pass as a stage-cache entry: pruned weights, calibration statistics (the importance matrix),
GPTQ codes and the per-layer report, stored as safetensors and JSON (never pickles).

A sweep that died after a setting's pruning pass, or a second sweep that shares a setting, reads the pass
back instead of running it again. The key is what the pass depends on: the weights' sha256, the exact
calibration tokens, the pruning request (method, sparsity or pattern, its options, a GPTQ grid) and the
device. Entries are kept for passes on a model in memory that change no layer's shape: a streamed pass
writes its pruned folder tensor by tensor and a structured one resizes layers per layer, so both run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from srcr.base.files import temporary_folder
from srcr.base.grids import BlockCodes
from srcr.exporter.calibration import CalibrationSet
from srcr.exporter.models import LoadedModel
from srcr.exporter.pruning import LayerSparsity, PruneReport
from srcr.exporter.stage_cache import StageCache, stage_key

KIND = "pruned"
REPORT_FILE = "report.json"
IMATRIX_FILE = "imatrix.safetensors"
CODES_FILE = "codes.safetensors"
CODE_PARTS = ("codes", "scales", "offsets", "super_scales", "super_minimums")


def cacheable(plan: Any, setting: Any) -> bool:
    return not plan.stream and not setting.structure.active


def pruned_key(plan: Any, setting: Any, calibration: CalibrationSet) -> str:
    import torch

    tokens = calibration.input_ids.contiguous().numpy()
    return stage_key(
        KIND,
        {
            "weights": plan.source.weights_sha256,
            "calibration": hashlib.sha256(tokens.tobytes()).hexdigest() + f":{list(tokens.shape)}",
            "prune": dataclasses.asdict(setting.prune),
            "device": plan.device,
            "torch_threads": torch.get_num_threads(),  # the order of SparseGPT's sums (docs/sweep.md)
        },
    )


def save_pruned(cache: StageCache, key: str, pruned: Any, scratch: Path) -> None:
    """Store a pruning pass: its weights only when it changed them (a statistics pass reuses the dense model)."""
    from safetensors.torch import save_file

    report: PruneReport = pruned.report
    with temporary_folder(scratch, "pruned-entry") as folder:
        if pruned.setting.changes_weights:
            pruned.loaded.model.save_pretrained(folder, safe_serialization=True)
        import torch

        # q, k and v (gate and up) share one input, so one array: each is stored as its own
        save_file(
            {name: torch.from_numpy(values.copy()) for name, values in report.imatrix.items()}, folder / IMATRIX_FILE
        )
        grids = {}
        if report.codes:
            tensors = {}
            for name, codes in report.codes.items():
                grids[name] = codes.grid
                for part in CODE_PARTS:
                    value = getattr(codes, part)
                    if value is not None:
                        tensors[f"{name}/{part}"] = value.contiguous().clone()
            save_file(tensors, folder / CODES_FILE)
        summary = {
            "per_layer": [dataclasses.asdict(row) for row in report.per_layer],
            "overall_sparsity": report.overall_sparsity,
            "imatrix_tokens": report.imatrix_tokens,
            "seconds": report.seconds,
            "grids": grids,
        }
        (folder / REPORT_FILE).write_text(json.dumps(summary), encoding="utf-8")
        cache.put(KIND, key, {path.name: path for path in folder.iterdir()})


def load_pruned(
    plan: Any, files: dict[str, Path], setting: Any, calibration: CalibrationSet, dense: LoadedModel | None
) -> Any:
    """The PrunedModel of a stored pass: its own weights, or `dense` for a pass that changed none."""
    from safetensors.torch import load_file

    from srcr.exporter.models import loaded_model
    from srcr.exporter.pipeline import PrunedModel

    summary = json.loads(files[REPORT_FILE].read_text(encoding="utf-8"))
    imatrix = {name: values.numpy() for name, values in load_file(files[IMATRIX_FILE]).items()}
    codes = {}
    if CODES_FILE in files:
        stored = load_file(files[CODES_FILE])
        for name, grid in summary["grids"].items():
            parts = {part: stored.get(f"{name}/{part}") for part in CODE_PARTS}
            codes[name] = BlockCodes(grid=grid, **parts)
    report = PruneReport(
        per_layer=[LayerSparsity(**row) for row in summary["per_layer"]],
        overall_sparsity=summary["overall_sparsity"],
        imatrix=imatrix,
        imatrix_tokens=summary["imatrix_tokens"],
        seconds=summary["seconds"],
        codes=codes,
    )
    if setting.changes_weights:
        loaded = loaded_model(plan.source, _read_model(plan, files[REPORT_FILE].parent))
    else:
        loaded = dense
    return PrunedModel(loaded, setting, report, calibration, plan.seed)


def _read_model(plan: Any, folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    from srcr.exporter.models import storage_dtype

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=storage_dtype(plan.source.config), trust_remote_code=False, use_safetensors=True
    )
    model.name_or_path = str(plan.source.folder)  # what the model read from its own folder says (GGUF's name)
    return model.eval()
