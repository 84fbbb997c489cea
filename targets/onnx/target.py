"""The ONNX deployment target: a KV-cache decoder graph, weight-only MatMulNBits blocks, ONNX Runtime.

docs/onnx.md describes the graph, the quantization options (with measurements) and the artifact.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from srcr.base.allocation import Allocation, KlCurve, WholeModelKl
from srcr.base.errors import SrcrError
from srcr.base.files import temporary_folder
from srcr.base.gram import GptqSolver
from srcr.base.grids import BlockCodes
from srcr.base.placement import placed
from srcr.base.progress import ProgressFn, no_progress
from srcr.base.weights import TensorSource
from srcr.targets.base import BudgetRequest, ExportResult, Imatrix, QuantSpec, check_budget_floor
from srcr.targets.onnx import spec as specs
from srcr.targets.onnx.matmul_nbits import BlockQuantConfig
from srcr.targets.onnx.quantize import Quantized, quantize_graph
from srcr.targets.onnx.runtime import OrtRuntime, require_onnxruntime

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


def require_onnx() -> Any:
    try:
        import onnx
    except ImportError as error:
        raise SrcrError("the onnx package is not installed; run `pip install onnx`") from error
    return onnx


class ONNXTarget:
    name = "onnx"
    suffix = ".onnx"
    # torch.onnx traces the whole model in memory (docs/performance.md: how large a model that allows).
    streams = False

    def check_budget(self, shapes: list[tuple[int, int]], spec: QuantSpec) -> None:
        from srcr.targets.onnx.budget import smallest_bytes

        smallest = "the smallest MatMulNBits blocks"
        check_budget_floor(spec, shapes, smallest_bytes, "ONNX graph", smallest, "2-bit blocks")

    def for_checkpoint(self, spec: QuantSpec, dtype: str) -> QuantSpec:
        return spec  # 16-bit is float16: ONNX Runtime's CPU provider has no bfloat16 MatMul

    def reference_spec(self, dtype: str) -> QuantSpec:
        raise SrcrError("the ONNX target does not stream; export with --no-stream or --format gguf")

    def resolve_quant(self, bits: int | None, quant_type: str | None, options: Mapping[str, object]) -> QuantSpec:
        require_onnx()
        require_onnxruntime()
        return specs.resolve(bits, quant_type, options)

    def check_structure(self, config: PretrainedConfig, drops_layers: bool, per_layer_widths: bool) -> None:
        return None  # the cache inputs take each layer's own KV head count; layer_types follow the layers

    def width_multiple(self, spec: QuantSpec) -> int:
        if spec.allocates:
            return specs.BUDGET_MIN_BLOCK
        return int(spec.options.get("block_size") or 1)

    def check_model(self, config: PretrainedConfig, spec: QuantSpec) -> None:
        specs.check_block_size_fits(config, spec)

    def check_files(self, folder: Path, config: PretrainedConfig) -> None:
        """Nothing: the ONNX graph carries no tokenizer (the evaluators tokenize with transformers)."""

    def export(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        spec: QuantSpec,
        out: Path,
        imatrix: Imatrix | None = None,
        hints: Mapping[str, object] | None = None,
        progress: ProgressFn = no_progress,
        codes: Mapping[str, BlockCodes] | None = None,
        weights: TensorSource | None = None,
        sensitivity: Mapping[str, KlCurve] | None = None,
        whole_model_kl: WholeModelKl | None = None,
        gptq: GptqSolver | None = None,  # never given: ONNX takes no --quantizer
    ) -> ExportResult:
        """Trace, quantize and write `out` (one .onnx file; `<name>.data` beside it only past 2 GB).

        For a budget (`spec.allocates`), `sensitivity` chooses every linear layer's bits and block size."""
        from srcr.targets.onnx import artifact

        if spec.allocates and not sensitivity:
            raise SrcrError("a --budget export needs the sensitivities measured on the calibration data; none came")
        if weights is not None:
            raise SrcrError("the ONNX target traces a model in memory; export with --no-stream")
        if spec.grid is not None and not codes:
            raise SrcrError(f"{spec.quant_type} needs the calibration pass's GPTQ codes; none came")
        if codes and (spec.grid is None or any(matrix.grid != spec.grid for matrix in codes.values())):
            raise SrcrError(f"the GPTQ codes are not on the grid of {spec.quant_type}, which this export writes")

        require_onnx()
        ort = require_onnxruntime()
        self.check_model(model.config, spec)
        stored_tokenizer = artifact.encode_tokenizer(artifact.tokenizer_json(tokenizer))
        out = Path(out)
        with temporary_folder(out.parent, f"{out.name}.work") as workdir:
            progress("export onnx graph", 0, 1)
            started = time.perf_counter()
            import torch

            with placed(model, dtype=torch.float32):  # the graph computes in float32 whatever the checkpoint's
                proto, weights, counts = _export_graph(model, workdir)
            convert_seconds = time.perf_counter() - started
            started = time.perf_counter()
            progress("export onnx graph", 1, 1)
            allocation = per_weight = None
            if spec.allocates:
                allocation, per_weight = _allocate(
                    proto, weights, spec, sensitivity or {}, imatrix, stored_tokenizer, progress, whole_model_kl
                )
                allocate_seconds = time.perf_counter() - started
                started = time.perf_counter()
            quantized = quantize_graph(proto, weights, spec, workdir, imatrix, progress, codes, per_weight)
            quantization = _quantization_summary(spec, quantized)
            format_info = _format_info(ort)
            artifact.attach_metadata(
                quantized.model, _model_facts(model, tokenizer), stored_tokenizer, quantization, format_info
            )
            sizes = artifact.tensor_bytes(quantized.model)
            progress("write onnx", 0, 1)
            data_file = artifact.save_model(quantized.model, out, workdir, hints)
            progress("write onnx", 1, 1)
            quantize_seconds = time.perf_counter() - started  # quantization, metadata and the write

        artifact_bytes = out.stat().st_size + (data_file.stat().st_size if data_file else 0)
        stage_seconds = {"convert": round(convert_seconds, 3), "quantize": round(quantize_seconds, 3)}
        if allocation is not None:
            from srcr.targets.onnx.budget import check_written_as_allocated

            check_written_as_allocated(quantized.model, allocation, artifact_bytes)
            # --budget-mb / --budget-bpw: the MatMulNBits option srcr chose for every linear layer, and why.
            quantization["allocation"] = allocation.manifest_section()
            stage_seconds["allocate"] = round(allocate_seconds, 3)
        embedding_names = [weights.embedding] if weights.embedding else []
        if weights.tied and weights.lm_head:
            embedding_names.append(weights.lm_head)
        linear_names = [name for name in weights.linear if name not in embedding_names]
        quantization["bytes_by_kind"] = artifact.bytes_by_kind(
            sizes, artifact_bytes, embedding_names, linear_names, len(stored_tokenizer)
        )
        format_info["external_data"] = data_file.name if data_file else None
        return ExportResult(
            artifact=out,
            artifact_bytes=artifact_bytes,
            bits_per_weight=_bits_per_weight(sizes, counts, quantized, weights),
            quantization=quantization,
            format_info=format_info,
            stage_seconds=stage_seconds,
        )

    def open_runtime(self, artifact: Path, device: str = "auto") -> OrtRuntime:
        return OrtRuntime(artifact, device)


