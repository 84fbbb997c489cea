"""srcr's GPTQ against llama.cpp's quantizer (with srcr's imatrix) on the same GGUF types, on weights that
were never quantized, and what the joint SparseGPT + GPTQ pass costs against SparseGPT alone.

SmolLM2's embedded weights were dequantized from a Q4_1 file (blocks of 32), which flatters every 4-bit
grid of block 32. This benchmark therefore trains a small Llama briefly from scratch on Lee background
(SmolLM2's tokenizer; float weights that no quantizer has touched) and sweeps it: the format's own
quantizer vs srcr's GPTQ on GGUF Q4_0, Q5_0, Q8_0, the K-quants (llama.cpp's Q4_K_M/Q5_K_M mixes vs
GPTQ's plain Q4_K/Q5_K, and Q6_K) and ONNX MatMulNBits 4- and 8-bit (ORT-side wls vs GPTQ), each at
sparsity 0 and 0.5, each file run in its own runtime against the trained model's reference pack
(mean KL, perplexity on lee.cor). Relative figures only: a 30M model
trained for minutes is not a language model anyone deploys.

    python bench/bench_gptq.py [--steps 400] [--out /tmp/bench-gptq] [--json out.json]
    python bench/bench_gptq.py --cost        # SmolLM2: calibration pass, SparseGPT 50% vs joint with Q4_0
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from srcr.exporter.calibration import calibration_text, load_calibration  # noqa: E402
from srcr.exporter.models import ensure_default_checkpoint  # noqa: E402
from srcr.exporter.pruning import PruneSpec, prune_model  # noqa: E402
from srcr.exporter.recipe import Recipe  # noqa: E402
from srcr.exporter.sweep import run_sweep  # noqa: E402

console = Console(stderr=True)


def train_small_llama(folder: Path, steps: int, seed: int = 0, layers: int = 4) -> None:
    """A small Llama (4 layers by default, hidden 256, FFN 768: every row a multiple of 256, so the K-quants
    fit) trained on Lee background."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_checkpoint())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    ids = tokenizer(calibration_text(None, None).text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    length, batch = 128, 8
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - length - 1, (batch,), generator=generator)
        tokens = torch.stack([ids[start : start + length] for start in starts])
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            console.print(f"train step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.eval().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


# (format, quantizer, types): one sweep each over sparsity {0, 0.5}. llama.cpp's K mixes are compared with
# GPTQ's plain K type (Q4_K_M vs Q4_K: the mix spends more bytes, Q6_K on some attn_v/ffn_down).
SWEEPS = (
    ("gguf", "llama.cpp", ["Q4_0", "Q5_0", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K"]),
    ("gguf", "gptq", ["Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"]),
    (
        "onnx",
        None,
        [
            "MatMulNBits-q4-wls-b32",
            "MatMulNBits-q8-wls-b32",
            "MatMulNBits-q4-gptq-b32",
            "MatMulNBits-q4-gptq-b32-sym",
            "MatMulNBits-q8-gptq-b32",
            "MatMulNBits-q2-wls-b32",
            "MatMulNBits-q2-gptq-b32",
        ],
    ),
)
# (native type, GPTQ type) rows of the table.
PAIRS = (
    ("Q4_0", "Q4_0"),
    ("Q5_0", "Q5_0"),
    ("Q8_0", "Q8_0"),
    ("Q4_K_M", "Q4_K"),
    ("Q5_K_M", "Q5_K"),
    ("Q6_K", "Q6_K"),
    ("Q3_K_M", "Q3_K"),
    ("Q2_K", "Q2_K"),
    ("MatMulNBits-q4-wls-b32", "MatMulNBits-q4-gptq-b32"),
    ("MatMulNBits-q4-wls-b32", "MatMulNBits-q4-gptq-b32-sym"),
    ("MatMulNBits-q8-wls-b32", "MatMulNBits-q8-gptq-b32"),
    ("MatMulNBits-q2-wls-b32", "MatMulNBits-q2-gptq-b32"),
)


def quality(args: argparse.Namespace) -> list[dict]:
    model_dir = args.out / "model"
    if not (model_dir / "config.json").is_file():
        train_small_llama(model_dir, args.steps)
    rows = []
    for format_name, quantizer, types in SWEEPS:
        recipe = Recipe.model_validate(
            {
                "model": {"source": str(model_dir)},
                "export": {"format": format_name},
                "calibration": {"samples": 32, "seq_len": 512},
                "evaluate": {"windows": 8, "builtin_prompts": True},
                "sweep": {
                    "sparsity": [0.0, 0.5],
                    "bits": [],
                    "quant_type": list(types),
                    "quantizer": [quantizer] if quantizer else [],
                },
            }
        )
        sweep_out = args.out / f"sweep-{format_name}-{quantizer or 'own'}"
        for manifest in run_sweep(recipe, sweep_out, progress=lambda what, done, total: None):
            evaluation = manifest.evaluation
            rows.append(
                {
                    "name": manifest.name,
                    "format": format_name,
                    "quantizer": manifest.quantization.quantizer,
                    "type": manifest.quantization.type,
                    "sparsity": manifest.pruning.sparsity,
                    "mb": manifest.artifact.bytes / 1e6,
                    "kl": evaluation.kld.mean,
                    "perplexity": evaluation.perplexity.compressed,
                    "base_perplexity": evaluation.perplexity.base,
                    "calibrate_s": manifest.timings_s.get("calibrate_prune"),
                }
            )
    table = Table(
        title=f"trained 4-layer Llama: native quantizer vs srcr's GPTQ (base ppl {rows[0]['base_perplexity']:.2f})"
    )
    headers = ("sparsity", "native", "gptq", "MB native", "MB gptq", "KL native", "KL gptq", "ratio", "ppl native")
    for header in (*headers, "ppl gptq"):
        table.add_column(header, justify="right")
    by_key = {(row["sparsity"], row["type"], row["quantizer"] == "gptq"): row for row in rows}
    for sparsity in (0.0, 0.5):
        for native_type, gptq_type in PAIRS:
            native, ours = by_key[(sparsity, native_type, False)], by_key[(sparsity, gptq_type, True)]
            table.add_row(
                f"{sparsity:.2f}",
                native_type,
                gptq_type,
                f"{native['mb']:.2f}",
                f"{ours['mb']:.2f}",
                f"{native['kl']:.3g}",
                f"{ours['kl']:.3g}",
                f"{ours['kl'] / native['kl']:.2f}",
                f"{native['perplexity']:.2f}",
                f"{ours['perplexity']:.2f}",
            )
    Console().print(table)
    return rows


def cost(args: argparse.Namespace) -> list[dict]:
    """Whole calibration passes on SmolLM2 (8 × 512 tokens), the same model copy each time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = ensure_default_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    dense = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = load_calibration(tokenizer, calibration_text(None, None), 8, 512, seed=0).input_ids
    rows = []
    for repeat in range(args.repeats):
        for label, spec in (
            ("sparsegpt 50%", PruneSpec("sparsegpt", 0.5)),
            ("sparsegpt 50% + gptq Q4_0", PruneSpec("sparsegpt", 0.5, grid="Q4_0")),
            ("gptq Q4_0", PruneSpec("sparsegpt", 0.0, grid="Q4_0")),
            ("statistics only (imatrix)", PruneSpec("sparsegpt", 0.0)),
        ):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            prune_model(model, ids, spec)
            seconds = time.perf_counter() - start
            console.print(f"pass {repeat + 1}: {label}: {seconds:.1f} s")
            rows.append({"setting": label, "seconds": seconds, "repeat": repeat})
    table = Table(title="SmolLM2 calibration pass, 8 × 512 tokens (median)")
    table.add_column("setting")
    table.add_column("s", justify="right")
    table.add_column("× sparsegpt 50%", justify="right")
    medians = {}
    for label in dict.fromkeys(row["setting"] for row in rows):
        values = sorted(row["seconds"] for row in rows if row["setting"] == label)
        medians[label] = values[len(values) // 2]
    for label, seconds in medians.items():
        table.add_row(label, f"{seconds:.1f}", f"{seconds / medians['sparsegpt 50%']:.2f}")
    Console().print(table)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-gptq"))
    parser.add_argument("--cost", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = cost(args) if args.cost else quality(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
