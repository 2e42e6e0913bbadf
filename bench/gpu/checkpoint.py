"""A random-weight Llama reward checkpoint of any shape, built directly on the target device.

`reward_server.supervisor.demo_checkpoint.build_checkpoint` initialises in fp32 on the CPU, which for an
8B shape means 32 GB of host memory and minutes of single-threaded init. Here the model is
created in the target dtype on the target device (bf16 on a GPU: about 16 GB and a second of
init), its weights are drawn explicitly with a seeded generator (so the result does not depend
on transformers' init rules), and it is saved as sharded safetensors with the demo tokenizer.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.gpu.flops import LlamaShape

_LOGGER = logging.getLogger(__name__)

WEIGHT_STD = 0.02   # like Llama's initializer_range
TOKENIZER_VOCAB = 32000  # the BPE trainer stops earlier on the demo corpus (about 7.4k tokens)
PAD_TOKEN = "<|eot_id|>"  # pad == end of turn, as in Llama-3 reward models: pooled before the end


@dataclass
class BuiltCheckpoint:
    """Where a checkpoint was written and what it cost."""

    path: str
    shape: dict
    dtype: str
    device: str
    num_labels: int
    parameters: int
    bytes_on_disk: int
    shards: int
    tokenizer_seconds: float
    init_seconds: float
    save_seconds: float

    def to_dict(self) -> dict:
        """JSON-ready record."""
        return asdict(self)


def from_pretrained_dtype_kwarg() -> str:
    """`dtype` (transformers >= 4.56) or `torch_dtype` (older, e.g. inside an NGC container)."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def build_random_checkpoint(out_dir: str | Path, shape: LlamaShape, device: str = "cuda", dtype: str = "bfloat16",
                            num_labels: int = 1, seed: int = 0, max_shard_size: str = "4GB") -> BuiltCheckpoint:
    """Write a random-weight `LlamaForSequenceClassification` checkpoint with the demo tokenizer.

    Args:
        out_dir: directory to create.
        shape: model dimensions (e.g. `flops.LLAMA31_8B`, or `.with_layers(2)` for a quick run).
        device: where to create and initialise the weights ("cuda" or "cpu").
        dtype: "bfloat16" (GPU) or "float32" (CPU); also the dtype stored on disk.
        num_labels: K, outputs of the `score` head.
        seed: seed of the weights and of the tokenizer's corpus.
        max_shard_size: safetensors shard size passed to `save_pretrained`.

    Returns:
        A `BuiltCheckpoint` with the measured times.
    """
    import torch
    import transformers

    from reward_server.supervisor.demo_checkpoint import build_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tokenizer = build_tokenizer("llama", min(TOKENIZER_VOCAB, shape.vocab), seed, pad_token=PAD_TOKEN)
    tokenizer_seconds = time.perf_counter() - start

    start = time.perf_counter()
    config = transformers.LlamaConfig(
        vocab_size=max(shape.vocab, len(tokenizer)), hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate, max_position_embeddings=shape.max_positions,
        rope_theta=shape.rope_theta, rms_norm_eps=1e-5, tie_word_embeddings=False, num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch_dtype = getattr(torch, dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # parameters are born in the target dtype, never in fp32
    try:
        with torch.device(device):
            model = transformers.LlamaForSequenceClassification(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.startswith("score."):
                # 1/sqrt(hidden) gives scores of order 1 after the final RMSNorm.
                param.normal_(0.0, shape.hidden ** -0.5, generator=generator)
            else:
                param.normal_(0.0, WEIGHT_STD, generator=generator)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    init_seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())

    start = time.perf_counter()
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    _add_legacy_config_keys(out / "config.json", shape, dtype)
    save_seconds = time.perf_counter() - start
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    weights = sorted(out.glob("*.safetensors"))
    built = BuiltCheckpoint(
        path=str(out), shape=asdict(shape), dtype=dtype, device=device, num_labels=num_labels, parameters=params,
        bytes_on_disk=sum(p.stat().st_size for p in weights), shards=len(weights),
        tokenizer_seconds=tokenizer_seconds, init_seconds=init_seconds, save_seconds=save_seconds)
    _LOGGER.info("random checkpoint %s: %d params, %d shards, init %.1fs, save %.1fs", out, params, len(weights),
                 init_seconds, save_seconds)
    return built


def _add_legacy_config_keys(path: Path, shape: LlamaShape, dtype: str) -> None:
    """Also write the config keys transformers 4.x reads (`rope_theta`, `torch_dtype`).

    transformers 5 saves them as `rope_parameters` and `dtype`; an older reader (TensorRT-LLM's
    converter inside an NGC container) would silently fall back to rope_theta 10000 and build
    an engine that disagrees with the reference. transformers 5 ignores the extra keys.
    """
    config = json.loads(path.read_text())
    config.setdefault("rope_theta", shape.rope_theta)
    config.setdefault("torch_dtype", dtype)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def saved_dtype(checkpoint: str | Path) -> str | None:
    """The dtype recorded in a checkpoint's config.json (`dtype` or `torch_dtype`)."""
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype")
