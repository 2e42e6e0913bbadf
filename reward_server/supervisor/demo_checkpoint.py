"""Build small random-weight reward checkpoints in the Hugging Face layout.

The demo checkpoint lets `make serve` and the tests run without downloading weights: a
Llama (or Qwen2) decoder with a reward head, a byte-level BPE tokenizer trained here on a
generated corpus, and a chat template in the style of the architecture's instruct models.
Its scores are meaningless; only the plumbing is real.

Everything is deterministic for a given seed, so two builds with the same arguments write
the same weights and the same tokenizer.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from reward_server.pipeline.heads import DEFAULT_STEP_TAG

_LOGGER = logging.getLogger(__name__)

# Llama-3 style: BOS comes from the template, every turn ends with <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "<|pad|>"]

# ChatML, as Qwen2 uses it: no BOS token at all.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class ModelSize:
    """Transformer dimensions of one demo size."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    positions: int = 4096  # max_position_embeddings: the longest conversation it accepts
    window: int = 4096     # sliding window of the families that have one
    head_dim: int | None = None  # None: hidden // heads
    arch: str | None = None      # the family this size is the shape of (None: any)
    dtype: str = "float32"       # the dtype the weights are saved in (and `--dtype auto` reads)


SIZES = {
    "tiny": ModelSize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=2048, window=32),
    # ~25M non-embedding parameters: the benchmark model of DESIGN.md.
    "small": ModelSize(hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1408, vocab=32000),
    # the same weights (no learned positions: rotary) accepting 32k-token conversations, as
    # long-context reward models do (Skywork-Reward-V2, Qwen3-based): the `long` benchmark
    "small-long": ModelSize(hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1408, vocab=32000,
                            positions=32768),
    # Skywork-Reward-V2-Qwen3-0.6B's exact shape (Qwen3ForSequenceClassification, bf16 weights), random
    # weights: a real reward model's arithmetic for benchmarks (bench/), without a download.
    "qwen3-0.6b": ModelSize(hidden=1024, layers=28, heads=16, kv_heads=8, intermediate=3072, vocab=151936,
                            positions=40960, window=40960, head_dim=128, arch="qwen3", dtype="bfloat16"),
}
# The tokenizer trained for a size has at most this many entries (the embedding may be larger, as
# real checkpoints' are): a larger vocabulary would not be filled by the corpus, only slow the build.
TOKENIZER_VOCAB = 32000

# Each family's config class and class-name prefix (what sets each apart: `_family_settings`).
FAMILIES = {"llama": ("LlamaConfig", "Llama"), "qwen2": ("Qwen2Config", "Qwen2"), "qwen3": ("Qwen3Config", "Qwen3"),
            "mistral": ("MistralConfig", "Mistral"), "gemma2": ("Gemma2Config", "Gemma2"),
            "gemma3": ("Gemma3TextConfig", "Gemma3Text")}
ARCHITECTURES = tuple(FAMILIES)
HEADS = ("sequence_classification", "lm_logits", "process")

_SYLLABLES = ["ka", "ri", "to", "mel", "sa", "un", "pe", "lo", "vi", "dra", "ne", "sho", "qu",
              "am", "bor", "ti", "ex", "ga", "lu", "fen", "or", "is", "zy", "wa", "che", "mo"]
_EXTRA_TEXT = ["Grüße aus München", "naïve café", "日本語のテキスト", "Привет, мир",
               "emoji 🙂 ok", "x = f(y) + 2", "def score(r): return r", "1, 2, 3... 42!"]


