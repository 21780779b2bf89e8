# SPDX-License-Identifier: Apache-2.0
"""A tiny random BERT sentence encoder written to a directory (no weights downloaded)."""
from __future__ import annotations

from pathlib import Path

WORDS = ("red blue green shoe shoes boot hat coat phone case cable laptop garden hose seed "
         "tomato pasta sauce guitar drum piano novel poster mug lamp chair sofa bike helmet "
         "tent camping 2019 2020 2021 new best sale ! , . - the a for and with").split()


def tiny_encoder(path, hidden: int = 8, seed: int = 0) -> Path:
    """Save a 1-layer BERT of width ``hidden`` with a WordPiece tokenizer over ``WORDS`` (plus
    single letters, so every lower-case word tokenizes) into ``path``; returns it."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += sorted(set(WORDS) | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(str(path))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=2 * hidden,
                     max_position_embeddings=64)
    BertModel(cfg).save_pretrained(str(path))
    return path
