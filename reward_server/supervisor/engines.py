"""Which model fills the ensembles' engine step: the one place where the engine is chosen.

Both engine-step models have the same interface (input_ids, input_lengths -> rewards [K]), so
the `reward_pipeline`, `reward_ids_pipeline` and `reward_text_pipeline` ensembles behind the public entry
points are the same for every engine: clients cannot
tell which one serves them. Choosing an engine means serving its models and naming its step
model in the ensembles.
"""

from __future__ import annotations

from dataclasses import dataclass

# Models every deployment serves, whatever the engine.
# The public entry points are Python models in front of the ensembles `*_pipeline` (pipeline/entry.py).
COMMON_MODELS = ("preprocessing", "postprocessing", "reward", "reward_ids", "reward_text",
                 "reward_pipeline", "reward_ids_pipeline", "reward_text_pipeline")


@dataclass(frozen=True)
class Engine:
    """One engine: the model in the ensembles' engine step, and every model it needs."""

    name: str
    step_model: str
    models: tuple[str, ...]


ENGINES = {
    # PyTorch (CPU fp32, CUDA bf16): packed rows, shared prompts computed once.
    "torch": Engine("torch", "reward_engine", ("reward_engine",)),
    # TensorRT-LLM (GPU): a fan-out step in front of the `tensorrtllm` backend's in-flight batcher.
    "tensorrt_llm": Engine("tensorrt_llm", "reward_engine_trtllm", ("reward_engine_trtllm", "tensorrt_llm")),
}
STEP_MODELS = frozenset(e.step_model for e in ENGINES.values())
TENSORRT_LLM_MODEL = "tensorrt_llm"


def engine(name: str) -> Engine:
    """The engine called `name`.

    Raises:
        ValueError: an unknown engine.
    """
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of {sorted(ENGINES)}")
    return ENGINES[name]


def served_models(name: str) -> tuple[str, ...]:
    """Every model a server with this engine loads."""
    return COMMON_MODELS + engine(name).models


def wire_ensemble(config, name: str) -> None:
    """Point an ensemble's engine step (a parsed `ModelConfig`) at this engine's step model, in place."""
    for step in config.ensemble_scheduling.step:
        if step.model_name in STEP_MODELS:
            step.model_name = engine(name).step_model