def _corpus(seed: int, lines: int) -> list[str]:
    """Deterministic pseudo-text with a Zipf-like word distribution and some non-ASCII."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(6000)]
    # cumulative once: what `choices(words, weights)` would sum again on every call (same draws)
    cumulative = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))
    out = []
    for _ in range(lines):
        sentence = " ".join(rng.choices(words, cum_weights=cumulative, k=rng.randint(4, 24)))
        if rng.random() < 0.1:
            sentence += " " + rng.choice(_EXTRA_TEXT)
        out.append(sentence.capitalize() + rng.choice([".", "?", "!", ":"]))
    return out


def build_tokenizer(arch: str, vocab_size: int, seed: int, pad_token: str | None = None):
    """Train a byte-level BPE tokenizer and wrap it as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    llama_style = arch in ("llama", "mistral")
    specials = LLAMA3_SPECIALS if llama_style else CHATML_SPECIALS
    if arch.startswith("gemma"):  # Gemma's vocabulary reserves tokens (<unused0>...) no text uses
        specials = specials + [f"<unused{i}>" for i in range(8)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(seed, 20000 if vocab_size > 4096 else 4000), trainer)

    if llama_style:
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>",
                                       pad_token=pad_token or "<|pad|>")
        fast.chat_template = LLAMA3_TEMPLATE
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                       pad_token=pad_token or "<|endoftext|>")
        fast.chat_template = CHATML_TEMPLATE
    return fast


