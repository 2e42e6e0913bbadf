"""What TensorRT-LLM 1.2's fp8 calibration can read, checked before the model is loaded.

`quantize_by_modelopt.get_calib_dataloader` takes a local directory only (no hub name: these hosts
have no network), loads it with `datasets.load_dataset(dir, split="train")` and reads its `text`
column; anything else raises NotImplementedError or KeyError after the whole model has been
loaded, minutes into the build. A few directory names are routed elsewhere by that function
(names containing "cnn_dailymail", "scienceqa" or "science_qa": hub datasets, other columns).
This module checks the same rules from the files alone, without `datasets`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

# Data files `datasets` builds a dataset from by extension (its packaged builders); .txt files
# give a `text` column of their lines.
DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt")
# Words in a file or folder name by which `datasets` assigns it to a split other than train.
_OTHER_SPLITS = ("test", "testing", "eval", "evaluation", "validation", "valid", "val", "dev")
_ROUTED_ELSEWHERE = ("cnn_dailymail", "scienceqa", "science_qa")
HELP = ("a local directory of .jsonl/.json/.csv/.parquet/.txt files with a `text` column, its train split "
        "(files named train*, or files with no split in their name)")


def _split_words(path: Path, root: Path) -> set[str]:
    words = set()
    for part in path.relative_to(root).parts:
        for separator in "-_.":
            part = part.replace(separator, " ")
        words.update(part.lower().split())
    return words


def _text_column(path: Path) -> bool | None:
    """Whether the file's first record has a `text` column (None: cannot tell here)."""
    if path.suffix == ".txt":
        return True
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return "text" in (next(csv.reader(handle), None) or [])
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "{}")
        record = json.loads(first)
    elif path.suffix == ".json":
        record = json.loads(path.read_text(encoding="utf-8"))  # a list of records, or columns by name
        record = record[0] if isinstance(record, list) and record else record
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            return None
        return "text" in pq.read_schema(path).names
    else:  # .arrow: only `datasets` reads it
        return None
    return isinstance(record, dict) and "text" in record


def check_calibration_dataset(path: str | Path) -> Path:
    """Check an fp8 calibration dataset against what TensorRT-LLM's loader accepts.

    Returns:
        The directory, resolved.

    Raises:
        ValueError: not a directory, a name the loader sends elsewhere, no data files, no train
            split, or a train file without a `text` column; each message says what to give instead.
    """
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"--calib-dataset {path}: TensorRT-LLM's fp8 calibration reads {HELP}; "
                         f"{'a file' if root.exists() else 'nothing'} is there" +
                         ("" if root.exists() else " (hub dataset names need a network these hosts lack)"))
    routed = [name for name in _ROUTED_ELSEWHERE if name in str(root).lower()]
    if routed:
        raise ValueError(f"--calib-dataset {root}: a path containing {routed[0]!r} is read by TensorRT-LLM as that "
                         "hub dataset, not as a local directory; rename the directory")
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in DATA_EXTENSIONS
                   and not any(part.startswith(".") for part in f.relative_to(root).parts))
    if not files:
        raise ValueError(f"--calib-dataset {root} has no data files ({', '.join(DATA_EXTENSIONS)}); it must be {HELP}")
    named = [f for f in files if "train" in _split_words(f, root)]
    train = named or [f for f in files if not _split_words(f, root) & set(_OTHER_SPLITS)]
    if not train:
        raise ValueError(f"--calib-dataset {root} has no train split: its files are all named for other splits "
                         f"({', '.join(f.name for f in files[:3])}); calibration reads split='train'")
    for file in train:
        if _text_column(file) is False:
            raise ValueError(f"--calib-dataset {root}: {file.relative_to(root)} has no `text` column; TensorRT-LLM's "
                             "calibration reads the `text` column of the train split")
    return root
