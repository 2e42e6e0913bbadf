"""The PyTorch reward engine: token ids in, raw reward outputs out.

Sequences are packed, without padding, into rows of at most `token_budget` tokens; each row
is one forward pass whose linear layers see the whole row at once, while attention runs per
sequence (`attention.packed_attention`), causal within it. The reward head is applied only at each
sequence's pooled position (never full-vocabulary logits at every position), and sequences
are cut just after that position: in a causal model later tokens cannot change it. The last
decoder layer computes only the positions that are read (fused layers with the native kernel:
`attention.attention_at_reads`); every position's keys and values are still recorded.

Sequences that share a long prefix (one prompt, many responses) compute it once: a first
pass over the prefixes records their keys and values, and each member's own suffix then
attends to them, its positions continuing where the prefix ended.

Optionally (`compile=True`) each decoder layer is compiled with torch.compile and dynamic
shapes, attention excluded: the element-wise work (norms, rotary embedding, activation,
residuals) is fused into few kernels, compiled once at load for every row length and cached
on disk for later starts.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from reward_server.pipeline.batching import (DEFAULT_MIN_SHARED, DEFAULT_TOKEN_BUDGET, group_shared_prefixes,
                                             pack_sequences)
from reward_server.pipeline.heads import (ProcessHead, RewardHead, decoder_layers, detect_head_type, parse_indices,
                                          process_head, process_layout, resolve_step_tag, split_model, tag_positions)
from reward_server.pipeline.torch_engine.attention import (ATTENTION, KVBuffer, Segment, attention_kernel,
                                                           packed_row, register_attention)
from reward_server.pipeline.torch_engine import kernels, prefix_cache
from reward_server.pipeline.torch_engine.checkpoint import check_checkpoint

_LOGGER = logging.getLogger(__name__)
# Asked before each packed row: which of the call's sequences are still wanted (one bool each).
Keep = Callable[[], Sequence[bool]]
DTYPES = ("auto", "float32", "bfloat16")
# Where compiled kernels are kept between starts (unless TORCHINDUCTOR_CACHE_DIR says otherwise).
COMPILE_CACHE = Path(os.environ.get("REWARD_SERVER_CACHE", Path.home() / ".cache" / "reward-server")) / "torch-compile"


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX); without it
    bf16 runs emulated, hundreds of times slower than fp32 (DESIGN.md: 0.3 GFLOP/s)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype: str, device_type: str, checkpoint_dtype: str | None) -> str:
    """The dtype the engine runs in: "float32" or "bfloat16".

    "auto": bf16 on CUDA; on CPU the checkpoint's dtype when it is bf16 and the CPU has bf16
    matrix instructions, else fp32.

    Raises:
        ValueError: an unknown dtype, or bf16 asked for on a CPU without fast bf16.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "auto":
        if device_type == "cuda":
            return "bfloat16"
        return "bfloat16" if checkpoint_dtype == "bfloat16" and cpu_has_fast_bf16() else "float32"
    if dtype == "bfloat16" and device_type == "cpu" and not cpu_has_fast_bf16():
        raise ValueError("bfloat16 on this CPU would be emulated (no AVX-512 BF16 or AMX): use float32 or auto")
    return dtype


def _utf8_text_files() -> None:
    """Make open()'s default encoding UTF-8 when the process runs under the C locale.

    Triton's Python-backend stub embeds an isolated interpreter that never sets its locale, so
    text files open as ASCII there, and the compiler fails reading its own UTF-8 templates
    (UnicodeDecodeError in torch/_inductor, measured). The setting is per process.
    """
    import locale

    if locale.getpreferredencoding(False).lower().replace("-", "") != "utf8":
        try:
            locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
        except locale.Error:
            _LOGGER.warning("no UTF-8 locale: compilation may fail reading non-ASCII files")


def _prefix_cache(mb: float | None, kernel: Any) -> prefix_cache.PrefixCache | None:
    """The engine's prefix cache for a bound of `mb` megabytes (None: the default, 0: none)."""
    if mb is not None and mb < 0:
        raise ValueError(f"prefix_cache_mb must be >= 0, got {mb}")
    if mb == 0:
        return None
    if kernel is None:
        if mb is not None:
            _LOGGER.warning("prefix cache off: it needs the native attention kernel, whose fixed summation order "
                            "keeps a reused prefix's scores bit-identical")
        return None
    max_bytes = prefix_cache.default_max_bytes() if mb is None else int(mb * (1 << 20))
    _LOGGER.info("prefix cache: up to %.0f MB", max_bytes / (1 << 20))
    return prefix_cache.PrefixCache(max_bytes)