def build_checkpoint(out_dir: str | Path, size: str = "tiny", arch: str = "llama",
                     head: str = "sequence_classification", num_labels: int = 1,
                     pad_token: str | None = None, seed: int = 0, max_positions: int | None = None) -> Path:
    """Write a random-weight reward checkpoint to `out_dir` and return its path.

    Args:
        out_dir: directory to create (or overwrite files in).
        size: a key of `SIZES`.
        arch: a key of `FAMILIES` (llama, qwen2, qwen3, mistral, gemma2, gemma3). The chat
            template is the demo's (Llama-3's for llama and mistral, ChatML for the others), not
            the family's own.
        head: "sequence_classification" (a `score` head with `num_labels` outputs),
            "lm_logits" (a causal LM whose reward is read from logits at the final token), or
            "process" (a process reward model in Qwen2.5-Math-PRM's layout: the backbone under
            `model.`, a Linear(h, h), ReLU, Linear(h, 2) head under `score.0` / `score.2`, the
            `<extra_0>` step tag in the tokenizer, `*ForProcessRewardModel` in the config).
        num_labels: outputs of the classification head.
        pad_token: override of the pad token (e.g. "<|eot_id|>" to mimic Llama-3 reward models
            whose pad equals the end-of-turn token).
        seed: seed for the corpus, the tokenizer and the weights.
        max_positions: override of the size's max_position_embeddings (the weights do not change).

    Raises:
        ValueError: for an unknown size, architecture or head.
    """
    import torch
    import transformers

    if size not in SIZES or arch not in ARCHITECTURES or head not in HEADS:
        raise ValueError(f"unknown size/arch/head {size!r}/{arch!r}/{head!r}; "
                         f"choose from {sorted(SIZES)}, {ARCHITECTURES}, {HEADS}")
    dims = SIZES[size]
    if dims.arch is not None and arch == "llama":  # the default family: take the size's own
        arch = dims.arch
    elif dims.arch is not None and arch != dims.arch:
        raise ValueError(f"size {size!r} is the shape of a {dims.arch} model, not {arch}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(arch, min(dims.vocab, TOKENIZER_VOCAB), seed, pad_token)
    if head == "process":
        tokenizer.add_special_tokens({"additional_special_tokens": [DEFAULT_STEP_TAG]})
    vocab = max(dims.vocab, len(tokenizer))
    common = dict(vocab_size=vocab, hidden_size=dims.hidden, num_hidden_layers=dims.layers,
                  num_attention_heads=dims.heads, num_key_value_heads=dims.kv_heads,
                  intermediate_size=dims.intermediate, max_position_embeddings=max_positions or dims.positions,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
                  num_labels=num_labels)
    config_name, prefix = FAMILIES[arch]
    config = getattr(transformers, config_name)(**common, **_family_settings(arch, dims))
    suffix = {"sequence_classification": "ForSequenceClassification", "lm_logits": "ForCausalLM",
              "process": "Model"}[head]
    # Gemma-3's text-only causal LM is Gemma3ForCausalLM (Gemma3TextForCausalLM does not exist)
    model_cls = (getattr(transformers, prefix + suffix, None)
                 or getattr(transformers, prefix.replace("Text", "") + suffix))

    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if head == "process":
        _save_process_model(out, model, config, prefix + "ForProcessRewardModel")
    else:
        with torch.no_grad():
            # Default init gives rewards near 0.01; a wider head makes scores easier to read.
            head_module = model.score if head == "sequence_classification" else model.lm_head
            head_module.weight.normal_(0.0, 1.0 / dims.hidden ** 0.5)
        model.to(getattr(torch, dims.dtype)).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _LOGGER.info("wrote %s %s %s checkpoint (%d params) to %s", size, arch, head,
                 sum(p.numel() for p in model.parameters()), out)
    return out


def _family_settings(arch: str, dims: ModelSize) -> dict:
    """What sets a family apart from Llama in a small random model: Qwen3's per-head q/k norms need
    its head size; Mistral's window over every layer; Gemma-2's alternating sliding and global
    layers, attention logit softcapping, its own query scaling and final-logit softcapping; Gemma-3's
    window pattern. Windows are short in `tiny` (32 tokens) so tests cross them."""
    head_dim = dims.head_dim or dims.hidden // dims.heads
    alternate = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(dims.layers)]
    gemma = {"head_dim": head_dim, "sliding_window": dims.window, "query_pre_attn_scalar": int(head_dim * 1.5),
             "layer_types": alternate}
    return {"llama": {}, "qwen2": {}, "qwen3": {"head_dim": head_dim},
            "mistral": {"head_dim": head_dim, "sliding_window": dims.window},
            "gemma2": {**gemma, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
            "gemma3": gemma}[arch]


def _save_process_model(out: Path, backbone, config, architecture: str) -> None:
    """Write `backbone` and a random two-layer step head as Qwen2.5-Math-PRM ships them (its remote
    code is named in `auto_map` but not shipped: the server reads the head from the weights)."""
    import torch
    from safetensors.torch import save_file

    hidden = config.hidden_size
    weights = {f"model.{name}": tensor.contiguous() for name, tensor in backbone.state_dict().items()}
    weights.update({"score.0.weight": torch.randn(hidden, hidden) / hidden ** 0.5,
                    "score.0.bias": torch.randn(hidden) * 0.1,
                    "score.2.weight": torch.randn(2, hidden) / hidden ** 0.5,
                    "score.2.bias": torch.randn(2) * 0.1})
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.architectures = [architecture]
    config.auto_map = {"AutoModel": f"modeling_prm.{architecture}"}
    config.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: `reward-server demo-checkpoint OUT_DIR [--size tiny|small]`."""
    parser = argparse.ArgumentParser(prog="reward-server demo-checkpoint", description=__doc__.split("\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the builder's options to `parser`."""
    parser.add_argument("out_dir")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    parser.add_argument("--head", choices=HEADS, default="sequence_classification")
    parser.add_argument("--num-labels", type=int, default=1)
    parser.add_argument("--pad-token", default=None)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> Path:
    """Build the checkpoint described by parsed `args`."""
    return build_checkpoint(args.out_dir, size=args.size, arch=args.arch, head=args.head,
                            num_labels=args.num_labels, pad_token=args.pad_token, seed=args.seed)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()


def demo_checkpoint_dir(size: str) -> Path:
    """Where the demo checkpoint of `size` lives (built on first use)."""
    cache = Path(os.environ.get("REWARD_SERVER_CACHE", Path.home() / ".cache" / "reward-server"))
    return cache / f"demo-{size}"


def ensure_demo_checkpoint(size: str) -> Path:
    """Build the demo checkpoint once; a finished build is renamed into place atomically."""
    target = demo_checkpoint_dir(size)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".demo-{size}-", dir=target.parent))
    _LOGGER.info("building the %s demo checkpoint in %s", size, target)
    build_checkpoint(staging, size=size)
    try:
        staging.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(staging, ignore_errors=True)
    return target
