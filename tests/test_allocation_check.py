"""A budget's allocation checked on the whole model: the candidates, the pick, the measurement."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest

from srcr.base.allocation import HOPELESS, Option, WholeModelCheck, allocate, allocate_file, alternatives, pick_measured
from srcr.base.errors import SrcrError

# Three tensors, each with three options; "head" is the largest (its cheapest option has the most bytes).
OPTIONS = {
    "head": [Option("q2", 40, 0.035), Option("q4", 80, 0.013), Option("q8", 160, 0.0003)],
    "up": [Option("q2", 10, 0.031), Option("q4", 20, 0.030), Option("q8", 40, 0.015)],
    "down": [Option("q2", 10, 0.022), Option("q4", 20, 0.021), Option("q8", 40, 0.0105)],
}


def _interacting(choice_of: dict[str, str]):
    """A whole-model KL where a damaged head hides most of the rest's damage (losses that do not add)."""
    cost = {name: {option.label: option.cost for option in options} for name, options in OPTIONS.items()}

    def kl(labels: dict[str, str]) -> float:
        rest = sum(cost[name][labels[name]] for name in ("up", "down"))
        head = cost["head"][labels["head"]]
        return head + (0.2 if labels["head"] == "q2" else 1.0) * rest

    return kl(choice_of)


def _check(calls: list[tuple[str, str]] | None = None) -> WholeModelCheck:
    """Values that encode their label, so `measure` can read back which option each tensor holds."""
    codes = {"q2": 2.0, "q4": 4.0, "q8": 8.0}

    def approximate(name: str, label: str) -> np.ndarray:
        if calls is not None:
            calls.append((name, label))
        return np.full((1, 1), codes[label])

    def measure(replaced) -> float:
        labels = {name: f"q{int(values[0, 0])}" for name, values in replaced.items()}
        return _interacting(labels)

    return WholeModelCheck(approximate, measure)


def _fits(choice: dict[str, Option], left: int) -> bool:
    return sum(option.bytes for option in choice.values()) <= left


def test_every_alternative_fits_and_the_largest_tensor_is_tried_at_each_option():
    left = 100
    additive = allocate(OPTIONS, left)
    candidates = alternatives(OPTIONS, left, additive)
    assert candidates[0] == ("additive", additive)
    assert all(_fits(choice, left) and set(choice) == set(OPTIONS) for _, choice in candidates)
    heads = {choice["head"].label for name, choice in candidates if name.startswith("head at")}
    # Each head option whose bytes leave room for the others' smallest, other than the additive one's.
    assert heads == {"q2", "q4"} - {additive["head"].label}
    uniform = [name for name, _ in candidates if name.startswith("uniform")]
    assert uniform == ["uniform q2"]  # q4 everywhere takes 120 bytes: it does not fit
    assert heads == {"q2"}


def test_the_pick_is_the_least_measured_kl_not_the_least_predicted():
    """Oracle: brute force over every fitting choice, on the interacting KL the check measures."""
    left = 100
    allocation = allocate_file(OPTIONS, {}, budget_bytes=100, tensor_budget=left, format_name="test", check=_check())
    chosen = {name: allocation.types[name] for name in OPTIONS}
    measured = {checked.candidate: checked.measured_kl for checked in allocation.checked}
    assert allocation.checked[0].measured_kl == min(measured.values())
    assert _interacting(chosen) == pytest.approx(allocation.checked[0].measured_kl)
    additive = {name: option.label for name, option in allocate(OPTIONS, left).items()}
    assert _interacting(chosen) <= _interacting(additive)
    # On this KL the additive choice (head q4, the rest q2: 0.066) loses to the head at q2 with the rest
    # upgraded (0.035 + 0.2 * 0.036 = 0.042): the check must find the latter.
    assert additive == {"head": "q4", "up": "q2", "down": "q2"}
    assert chosen == {"head": "q2", "up": "q8", "down": "q4"}
    assert allocation.predicted_kl == pytest.approx(sum(o.cost for n, o in _options(chosen).items()))
    section = allocation.manifest_section()
    assert section["chosen"] == allocation.checked[0].candidate != "additive"
    assert section["measured_kl"] == allocation.checked[0].measured_kl
    assert {entry["candidate"] for entry in section["checked"]} >= {"additive"}
    best_possible = min(
        _interacting(dict(zip(OPTIONS, labels, strict=True)))
        for labels in itertools.product(("q2", "q4", "q8"), repeat=3)
        if _fits(_options(dict(zip(OPTIONS, labels, strict=True))), left)
    )
    assert _interacting(chosen) == pytest.approx(best_possible)