def _per_position(module, hidden) -> Any:
    """`module` applied to each row of `hidden` [S, H] alone: a product's result for a row must not
    depend on how many rows it was computed with (the heads are tiny: no measurable cost)."""
    import torch

    return torch.cat([module(hidden[j:j + 1]) for j in range(hidden.shape[0])])


def _place(segment: Segment, source: KVBuffer | None, grows: bool = False) -> None:
    """Where a recording segment's keys go: in place after its prefix's, in the buffer `source` that
    holds them, when that buffer has room and nothing was written past the prefix yet; else in a new
    buffer, the prefix copied first, with room to grow when `grows` (the segment extends a whole
    cached sequence: a conversation's next turn, a solution's next step, which come back longer
    again; a sequence that only shares a prompt gets none, so the cache holds more of those)."""
    if source is not None and source.claim(segment.offset, len(segment.ids)):
        segment.buffer, segment.copy_prefix = source, False
    else:
        segment.buffer = KVBuffer(segment.offset + len(segment.ids), room=grows)


@dataclass
class EngineStats:
    """Running totals of what the engine computed, for benchmarks and metrics."""

    sequences: int = 0
    tokens: int = 0          # tokens run through the backbone (a shared prefix counts once)
    shared_tokens: int = 0   # tokens not computed thanks to shared prefixes
    padded_tokens: int = 0   # tokens computed including padding (packing leaves none)
    forward_seconds: float = 0.0
    microbatches: int = 0    # packed rows run

    @property
    def padding_ratio(self) -> float:
        """Fraction of computed tokens that were padding."""
        return 0.0 if not self.padded_tokens else 1.0 - self.tokens / self.padded_tokens