def _allocate(
    proto: Any,
    weights: Any,
    spec: QuantSpec,
    sensitivity: Mapping[str, KlCurve],
    imatrix: Imatrix | None,
    stored_tokenizer: str,
    progress: ProgressFn,
    whole_model_kl: WholeModelKl | None,
) -> tuple[Allocation, dict[str, BlockQuantConfig]]:
    from srcr.targets.onnx.budget import allocate_layers, config_of

    request = BudgetRequest.of(spec)
    allocation = allocate_layers(
        proto, weights, request, sensitivity, dict(imatrix or {}), len(stored_tokenizer), progress, whole_model_kl
    )
    return allocation, {name: config_of(chosen) for name, chosen in allocation.types.items()}


def _export_graph(model: Any, workdir: Path) -> tuple[Any, Any, dict[str, int]]:
    from srcr.targets.onnx.graph import export_decoder, name_weights
    from srcr.targets.onnx.onnx_edit import GraphEditor

    proto = export_decoder(model, workdir / "decoder.onnx")
    weights = name_weights(proto.graph, model)
    editor = GraphEditor(proto)
    names = list(weights.linear) + ([weights.embedding] if weights.embedding else [])
    counts = {name: int(editor.array(name).size) for name in names}
    return proto, weights, counts


def _quantization_summary(spec: QuantSpec, quantized: Quantized) -> dict[str, Any]:
    options = spec.options
    return {
        "quant_type": spec.quant_type,
        "scheme": options["scheme"],
        "bits": spec.bits,
        "block_size": options.get("block_size"),
        "symmetric": options.get("symmetric"),
        "algo": options.get("algo"),
        "embedding_quantized": quantized.embedding_quantized,
        "embedding_shared_with_lm_head": quantized.embedding_shared,
        "imatrix_used": quantized.imatrix_used,
        "quantizer": "gptq" if quantized.gptq_weights else "ort",
        # With GPTQ: the weight matrices written from its codes, and those ONNX Runtime-side wls quantized.
        "gptq_tensors": len(quantized.gptq_weights),
        "ort_tensors": sorted(quantized.ort_weights) if quantized.gptq_weights else [],
    }


def _bits_per_weight(sizes: dict[str, int], counts: dict[str, int], quantized: Quantized, weights: Any) -> float:
    """Stored bits per weight over the weight matrices: the quantized ones, or all of them when float."""
    from srcr.targets.onnx.artifact import weight_tensor_bytes

    names = list(quantized.quantized_weights)
    if quantized.embedding_quantized and weights.embedding and not quantized.embedding_shared:
        names.append(weights.embedding)
    if not names:  # unquantized: every weight matrix, the shared embedding once
        names = list(counts)
        if quantized.embedding_shared and weights.lm_head in names:
            names.remove(weights.lm_head)
    stored = weight_tensor_bytes(sizes, names)
    return 8.0 * stored / sum(counts[name] for name in names)


def _model_facts(model: Any, tokenizer: Any) -> Any:
    from srcr.targets.hf_tokens import end_of_sequence_ids, prepended_bos
    from srcr.targets.onnx.artifact import ModelFacts
    from srcr.targets.onnx.graph import CacheShape, rope_context_limit

    shape = CacheShape.of(model)
    return ModelFacts(
        eos_token_ids=end_of_sequence_ids(model, tokenizer),
        bos_token_id=prepended_bos(tokenizer),
        vocab_size=int(model.config.vocab_size),
        layers=shape.layers,
        kv_heads=shape.per_layer(),
        head_dim=shape.head_dim,
        architecture=type(model).__name__,
        context_length=rope_context_limit(model.config),
    )


def _format_info(ort: Any) -> dict[str, Any]:
    import onnx
    import torch

    from srcr.targets.onnx.graph import EXPORTER, OPSET

    return {
        "opset": OPSET,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "exporter": EXPORTER,
    }
