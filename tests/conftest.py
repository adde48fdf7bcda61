"""Offline fixtures: a tiny random-weight BERT with its own WordPiece vocab, and tiny CoLA TSV files."""

import random
from pathlib import Path

import pytest
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

WORDS = "the a boy girl dog cat sat ran saw is was on under bench mat park big small quickly".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "."


def write_tsv(path: Path, rows: list[tuple[int, str]]) -> None:
    path.write_text("".join(f"src\t{label}\t\t{sentence}\n" for label, sentence in rows), encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS + ["."])}
    # transformers 5 ignores vocab_file= here (every token would become [UNK]); vocab= takes the dict.
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """48 training and 24 validation sentences; label 1 when the sentence mentions a dog (learnable)."""
    path = tmp_path_factory.mktemp("tiny-cola")
    rng = random.Random(0)
    for name, n in (("train.tsv", 48), ("dev.tsv", 24)):
        sentences = [make_sentence(rng) for _ in range(n)]
        write_tsv(path / name, [(int("dog" in s.lower()), s) for s in sentences])
    return path
