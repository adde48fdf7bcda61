from pathlib import Path

import datasets
import pytest
import torch

from data import TextDataModule
from readers import MAX_LINE_BYTES, DataError, load_local_cola, read_glue_tsv, read_table
from samplers import LengthGroupedSampler, PadToBucket, ResumableDataLoader, ShuffleSampler


def test_reads_glue_layout_keeping_quotes(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(b'gj04\t1\t\tHe said "hi" to \'them\'.\r\ngj04\t0\t*\tHim sat bench.\n')
    rows = list(read_glue_tsv(path))
    assert rows == [
        {"sentence": "He said \"hi\" to 'them'.", "label": 1, "source": "gj04"},
        {"sentence": "Him sat bench.", "label": 0, "source": "gj04"},
    ]


def test_local_folder_loads_both_splits(tiny_data_dir):
    train, dev = load_local_cola(tiny_data_dir, "train"), load_local_cola(tiny_data_dir, "validation")
    assert (len(train), len(dev)) == (48, 24)
    first_line = (tiny_data_dir / "train.tsv").read_text().splitlines()[0].split("\t")
    assert train[0] == {"sentence": first_line[3], "label": int(first_line[1]), "source": first_line[0]}
    assert set(train["label"]) == {0, 1}


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("src\t2\t\tA dog sat.", "train.tsv:2: label must be 0 or 1, found '2'"),
        ("src\t1\tA dog sat.", "train.tsv:2: expected 4 tab-separated columns (source, label, star, sentence), found 3"),
        ("src\t1\t\t   ", "train.tsv:2: empty sentence"),
        ("", "train.tsv:2: blank line (only the end of the file may have blank lines)"),
        ("  \r", "train.tsv:2: blank line"),
    ],
)
def test_bad_line_names_file_line_and_problem(tmp_path, bad_line, message):
    (tmp_path / "train.tsv").write_text(f"src\t1\t\tThe dog sat.\n{bad_line}\nsrc\t0\t\tDog the.\n")
    with pytest.raises(DataError) as error:
        load_local_cola(tmp_path, "train")
    assert str(error.value).startswith(str(tmp_path / "train.tsv"))
    assert message in str(error.value)


@pytest.mark.parametrize("ending", ["\n\n", "\r\n\r\n", "\n \n\n"])
def test_blank_lines_at_the_end_are_ignored(tmp_path, ending):
    (tmp_path / "train.tsv").write_text(f"src\t1\t\tThe dog sat.\nsrc\t0\t\tDog the.{ending}", newline="")
    assert load_local_cola(tmp_path, "train")["label"] == [1, 0]
    (tmp_path / "train.tsv").write_text("\n\n")
    with pytest.raises(DataError, match=r"train.tsv: empty file \(no sentences\)"):
        list(read_glue_tsv(tmp_path / "train.tsv"))


def test_a_data_folder_that_cannot_be_read_is_one_data_error(tmp_path, monkeypatch):
    # Tests run as root, whom chmod does not stop: make the folder's listing fail as it would for another user.
    data_dir = tmp_path / "locked"
    data_dir.mkdir()
    real_stat = Path.stat

    def stat(path, *args, **kwargs):
        if path.parent == data_dir:
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(DataError, match=r"locked/train.tsv: cannot read \(Permission denied\): check the permissions of --data.data_dir"):
        load_local_cola(data_dir, "train")


def test_non_utf8_and_missing_file(tmp_path):
    (tmp_path / "train.tsv").write_bytes(b"src\t1\t\tThe dog sat.\nsrc\t1\t\tCaf\xe9 au lait.\n")
    with pytest.raises(DataError, match=r"train.tsv:2: not valid UTF-8"):
        load_local_cola(tmp_path, "train")
    with pytest.raises(DataError, match=r"dev.tsv: file not found"):
        load_local_cola(tmp_path, "validation")


def make_datamodule(model_dir, data_dir, **kwargs) -> TextDataModule:
    datamodule = TextDataModule(model_name_or_path=str(model_dir), data_dir=str(data_dir), **kwargs)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def test_batches_are_padded_per_batch_not_to_max_length(tiny_model_dir, tiny_data_dir):
    datamodule = make_datamodule(tiny_model_dir, tiny_data_dir, batch_size=4, max_length=128)
    unk_id = datamodule.tokenizer.unk_token_id
    widths = set()
    for batch in datamodule.val_dataloader():
        assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[0] == 4 and batch["labels"].shape == (4,)
        # The batch is exactly as wide as its longest sentence: dynamic padding.
        assert ids.shape[1] == int(mask.sum(dim=1).max())
        assert not torch.any(ids[mask.bool()] == unk_id), "real tokens must not be [UNK]"
        widths.add(ids.shape[1])
    assert max(widths) < 20 and len(widths) > 1


