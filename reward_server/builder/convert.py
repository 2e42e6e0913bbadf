"""Step 2 of build-engine: TensorRT-LLM's own converter, called through its Python API.

`python -m reward_server.builder.convert --hf DIR --output DIR --tp N --pp M --dtype D` writes
the TensorRT-LLM checkpoint (config.json + rank{N}.safetensors) with the model class's
`from_hugging_face` and `save_checkpoint` (or, for fp8, its `quantize`), one rank at a time so
that only one rank's weights are in memory. No weight layout of ours: TensorRT-LLM splits the
heads, the MLP and the lm_head across ranks itself. Runs only where tensorrt_llm is installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from reward_server.builder.build import CONVERTERS, DTYPES

_LOGGER = logging.getLogger("reward_server.builder.convert")


def converter_class(architecture: str):
    """The tensorrt_llm.models class converting a Hugging Face `architecture`.

    Raises:
        ValueError: an architecture this path does not convert.
        ImportError: tensorrt_llm is not installed.
    """
    if architecture not in CONVERTERS:
        raise ValueError(f"no TensorRT-LLM converter for {architecture}; supported: {', '.join(sorted(CONVERTERS))}")
    import tensorrt_llm.models

    return getattr(tensorrt_llm.models, CONVERTERS[architecture])


def convert(hf: Path, output: Path, tp: int, pp: int, dtype: str, calib_dataset: str | None = None) -> None:
    """Write the TensorRT-LLM checkpoint of every rank."""
    from tensorrt_llm import Mapping

    architecture = json.loads((hf / "config.json").read_text())["architectures"][0]
    model_class = converter_class(architecture)
    world = tp * pp
    output.mkdir(parents=True, exist_ok=True)
    if dtype == "fp8":
        from tensorrt_llm.models.modeling_utils import QuantConfig
        from tensorrt_llm.quantization import QuantAlgo

        _LOGGER.info("fp8 calibration and conversion of %s on %s", hf, calib_dataset)
        model_class.quantize(str(hf), str(output), dtype="bfloat16",
                             mapping=Mapping(world_size=world, tp_size=tp, pp_size=pp),
                             quant_config=QuantConfig(quant_algo=QuantAlgo.FP8, kv_cache_quant_algo=QuantAlgo.FP8),
                             calib_dataset=calib_dataset)
        return
    for rank in range(world):
        started = time.monotonic()
        mapping = Mapping(world_size=world, rank=rank, tp_size=tp, pp_size=pp)
        model = model_class.from_hugging_face(str(hf), dtype=dtype, mapping=mapping)
        model.save_checkpoint(str(output), save_config=rank == 0)
        del model
        _LOGGER.info("rank %d/%d converted in %.0fs", rank + 1, world, time.monotonic() - started)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry (called by build-engine's convert step)."""
    parser = argparse.ArgumentParser(prog="python -m reward_server.builder.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--hf", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--calib-dataset")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    convert(args.hf, args.output, args.tp, args.pp, args.dtype, args.calib_dataset)


if __name__ == "__main__":
    main()
