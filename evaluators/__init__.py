"""srcr evaluators: what a compressed artifact retains of its dense base model (docs/metrics.md).

Every evaluator talks to a `targets.base.Runtime` only, so the deployed artifact is measured in its
own runtime; `evaluators.reference` builds the dense model's reference pack and scores against it.
"""