def test_pad_to_buckets_gives_a_few_widths_each_the_shortest_that_fits(tiny_model_dir, tiny_data_dir):
    # Sentences of 5-14 tokens: every batch is 16 wide; with max_length 12 the longest are cut to it.
    for max_length, widths in ((128, {16}), (12, {12})):
        datamodule = make_datamodule(tiny_model_dir, tiny_data_dir, batch_size=4, max_length=max_length, pad_to_buckets=True)
        seen = set()
        for batch in [*datamodule.train_dataloader(), *datamodule.val_dataloader()]:
            assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
            assert int(batch["attention_mask"].sum(dim=1).max()) <= batch["input_ids"].shape[1]
            seen.add(batch["input_ids"].shape[1])
        assert seen == widths
    collate = PadToBucket(datamodule.tokenizer, buckets=(16, 32, 64, 128))
    features = [{"input_ids": [2] + [5] * n + [3], "attention_mask": [1] * (n + 2), "labels": 1} for n in (3, 20)]
    batch = collate(features)
    assert batch["input_ids"].shape == (2, 32) and batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 27
    assert collate(features[:1])["input_ids"].shape == (1, 16)


def test_truncation_is_applied_and_reported(tiny_model_dir, tiny_data_dir, capsys):
    datamodule = make_datamodule(tiny_model_dir, tiny_data_dir, batch_size=48, max_length=8)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input_ids"].shape[1] == 8
    last_real_token = batch["input_ids"].gather(1, batch["attention_mask"].sum(1, keepdim=True) - 1)
    assert (last_real_token == datamodule.tokenizer.sep_token_id).all()  # truncation keeps [SEP] at the end
    sentences = [row["sentence"] for row in read_glue_tsv(tiny_data_dir / "train.tsv")]
    too_long = sum(len(datamodule.tokenizer(s)["input_ids"]) > 8 for s in sentences)
    assert f"train: {too_long} of 48 sentences truncated to max_length=8 tokens" in capsys.readouterr().out


def test_training_batches_are_shuffled_validation_is_not(tiny_model_dir, tiny_data_dir):
    datamodule = make_datamodule(tiny_model_dir, tiny_data_dir, batch_size=48, group_by_length=False)
    loader = datamodule.train_dataloader()
    first = next(iter(loader))["input_ids"][:, 1]
    loader.sampler.set_epoch(1)  # as Lightning does before every epoch
    second = next(iter(loader))["input_ids"][:, 1]
    assert not torch.equal(first, second)
    labels = torch.cat([b["labels"] for b in datamodule.val_dataloader()])
    assert labels.tolist() == [row["label"] for row in read_glue_tsv(tiny_data_dir / "dev.tsv")]


def test_length_grouped_sampler_groups_lengths_and_shuffles_batches():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 60, (1000,), generator=generator).tolist()
    sampler = LengthGroupedSampler(lengths, group_size=10, seed=0)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    for order in epochs:
        assert sorted(order) == list(range(1000))  # every sentence exactly once per epoch
        batches = [order[i : i + 10] for i in range(0, 1000, 10)]
        spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
        assert sum(spread) / len(spread) < 3  # uniformly random batches of 10 would spread ~45
        batch_lengths = [lengths[b[0]] for b in batches]
        assert batch_lengths != sorted(batch_lengths)  # batches are not in length order
    assert epochs[0] != epochs[1]


def test_length_grouped_sampler_under_ddp_gives_each_process_a_share_of_each_group():
    lengths = [i % 37 for i in range(1003)]
    order = list(LengthGroupedSampler(lengths, group_size=2 * 8, seed=1))
    groups = [set(order[i : i + 16]) for i in range(0, 1003, 16)]
    assert [len(g) for g in groups[:-1]] == [16] * 62 and len(groups[-1]) == 1003 % 16  # the short group is last
    for rank in range(2):
        shard = order[rank::2]  # how Lightning's DistributedSamplerWrapper deals indices to 2 processes
        for k in range(62):
            assert set(shard[8 * k : 8 * k + 8]) <= groups[k]  # batch k of each process comes from group k