def _options(labels: dict[str, str]) -> dict[str, Option]:
    return {name: next(o for o in OPTIONS[name] if o.label == label) for name, label in labels.items()}


def test_only_the_tensors_whose_option_changed_are_approximated_again():
    calls: list[tuple[str, str]] = []
    additive = allocate(OPTIONS, 100)
    candidates = alternatives(OPTIONS, 100, additive)
    pick_measured(candidates, {}, _check(calls))
    expected, held = [], {}
    for _, choice in candidates:
        for name, option in choice.items():
            if held.get(name) != option.label:
                held[name] = option.label
                expected.append((name, option.label))
    assert calls == expected
    assert len(calls) < len(candidates) * len(OPTIONS)


def test_a_candidate_whose_measurement_is_not_finite_is_never_kept():
    check = _check()
    broken = WholeModelCheck(
        check.approximate, lambda replaced: float("nan") if replaced["head"][0, 0] == 4.0 else check.measure(replaced)
    )
    candidates = [("additive", _options({"head": "q4", "up": "q2", "down": "q2"})),
                  ("other", _options({"head": "q2", "up": "q2", "down": "q2"}))]  # fmt: skip
    chosen, checked = pick_measured(candidates, {}, broken)
    assert chosen["head"].label == "q2" and checked[0].candidate == "other"


def test_a_candidate_with_one_tensor_predicted_far_worse_than_the_best_measured_is_not_measured():
    measured: list[str] = []
    check = _check()

    def measure(replaced) -> float:
        measured.append(f"q{int(replaced['head'][0, 0])}")
        return 0.010

    head = OPTIONS["head"]
    rest = {name: OPTIONS[name][1] for name in ("up", "down")}
    candidates = [
        ("additive", {"head": head[2], **rest}),
        ("hopeless", {"head": Option("q2", 40, HOPELESS * 0.010 * 1.01), **rest}),
        ("close", {"head": Option("q4", 80, HOPELESS * 0.010 * 0.99), **rest}),
    ]
    chosen, checked = pick_measured(candidates, {}, WholeModelCheck(check.approximate, measure))
    assert measured == ["q8", "q4"]  # the hopeless one was never put in place
    assert [entry.candidate for entry in checked] == ["additive", "close"]
    assert chosen["head"].label == "q8"  # a tie keeps the earlier candidate


def test_without_a_check_the_additive_choice_stands():
    allocation = allocate_file(OPTIONS, {}, budget_bytes=100, tensor_budget=100, format_name="test")
    assert allocation.checked == []
    assert allocation.manifest_section()["chosen"] == "additive"
    assert allocation.manifest_section()["measured_kl"] is None


def test_pinned_tensors_are_in_place_for_every_candidate():
    seen = []
    check = _check()

    def measure(replaced) -> float:
        seen.append(set(replaced))
        return check.measure({name: values for name, values in replaced.items() if name != "fused"})

    def approximate(name: str, label: str):
        return None if name == "fused" else check.approximate(name, label)

    pinned = {"fused": Option("q8", 8, 0.0), "norm": Option("q8", 8, 0.0)}
    allocate_file(OPTIONS, pinned, 200, 116, "test", WholeModelCheck(approximate, measure))
    assert seen and all(names == {"head", "up", "down", "norm"} for names in seen)  # fused: kept as it was


torch = pytest.importorskip("torch")


def test_whole_model_kl_is_the_hugging_face_forward_with_the_weights_replaced(small_vocab_tokenizer):
    """Oracle: a deep copy of the model with the weights set, run by transformers itself."""
    from test_gguf_helpers import sample_tokens, tiny_llama

    from srcr.exporter.sensitivity import WholeModelKl, probe

    model = tiny_llama(small_vocab_tokenizer, hidden=64, intermediate=128, num_hidden_layers=2)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ids = torch.tensor([sample_tokens(small_vocab_tokenizer)[:96]])
    kl = WholeModelKl(model, ids)
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight", "lm_head.weight"]
    parameters = dict(model.named_parameters(remove_duplicate=False))
    replaced = {name: probe(parameters[name].detach(), 2).numpy() for name in names}
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for name, values in replaced.items():
            changed.get_parameter(name).copy_(torch.from_numpy(values))
        reference = torch.log_softmax(model(ids).logits[0].float(), -1)
        candidate = torch.log_softmax(changed(ids).logits[0].float(), -1)
    expected = float((reference.exp() * (reference - candidate)).sum(-1).mean())
    assert kl(replaced) == pytest.approx(expected, rel=1e-4)
    assert expected > 0
    assert kl({}) == pytest.approx(0.0, abs=1e-7)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    with pytest.raises(SrcrError, match="no weight 'model.nope'"):
        kl({"model.nope": replaced[names[0]]})
