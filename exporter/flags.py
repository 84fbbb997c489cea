"""The CLI's flags as recipe fields: each flag sets one field, and only a flag given on the command line does.

Without `--recipe` the flags are laid over the default recipe, with it over the file's: either way, what
a flag left alone is the recipe's. The flags' defaults shown in `--help` are the default recipe's own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from srcr.base.errors import SrcrError
from srcr.exporter.recipe import Recipe

# Flag (the command's parameter name) -> the recipe field it sets.
SHARED_FLAGS: dict[str, tuple[str, ...]] = {
    "model": ("model", "source"),
    "stream": ("model", "stream"),
    "device": ("model", "device"),
    "calib": ("calibration", "text"),
    "calib_encoding": ("calibration", "encoding"),
    "calib_samples": ("calibration", "samples"),
    "seq_len": ("calibration", "seq_len"),
    "seed": ("calibration", "seed"),
    "method": ("prune", "method"),
    "percdamp": ("prune", "percdamp"),
    "prune_block_size": ("prune", "block_size"),
    "fmt": ("export", "format"),
    "reference": ("evaluate", "reference"),
    "eval_text": ("evaluate", "text"),
    "eval_encoding": ("evaluate", "encoding"),
    "prompts": ("evaluate", "prompts"),
    "tasks": ("evaluate", "tasks"),
    "builtin_prompts": ("evaluate", "builtin_prompts"),
    "eval_windows": ("evaluate", "windows"),
    "last_word_items": ("evaluate", "last_word_items"),
    "new_tokens": ("evaluate", "new_tokens"),
    "lm_eval_tasks": ("evaluate", "lm_eval_tasks"),
    "lm_eval_include": ("evaluate", "lm_eval_include"),
    "lm_eval_limit": ("evaluate", "lm_eval_limit"),
}
EXPORT_FLAGS: dict[str, tuple[str, ...]] = {
    **SHARED_FLAGS,
    "sparsity": ("prune", "sparsity"),
    "pattern": ("prune", "pattern"),
    "drop_layers": ("prune", "structure", "drop_layers"),
    "depth_method": ("prune", "structure", "depth_method"),
    "ffn_ratio": ("prune", "structure", "ffn_ratio"),
    "head_ratio": ("prune", "structure", "head_ratio"),
    "width_method": ("prune", "structure", "width_method"),
    "width_allocation": ("prune", "structure", "allocation"),
    "width_multiple": ("prune", "structure", "multiple"),
    "bits": ("quantize", "bits"),
    "quant_type": ("quantize", "type"),
    "quantizer": ("quantize", "quantizer"),
    "quant_block_size": ("quantize", "block_size"),
    "quant_algo": ("quantize", "algo"),
    "quant_scheme": ("quantize", "scheme"),
    "symmetric": ("quantize", "symmetric"),
    "budget_mb": ("quantize", "budget_mb"),
    "budget_bpw": ("quantize", "budget_bpw"),
    "budget_check": ("quantize", "budget_check"),
    "name": ("export", "name"),
    "evaluate": ("evaluate", "enabled"),
    "top_k": ("evaluate", "top_k"),
}
SWEEP_FLAGS: dict[str, tuple[str, ...]] = {
    **SHARED_FLAGS,
    "sparsity": ("sweep", "sparsity"),
    "pattern": ("sweep", "pattern"),
    "structures": ("sweep", "structures"),
    "bits": ("sweep", "bits"),
    "quant_type": ("sweep", "quant_type"),
    "quantizer": ("sweep", "quantizer"),
    "budget_mb": ("sweep", "budget_mb"),
    "min_retention": ("sweep", "min_retention"),
    "allocate_mb": ("quantize", "budget_mb"),
}

Converter = Callable[[Any], Any]


def given_flags(ctx: Any, flags: Mapping[str, tuple[str, ...]]) -> list[str]:
    """The flags of `flags` the user gave (command line or environment), not left at their defaults."""
    # By name: typer carries its own copy of click, whose ParameterSource is another enum than click's.
    left_alone = (None, "DEFAULT", "DEFAULT_MAP")
    return [name for name in flags if getattr(ctx.get_parameter_source(name), "name", None) not in left_alone]


def recipe_from_flags(
    ctx: Any,
    flags: Mapping[str, tuple[str, ...]],
    base: Recipe,
    converters: Mapping[str, Converter] | None = None,
) -> Recipe:
    """`base` with every flag given on the command line laid over it."""
    changes: dict[str, Any] = {}
    for name in given_flags(ctx, flags):
        default = _cleared if name in CLEARABLE else plain
        value = (converters or {}).get(name, default)(ctx.params[name])
        *stages, field = flags[name]
        table = changes
        for stage in stages:
            table = table.setdefault(stage, {})
        table[field] = value
    try:
        return base.merged(changes)
    except SrcrError as error:
        raise SrcrError(_name_the_flag(str(error), flags)) from None


# Flags whose empty value unsets the recipe's field: `--pattern ''` turns a recipe's 2:4 back into --sparsity.
CLEARABLE = ("pattern", "quant_type", "quantizer")


def plain(value: Any) -> Any:
    """A flag's value as a recipe holds it: paths as text."""
    return str(value) if isinstance(value, Path) else value


def _cleared(value: Any) -> Any:
    return None if value == "" else value


def _name_the_flag(message: str, flags: Mapping[str, tuple[str, ...]]) -> str:
    """'recipe: prune.sparsity: ...' -> '--sparsity (prune.sparsity): ...' when a flag set that field."""
    for name, path in flags.items():
        where = ".".join(path)
        if message.startswith(f"recipe: {where}:") or message.startswith(f"recipe: {where}."):
            flag = "--format" if name == "fmt" else f"--{name.replace('_', '-')}"
            return f"{flag} ({where}){message.removeprefix(f'recipe: {where}')}"
    return message


def base_recipe(path: Path | None, sweep: bool = False) -> Recipe:
    """The recipe the flags are laid over: the file's, or the defaults (for a sweep, with the default axes)."""
    from srcr.exporter.recipe import SweepStage, read_recipe

    recipe = read_recipe(path) if path is not None else Recipe()
    if sweep and recipe.sweep is None:
        recipe = recipe.merged({"sweep": SweepStage().model_dump()})
    return recipe