@pytest.mark.parametrize("make_sampler", [lambda seed: ShuffleSampler(100, seed), lambda seed: LengthGroupedSampler([i % 7 for i in range(100)], 8, seed)])
def test_sampler_order_depends_only_on_seed_and_epoch(make_sampler):
    # What lets a resumed run see the interrupted epoch's batches in the same order: no state carried over.
    sampler = make_sampler(3)
    orders = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] == orders[2] != orders[1]
    fresh = make_sampler(3)
    fresh.set_epoch(1)
    assert list(fresh) == orders[1]
    assert sorted(orders[1]) == list(range(100))
    assert list(make_sampler(4)) != orders[0]


def test_resumable_loader_skips_the_batches_already_done():
    data = list(range(20))
    full = [batch.tolist() for batch in ResumableDataLoader(data, batch_size=3)]
    done = [2]
    loader = ResumableDataLoader(data, batch_size=3, batches_done=lambda: done[0])
    iterator = iter(loader)
    done[0] = 4  # asked at the first batch, not at iter(): Lightning restores its progress in between
    assert [batch.tolist() for batch in iterator] == full[4:]
    done[0] = 0
    assert [batch.tolist() for batch in loader] == full
    assert len(loader) == len(full) == 7  # the epoch's length stays whole: Lightning counts the done batches itself


# Property-based: whatever the file holds, reading it gives the rows or one DataError, never another exception.
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Sentences: any text without tab or line breaks, quotes of every kind especially; sometimes very long.
QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"
no_line_breaks = st.characters(exclude_characters="\t\n\r", exclude_categories=("Cs",))  # Cs: lone surrogates
sentence_text = st.text(no_line_breaks | st.sampled_from(QUOTES), min_size=1, max_size=60)
sentences = (sentence_text | st.builds(lambda s, n: s * n, sentence_text, st.integers(100, 2000))).filter(str.strip)
columns = st.text(no_line_breaks, max_size=8)  # the source and star columns
rows = st.lists(st.tuples(columns, st.sampled_from("01"), columns, sentences), max_size=8)


def read_or_data_error(path):
    try:
        return list(read_glue_tsv(path))
    except DataError as error:
        assert "\n" not in str(error) and str(error).startswith(str(path))
        return None


def tsv_bytes(table, line_end="\n", final_line_end=True, encoding="utf-8") -> bytes:
    text = line_end.join("\t".join(row) for row in table) + (line_end if final_line_end and table else "")
    return text.encode(encoding)


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=400) | st.builds(tsv_bytes, rows) | st.lists(st.sampled_from(
    [b"src\t1\t\tA dog.", b"\t", b"\n", b"\r\n", b"\r", b'"', b"'", b"\xff", b"\xe9", b"\xef\xbb\xbf", b"0", b"1", b" ", b"\x00"]
), max_size=40).map(b"".join))
def test_any_bytes_give_rows_or_one_data_error(tmp_path, data):
    path = tmp_path / "train.tsv"
    path.write_bytes(data)
    result = read_or_data_error(path)
    if result is not None:
        assert result and all(row["label"] in (0, 1) and row["sentence"].strip() for row in result)


@PROPERTY_SETTINGS
@given(table=rows, line_end=st.sampled_from(["\n", "\r\n"]), final_line_end=st.booleans(),
       encoding=st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1", "cp1252"]))
def test_well_formed_files_load_exactly_quotes_and_all(tmp_path, table, line_end, final_line_end, encoding):
    try:
        data = tsv_bytes(table, line_end, final_line_end, encoding)
    except UnicodeEncodeError:
        assume(False)  # text this encoding cannot hold
    path = tmp_path / "train.tsv"
    path.write_bytes(data)
    result = read_or_data_error(path)
    if data == tsv_bytes(table, line_end, final_line_end):  # what was written is UTF-8
        expected = [{"sentence": sentence, "label": int(label), "source": source} for source, label, _, sentence in table]
        if any(len(line) + len(line_end) > MAX_LINE_BYTES for line in data.split(line_end.encode())):
            expected = []  # a line over the bound (issue 44): one DataError, as for an empty file
        assert result == (expected or None)  # an empty file is a DataError
    elif encoding == "utf-16":
        assert result is None  # its byte-order mark is not UTF-8


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.builds(tsv_bytes, rows, st.sampled_from(["\n", "\r\n"])) | st.binary(max_size=200))
def test_local_cola_loads_what_the_reader_reads_or_one_data_error(tmp_path, monkeypatch, data):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # not the user's cache
    (tmp_path / "train.tsv").write_bytes(data)
    expected = read_or_data_error(tmp_path / "train.tsv")
    try:
        loaded = load_local_cola(tmp_path, "train")
    except DataError:
        assert expected is None
    else:
        assert loaded.to_list() == expected