@dataclass
class RewardEngine:
    """Scores token-id sequences with a loaded reward model.

    Build one with `RewardEngine.from_checkpoint`; call `score`.
    """

    backbone: Any
    head: RewardHead | None  # None for a process reward model (`process` reads it)
    device: Any
    num_outputs: int
    token_budget: int = DEFAULT_TOKEN_BUDGET
    min_shared: int = DEFAULT_MIN_SHARED  # 0 turns prefix sharing off
    kernel: Any = None  # the native attention module, or None: torch's SDPA (`attention_kernel`)
    process: ProcessHead | None = None  # set for process reward models (`score_steps`)
    cache: prefix_cache.PrefixCache | None = None  # sequences scored before (`prefix_cache_mb`); None: off
    stats: EngineStats = field(default_factory=EngineStats)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, head_type: str = "auto",
                        reward_indices: str | Sequence[int] | None = None, device: str = "auto",
                        threads: int | None = None, token_budget: int = DEFAULT_TOKEN_BUDGET,
                        min_shared: int = DEFAULT_MIN_SHARED, dtype: str = "auto",
                        compile: bool = False, fused: bool = True, attention: str = "auto",
                        step_tag: str | int | None = None,
                        step_labels: str | Sequence[int] | None = None,
                        prefix_cache_mb: float | None = None) -> "RewardEngine":
        """Load a local Hugging Face reward checkpoint.

        Args:
            checkpoint: directory with config.json and weights.
            head_type: "auto" (from the config's architectures), "sequence_classification",
                "lm_logits" or "process" (a process reward model: `score_steps`).
            reward_indices: for lm_logits, the vocabulary indices read as rewards ("0,1").
            device: "auto" (CUDA when present), "cpu" or "cuda[:N]".
            dtype: "auto" (see `resolve_dtype`), "float32" or "bfloat16".
            compile: compile each decoder layer (dynamic shapes, attention excluded) at load.
            fused: replace the decoder layers of the Llama family by fused ones
                (`torch_engine.fused`: same arithmetic, fewer and larger products, prepacked weights).
            attention: "auto", "native" (reward_server/pipeline/torch_engine/kernels: batch-invariant, causal block
                skipping, CPU) or "sdpa" (torch's); see `attention_kernel`.
            step_tag: process heads: the step tag, a token of the vocabulary or its id (default:
                "<extra_0>" for a `*ForProcessRewardModel` whose tokenizer has it).
            step_labels: process heads on a `*ForCausalLM`: the (positive, negative) label token
                ids ("+" and "-" in Math-Shepherd), e.g. "648,387".
            threads: torch intra-op threads (CPU); None leaves torch's default.
            token_budget: tokens per packed row (one forward pass).
            min_shared: shortest token prefix worth computing once for a group; 0 disables.
            prefix_cache_mb: the most memory the prefix cache holds (keys and values of sequences
                scored before, reused by later sequences that continue them: `prefix_cache`); None:
                `prefix_cache.default_max_bytes()`; 0: off. It needs the native attention kernel
                (whose fixed summation order keeps a reused prefix's scores bit-identical); with
                SDPA it stays off.

        Raises:
            ValueError: the head cannot be determined or an index is out of range.
            OSError: the checkpoint cannot be read.
        """
        import torch
        import transformers

        config = check_checkpoint(checkpoint, head_type, tokenizer=False)
        text = config.get("text_config", config)
        head_type = detect_head_type(config.get("architectures"), head_type)
        indices = parse_indices(reward_indices)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        checkpoint_dtype = config.get("dtype") or config.get("torch_dtype")
        dtype_name = resolve_dtype(dtype, device.type, checkpoint_dtype)
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        kernel = attention_kernel(attention, device.type, dtype_name, head_dim)  # before minutes of loading
        dtype = getattr(torch, dtype_name)
        if threads and device.type == "cpu":
            torch.set_num_threads(threads)
        architecture = (config.get("architectures") or [""])[0]
        auto = (transformers.AutoModelForSequenceClassification if head_type == "sequence_classification"
                else transformers.AutoModelForCausalLM)
        tag_id = labels = None
        if head_type == "process":
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
            tag_id = resolve_step_tag(tokenizer, architecture, step_tag)
            labels = parse_indices(step_labels) if step_labels not in (None, "") else None
            layout = process_layout(architecture, labels)
            if layout == "remote":  # remote code: the backbone alone, head from the weights
                auto = transformers.AutoModel
            elif layout == "token_classification":
                auto = transformers.AutoModelForTokenClassification
        start = time.perf_counter()
        attention = register_attention()
        model = auto.from_pretrained(str(checkpoint), dtype=dtype, attn_implementation=ATTENTION)
        model.to(device).eval()
        if head_type == "process":
            process = process_head(model, checkpoint, tag_id, labels)
            backbone, head = model.base_model, None
        else:
            process = None
            backbone, head = split_model(model, head_type, indices)
        if fused:
            from reward_server.pipeline.torch_engine.fused import fuse_layers

            # inductor cannot lower a product on an eagerly prepacked weight: compiled layers keep
            # plain weights (inductor's own freezing would prepack them, at a much longer compile)
            # the native element-wise steps come with the native attention kernel; compiled layers fuse
            # their own (the compiler cannot trace into the extension)
            _LOGGER.info("%s", fuse_layers(backbone, attention, device, dtype, prepack=not compile,
                                           native=None if compile else kernel))
        outputs = 2 if process is not None else head.module.weight.shape[0]
        _LOGGER.info("loaded %s (%s, %d outputs) on %s %s, %s attention, in %.1fs", checkpoint, head_type, outputs,
                     device, dtype, "SDPA" if kernel is None else f"native ({kernels.describe(kernel)})",
                     time.perf_counter() - start)
        engine = cls(backbone, head, device, outputs, token_budget, min_shared, kernel, process,
                     _prefix_cache(prefix_cache_mb, kernel))
        with torch.inference_mode():  # one token through every layer: unsupported attention features fail here
            engine._run([Segment([0])], {})
        engine.stats = EngineStats()
        if compile:
            engine.compile()
        return engine

    def compile(self) -> float:
        """Compile every decoder layer (dynamic row length; attention stays eager) and warm it up
        on two row lengths, so no request pays for compilation. Returns the seconds it took.

        Kernels are cached on disk (`COMPILE_CACHE`): later starts reuse them.
        """
        import torch

        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(COMPILE_CACHE))
        _utf8_text_files()
        started = time.perf_counter()
        for layer in decoder_layers(self.backbone):
            layer.compile(dynamic=True)
        vocab = self.backbone.config.vocab_size
        with torch.inference_mode():  # two lengths: the second call proves the shape is dynamic
            for length in (48, 80):
                self._run([Segment([i % vocab for i in range(1, length + 1)])], {})
        self.stats = EngineStats()
        seconds = time.perf_counter() - started
        _LOGGER.info("compiled %d decoder layers in %.1fs", len(decoder_layers(self.backbone)), seconds)
        return seconds

    def tokens_done(self) -> int:
        """Tokens scored so far, computed or not (shared within a call, or held by the prefix cache):
        the engine's progress, which its scheduler measures its rate by."""
        reused = 0 if self.cache is None else self.cache.stats.reused_tokens
        return self.stats.tokens + self.stats.shared_tokens + reused

    def score(self, sequences: Sequence[Sequence[int]], keep: Keep | None = None) -> np.ndarray:
        """Raw reward outputs, float32 [N, K], one row per sequence in input order.

        `keep`, when given, is asked before every packed row which sequences are still wanted
        (one bool each); the others are left out of the rest of the work and their rows are NaN.
        A kept sequence's scores are the same bits either way (the engine is batch invariant).

        Raises:
            ValueError: an empty sequence, or a process head (see `score_steps`).
        """
        import torch

        if self.process is not None:
            raise ValueError("this model is a process reward model: it scores steps (score_steps)")
        rows = []
        for i, ids in enumerate(sequences):
            if len(ids) == 0:
                raise ValueError(f"sequence {i} is empty")
            rows.append(list(ids[: self.head.position(ids) + 1]))
        hidden = self._hidden(rows, [[len(row) - 1] for row in rows], [len(row) for row in rows], keep)
        out = np.full((len(rows), self.num_outputs), np.nan, dtype=np.float32)
        done = [i for i, h in enumerate(hidden) if h is not None]
        if done:
            with torch.inference_mode():
                out[done] = torch.cat([_per_position(self.head.module, hidden[i]) for i in done]).float().cpu().numpy()
        self.stats.sequences += len(done)
        return out

    def score_steps(self, sequences: Sequence[Sequence[int]], keep: Keep | None = None) -> list[np.ndarray]:
        """A process reward model's label logits at every step tag: float32 [S_i, 2] per sequence,
        ordered (negative, positive) (`reward_server.pipeline.scoring.step_scores` turns them into step
        scores). Each sequence is cut after its
        last tag; a shared prompt is computed once up to, never past, a member's first tag. `keep` as
        in `score`; a sequence left out gets a NaN row per tag.

        Raises:
            ValueError: not a process head, or a sequence without a step tag (named by its index).
        """
        import torch

        if self.process is None:
            raise ValueError("this model has an outcome reward head: it scores whole sequences (score)")
        rows, reads = [], []
        for i, ids in enumerate(sequences):
            tags = tag_positions(ids, self.process.tag_id)
            if not tags:
                raise ValueError(f"sequence {i} has no step tag (token id {self.process.tag_id})")
            rows.append(list(ids[: tags[-1] + 1]))
            reads.append(tags)
        hidden = self._hidden(rows, reads, [tags[0] + 1 for tags in reads], keep)
        with torch.inference_mode():
            out = [np.full((len(read), 2), np.nan, dtype=np.float32) if h is None else
                   _per_position(self.process.module, h).float().cpu().numpy() for h, read in zip(hidden, reads)]
        self.stats.sequences += sum(h is not None for h in hidden)
        return out

    def _hidden(self, rows: list[list[int]], reads: list[list[int]], shareable: list[int],
                keep: Keep | None = None) -> list[Any]:
        """Final hidden states of each row at the positions `reads[i]` (ascending), one
        [len(reads[i]), H] tensor per row (None for a row `keep` left out). Rows sharing a prefix of
        at least `min_shared` tokens within their first `shareable[i]` tokens compute it once (a row
        always keeps one token of its own); a row or a group's prompt continuing a sequence held by
        the prefix cache starts where the cached keys end.

        A group whose prompt and members' own tokens fit one packed row together is computed in one
        forward pass: the prompt is a segment of the row, its keys and values recorded at each layer
        before the members' attention reads them (the same bits as in a pass of its own: every step
        is batch invariant). A larger group's prompt runs first, in rows of prompts. With the cache
        on, every row records its keys and values, and the cache keeps them once its pass ends."""
        import torch

        limited = [row[:n] for row, n in zip(rows, shareable)]
        groups = group_shared_prefixes(limited, self.min_shared)[0] if self.min_shared > 0 else []
        store: dict[Any, dict[int, tuple[Any, Any]]] = {}
        segments = [Segment(row, reads=read) for row, read in zip(rows, reads)]
        cached = [self._from_cache(i, rows[i], reads[i], store) for i in range(len(rows))]
        for i, hit in enumerate(cached):
            if hit is not None:
                segments[i] = Segment(rows[i][hit[0]:], prefix=("cache", i), offset=hit[0],
                                      reads=[r - hit[0] for r in reads[i] if r >= hit[0]])
        # units packed into rows: a unit is a list of segment indices, a prompt as -1 - its group key
        units: list[list[int]] = []
        alone_prompts: list[int] = []  # groups too large for one row: prompts in a pass of their own
        prompts: dict[int, Segment] = {}
        grouped: set[int] = set()
        for key, group in enumerate(groups):
            # a member whose cached prefix reaches past the prompt's end is better served by the cache
            members = [i for i in group.members if cached[i] is None or cached[i][0] < group.prefix_length]
            if len(members) < 2:
                continue
            for i in members:
                segments[i] = Segment(rows[i][group.prefix_length:], prefix=key, offset=group.prefix_length,
                                      reads=[r - group.prefix_length for r in reads[i]])
                cached[i] = None
            prompts[key] = self._prompt(key, rows[members[0]][:group.prefix_length], store)
            self.stats.shared_tokens += (len(members) - 1) * group.prefix_length
            grouped.update(members)
            together = len(prompts[key].ids) + sum(len(segments[i].ids) for i in members)
            if together <= self.token_budget:
                units.append([-1 - key, *members])
            else:
                alone_prompts.append(key)
                units.extend([i] for i in members)
        units.extend([i] for i in range(len(rows)) if i not in grouped)
        if self.cache is not None:
            for i, segment in enumerate(segments):
                segment.record = ("row", i)
                # its keys go where its prefix's end, when nothing was written there yet
                if i in grouped:
                    _place(segment, prompts[segment.prefix].buffer)
                elif cached[i] is not None:
                    _place(segment, cached[i][2].buffer, grows=cached[i][0] == len(cached[i][2].ids))
                else:
                    _place(segment, None)
                # a hit: the row continues cached keys, itself or through its group's prompt
                hit = cached[i] is not None or (i in grouped and prompts[segment.prefix].prefix is not None)
                self.cache.stats.hits += hit
                self.cache.stats.misses += not hit
                self.cache.stats.reused_tokens += 0 if cached[i] is None else cached[i][0]

        def size(index: int) -> int:
            return len(prompts[-1 - index].ids) if index < 0 else len(segments[index].ids)

        def alive_members(indices: list[int], alive) -> list[int]:
            # work whose client is gone is dropped at row boundaries; a prompt stays while a member does
            members = [i for i in indices if i >= 0 and alive[i]]
            return ([i for i in indices if i < 0] + members) if members else []

        result: list[Any] = [None] * len(rows)
        with torch.inference_mode():
            for pack in pack_sequences([len(prompts[key].ids) for key in alone_prompts], self.token_budget):
                alive = keep() if keep is not None else None
                wanted = [alone_prompts[j] for j in pack
                          if alive is None or any(alive[m] for m in groups[alone_prompts[j]].members)]
                if wanted:
                    self._run([prompts[key] for key in wanted], store)
            for pack in pack_sequences([sum(map(size, unit)) for unit in units], self.token_budget):
                indices = [i for u in pack for i in units[u]]
                if keep is not None:
                    alive = keep()
                    indices = [i for u in pack for i in alive_members(units[u], alive)]
                if not indices:
                    continue
                hidden = self._run([prompts[-1 - i] if i < 0 else segments[i] for i in indices], store)
                for i, h in zip(indices, hidden):
                    if i >= 0:
                        result[i] = self._keep_row(i, rows[i], reads[i], cached[i], h, store, segments[i].buffer)
        return result

    def _from_cache(self, i: int, row: list[int], read: list[int], store: dict) -> tuple[int, list, Any] | None:
        """(prefix length, hidden states read inside it, the entry) when the cache holds a prefix of row
        `i` worth reusing, its keys and values put in `store` as ("cache", i); else None."""
        if self.cache is None:
            return None
        try:
            entry, length = self.cache.lookup(row)
        except Exception:  # noqa: BLE001 - the cache saves work; it must never fail a request
            _LOGGER.exception("prefix cache lookup failed; computing the sequence whole")
            return None
        length = min(length, len(row) - 1)  # a row keeps one token of its own
        for r in read:  # a read inside the prefix must be held too; else the prefix ends there
            if r >= length:
                break
            if r not in entry.hidden:
                length = r
                break
        if length < prefix_cache.BLOCK:
            return None
        store["cache", i] = {layer: (k[:length], v[:length]) for layer, (k, v) in entry.layers.items()}
        return length, [entry.hidden[r] for r in read if r < length], entry

    def _prompt(self, key: int, ids: list[int], store: dict) -> Segment:
        """Group `key`'s prompt as a segment recording its keys under `key`: from where the cache's
        keys end, when it holds a prefix of it worth reusing."""
        found = self._from_cache(-1 - key, ids, [], store)
        if found is None:
            segment = Segment(ids, record=key, reads=[])  # a prompt: its keys are what is wanted
            if self.cache is not None:
                _place(segment, None)
            return segment
        length = found[0]
        self.cache.stats.reused_tokens += length
        segment = Segment(ids[length:], prefix=("cache", -1 - key), offset=length, record=key, reads=[])
        _place(segment, found[2].buffer, grows=length == len(found[2].ids))
        return segment

    def _keep_row(self, i: int, row: list[int], read: list[int], cached: tuple[int, list, Any] | None, hidden,
                  store: dict, buffer: KVBuffer | None = None) -> Any:
        """Row `i`'s hidden states at its reads (those the cache held first); the cache keeps the row."""
        import torch

        if cached is not None and cached[1]:
            hidden = torch.cat([torch.stack(cached[1]), hidden])
        if self.cache is not None:
            layers = store.pop(("row", i))
            store.pop(("cache", i), None)
            try:
                self.cache.insert(row, layers, dict(zip(read, hidden.unbind(0))), buffer)
            except Exception:  # noqa: BLE001 - the cache saves work; it must never fail a request
                _LOGGER.exception("prefix cache insert failed; the sequence is not kept")
        return hidden

    def _run(self, segments: list[Segment], store: dict) -> Any:
        """One forward pass over `segments` packed into a row; each segment's hidden states at its
        `reads` ([len(reads), H] each; [1, H] at its last token by default)."""
        import torch

        start = time.perf_counter()
        bounds, ids, positions, at = [], [], [], 0
        for segment in segments:
            bounds.append((at, at + len(segment.ids)))
            ids.extend(segment.ids)
            positions.extend(range(segment.offset, segment.offset + len(segment.ids)))
            at += len(segment.ids)
        reads = [[end - start - 1] if segment.reads is None else segment.reads
                 for (start, end), segment in zip(bounds, segments)]
        with packed_row(segments, bounds, store, self.kernel, reads if any(reads) else None):
            hidden = self.backbone(input_ids=torch.tensor([ids], device=self.device),
                                   position_ids=torch.tensor([positions], device=self.device),
                                   use_cache=False).last_hidden_state
        self.stats.tokens += at
        self.stats.padded_tokens += at
        self.stats.microbatches += 1
        self.stats.forward_seconds += time.perf_counter() - start
        if hidden.shape[1] == at:  # every row came out
            return [hidden[0, [start + r for r in read]] for (start, _), read in zip(bounds, reads)]
        # the last layer computed the read rows only (fused layers with the native kernel), in order
        ends = np.cumsum([len(read) for read in reads]).tolist()
        return [hidden[0, end - len(read):end] for end, read in zip(ends, reads)]