def test_sentences_are_cut_to_the_models_position_embeddings(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    # The tiny tokenizer has no model_max_length; its model has 64 positions, the default max_length is 128.
    from transformers import AutoModelForSequenceClassification

    (tmp_path / "dev.tsv").write_bytes((tiny_data_dir / "dev.tsv").read_bytes())
    (tmp_path / "train.tsv").write_text("src\t1\t\t" + "the dog sat " * 40 + ".\n" + "src\t0\t\tA cat ran.\n")
    datamodule = TextDataModule(model_name_or_path=str(tiny_model_dir), data_dir=str(tmp_path))
    datamodule.setup()
    lengths = [len(ids) for ids in datamodule.splits["train"]["input_ids"]]
    assert lengths == [64, 6]
    assert "train: 1 of 2 sentences truncated to max_length=64 tokens" in capsys.readouterr().out
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    batch = next(iter(datamodule.train_dataloader()))  # both sentences, padded to 64
    assert model(**{k: v for k, v in batch.items() if k != "labels"}).logits.shape == (2, 2)


# Issue 44: every file reader and line reader fed random bytes and shapes: its rows, or one DataError (InputError for
# inference.py) that names the file and a line the file has, the first undecodable one for a UTF-8 error.
TABLE_PIECES = [b"text,label\n", b"text\tlabel\n", b'{"text": "A dog.", "label": 1}\n', b"A dog.,1\n", b"A cat.\t0\n",
                b'"', b",", b"\t", b"\n", b"\r\n", b"{", b"}", b"\xff", b"\xe9", b"\xef\xbb\xbf", b"\x00", b"label", b" "]
table_bytes = st.binary(max_size=300) | st.lists(st.sampled_from(TABLE_PIECES), max_size=30).map(b"".join)


def first_undecodable_line(data: bytes) -> int:
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return number
    return 0


def check_error_line(message: str, path, data: bytes) -> None:
    assert "\n" not in message and message.startswith(str(path)), message
    where = message[len(str(path)):].split(" ", 1)[0]
    if where.startswith(":") and where[1:].split(":")[0].isdigit():
        line = int(where[1:].split(":")[0])
        assert 1 <= line <= data.count(b"\n") + 1, message  # a line the file has
        if "not valid UTF-8" in message:
            assert line == first_undecodable_line(data), message


@PROPERTY_SETTINGS
@given(data=table_bytes, kind=st.sampled_from(["csv", "tsv", "jsonl"]))
def test_any_bytes_in_a_table_give_rows_or_one_error_at_a_line_it_has(tmp_path, data, kind):
    path = tmp_path / f"train.{kind}"
    path.write_bytes(data)
    try:
        rows = list(read_table(path, [("text",)], ["label"], ("sentence",)))
    except DataError as error:
        check_error_line(str(error), path, data)
    else:
        assert rows and all(row["sentence"].strip() and isinstance(row["label"], str) for row in rows)


@PROPERTY_SETTINGS
@given(data=table_bytes, pairs=st.booleans())
def test_any_bytes_in_an_unlabelled_file_give_texts_or_one_error_at_a_line_it_has(tmp_path, data, pairs):
    from distill import read_unlabelled

    path = tmp_path / "more.txt"
    path.write_bytes(data)
    try:
        texts = list(read_unlabelled(path, 2 if pairs else 1))
    except DataError as error:
        check_error_line(str(error), path, data)
    else:
        assert all(len(t) == (2 if pairs else 1) and all(x.strip() for x in t) for t, _ in texts)


@PROPERTY_SETTINGS
@given(data=table_bytes)
def test_any_bytes_read_by_inference_give_the_lines_before_a_bad_one_then_one_error(tmp_path, data):
    import io

    from inference import InputError, read_lines

    lines, error = [], None
    try:
        for chunk in read_lines(io.BytesIO(data), "in.txt"):
            lines += chunk
    except InputError as e:
        error = str(e)
    if error:
        check_error_line(error, "in.txt", data)
        if "not valid UTF-8" in error:
            assert len(lines) == first_undecodable_line(data) - 1  # every line before the bad one, then the error
    else:
        assert first_undecodable_line(data) == 0
