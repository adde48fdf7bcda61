"""Readers of the files a task's data comes in: GLUE's CoLA TSV files (no header), and TSV, CSV or JSON Lines tables
with a header (GLUE's other tasks, a user's own), each as an Arrow dataset cached by the file's content. A bad line
is one DataError naming the file and the line. And the size check of YAML files (train.py's --config, tune.py's
search spaces)."""

import contextlib
import csv
import hashlib
import io
import json
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

import datasets
import yaml

SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv"}  # GLUE names the validation file dev.tsv
# A user's own files: train.* and dev.* (or validation.*; MNLI's dev_matched.tsv) in one of these formats.
FILE_STEMS = {"train": ("train",), "validation": ("dev", "validation", "dev_matched")}
FORMATS = ("tsv", "csv", "jsonl")
# The longest line a data file may have: a text of ~10,000 words, far past what any model reads (max_length tokens).
# Longer is no example but a wrong file (/dev/zero, a binary): one 20 MB line took 5.9 GB to tokenize.
MAX_LINE_BYTES = 64 * 1024


class DataError(ValueError):
    """A problem in the user's data, reported as one line: 'file:line: what is wrong'."""


def bounded_lines(f: BinaryIO, path: Path, option: str = "") -> Iterator[tuple[int, bytes]]:
    """(number, raw line) of each line of a binary file, never reading more than MAX_LINE_BYTES of one line:
    DataError for a longer line."""
    for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
        if len(raw) > MAX_LINE_BYTES:
            raise DataError(f"{path}:{number}: a line over {MAX_LINE_BYTES:,} bytes is no example: is it the right file?{option}")
        yield number, raw


def read_glue_tsv(path: Path) -> Iterator[dict]:
    """Yield {"sentence", "label", "source"} rows of a GLUE CoLA file (source, label, star, sentence; no header).

    Parsed by hand rather than as CSV: CoLA sentences contain quote characters that a CSV reader
    would take as quoting. Blank lines at the end (editors add one) are ignored. Any other malformed
    line, blank ones included, or a file without sentences raises DataError naming the file and line.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    rows, first_blank = 0, None
    with f:
        for line_no, raw in bounded_lines(f, path):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                first_blank = first_blank or line_no  # an error only if a sentence follows
                continue
            if first_blank:
                raise DataError(f"{path}:{first_blank}: blank line (only the end of the file may have blank lines)")
            columns = line.split("\t")
            if len(columns) != 4:
                raise DataError(
                    f"{where}: expected 4 tab-separated columns (source, label, star, sentence), found {len(columns)}"
                )
            source, label, _, sentence = columns
            if label not in ("0", "1"):
                raise DataError(f"{where}: label must be 0 or 1, found {label!r}")
            if not sentence.strip():
                raise DataError(f"{where}: empty sentence")
            rows += 1
            yield {"sentence": sentence, "label": int(label), "source": source}
    if rows == 0:
        raise DataError(f"{path}: empty file (no sentences)")


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """datasets' "Generating train split" bars, for local files that load in a second: noise before a one-line error."""
    shown = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


def _file_digest(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def load_local_cola(data_dir: Path, split: str) -> datasets.Dataset:
    """One split of a local GLUE CoLA folder as an Arrow dataset, cached by the file's content hash."""
    path = Path(data_dir) / SPLIT_FILES[split]
    try:
        found = path.is_file()
    except OSError as e:  # a folder that may not be listed: is_file() raises rather than say False
        raise DataError(f"{path}: cannot read ({e.strerror}): check the permissions of --data.data_dir") from None
    if not found:
        raise DataError(f"{path}: file not found (data_dir must hold GLUE CoLA's train.tsv and dev.tsv)")
    return load_cola_file(path, split)


def load_cola_file(path: Path, split: str) -> datasets.Dataset:
    try:
        with no_progress_bars():
            return datasets.Dataset.from_generator(
                read_glue_tsv,
                gen_kwargs={"path": path},
                features=datasets.Features({"sentence": datasets.Value("string"), "label": datasets.Value("int64"),
                                            "source": datasets.Value("string")}),
                fingerprint=f"cola-source-{split}-{_file_digest(path)}",  # "source": older caches lack that column
            )
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, DataError):
            raise e.__cause__ from None
        raise


def read_table(path: Path, text_columns: list[tuple[str, ...]], label_columns: list[str], names: tuple[str, ...],
               group_column: Optional[str] = None) -> Iterator[dict]:
    """Yield {name: text, ..., "label": str, "line": n} rows of a TSV, CSV or JSON Lines file with a header (JSON Lines:
    an object a line), its columns chosen by name: the first of text_columns (and of label_columns) that the file
    has, its texts named names in the rows; with group_column, that column's value too, as "group" (it may be empty). TSV is read as GLUE writes it, without quoting (sentences hold quote
    characters); CSV with quoting, as spreadsheets write it. A bad line raises DataError naming the file and line."""
    kind = path.suffix[1:]
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    rows, line_no, columns = 0, 1, None
    with f:
        try:
            if kind == "csv":
                for n, raw in bounded_lines(f, path):  # first: the csv module decodes in blocks, and would name another line
                    text_line(raw, n, path)
                f.seek(0)
                reader = csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""))
                lines = ((reader.line_num, fields) for fields in reader)
            else:  # lines end at \n alone: GLUE's SST-2 has a \r before some tabs
                lines = ((n, text_line(raw, n, path)) for n, raw in bounded_lines(f, path))
                if kind == "tsv":
                    lines = ((n, line.split("\t")) for n, line in lines)
            if kind == "jsonl":
                records = ((n, json_object(line, f"{path}:{n}")) for n, line in lines if line.strip())
            else:
                _, header = next(lines, (1, []))
                if twice := next((name for i, name in enumerate(header) if name in header[:i]), None):
                    raise DataError(f"{path}:1: the header names column {twice!r} twice: name each column once")
                records = ((n, dict(zip(header, fields)) if len(fields) == len(header) else len(fields))
                           for n, fields in lines if any(field.strip() for field in fields))
            for line_no, record in records:
                where = f"{path}:{line_no}"
                if isinstance(record, int):
                    raise DataError(f"{where}: {record} fields, but the header (line 1) names {len(header)}")
                if columns is None:  # chosen from the header (or the first JSON object)
                    have = list(header) if kind != "jsonl" else list(record)
                    text = next((c for c in text_columns if set(c) <= set(have)), None)
                    label = next((c for c in label_columns if c in have), None)
                    if text is None or label is None:
                        wanted = [*text_columns[0], label_columns[0]]
                        missing = ", ".join(repr(c) for c in wanted if c not in have)
                        raise DataError(f"{path}:{1 if kind != 'jsonl' else line_no}: no column {missing} (it has {', '.join(map(repr, have))}):"
                                        " name yours with --data.text_columns [TEXT] or [TEXT1,TEXT2] and --data.label_column LABEL")
                    if group_column is not None and group_column not in have:
                        raise DataError(f"{path}:{1 if kind != 'jsonl' else line_no}: no column {group_column!r} (it has"
                                        f" {', '.join(map(repr, have))}): --data.group_column names one of them")
                    columns = dict(zip(names, text))
                row = {"line": line_no}
                if group_column is not None:
                    group = record.get(group_column)
                    if isinstance(group, (int, float, bool)):
                        group = json.dumps(group)
                    if not isinstance(group, str):
                        raise DataError(f"{where}: column {group_column!r} is {'missing' if group is None else 'not text'}")
                    row["group"] = group
                for name, column in [*columns.items(), ("label", label)]:
                    value = record.get(column)
                    if isinstance(value, (int, float, bool)) and name == "label":
                        value = json.dumps(value)  # JSON Lines labels may be numbers: 1 and "1" are one label
                    if not isinstance(value, str):
                        raise DataError(f"{where}: column {column!r} is {'missing' if value is None else 'not text'}")
                    if not value.strip():
                        raise DataError(f"{where}: empty {column!r}")
                    row[name] = value
                rows += 1
                yield row
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{line_no + 1}: not valid UTF-8 ({e.reason})") from None
        except csv.Error as e:
            raise DataError(f"{path}:{line_no + 1}: {e}") from None
    if rows == 0:
        raise DataError(f"{path}: no examples (a header line, then one example a line)")


def text_line(raw: bytes, line_no: int, path: Path) -> str:
    try:
        return raw.decode("utf-8").removeprefix("\ufeff" if line_no == 1 else "").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def json_object(line: str, where: str) -> dict:
    def no_key_twice(pairs: list[tuple[str, object]]) -> dict:
        keys = [key for key, _ in pairs]
        if twice := next((key for i, key in enumerate(keys) if key in keys[:i]), None):
            raise DataError(f"{where}: key {twice!r} twice in one object: give each column once")
        return dict(pairs)

    try:
        record = json.loads(line, object_pairs_hook=no_key_twice)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: not a JSON object ({{\"sentence\": ..., \"label\": ...}} a line)")
    return record


def load_local_table(path: Path, text_columns: list[tuple[str, ...]], label_columns: list[str], names: tuple[str, ...],
                     group_column: Optional[str] = None) -> datasets.Dataset:
    """read_table's rows as an Arrow dataset, cached by the file's content and the columns chosen."""
    choice = hashlib.sha256(json.dumps([text_columns, label_columns, names, group_column]).encode()).hexdigest()[:16]
    group = {"group": datasets.Value("string")} if group_column is not None else {}
    try:
        with no_progress_bars():
            return datasets.Dataset.from_generator(
                read_table,
                # Tuples: datasets would take lists in gen_kwargs as shards to split the work over.
                gen_kwargs={"path": path, "text_columns": tuple(text_columns), "label_columns": tuple(label_columns), "names": names,
                            "group_column": group_column},
                features=datasets.Features({**{n: datasets.Value("string") for n in names}, "label": datasets.Value("string"),
                                            "line": datasets.Value("int64"), **group}),
                fingerprint=f"table-{_file_digest(path)}-{choice}",
            )
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, DataError):
            raise e.__cause__ from None
        raise


def find_split_file(data_dir: Path, split: str) -> Path:
    """data_dir's file for split: train.tsv (or .csv, .jsonl) for "train", dev.tsv (or validation.*) for "validation"."""
    candidates = [data_dir / f"{stem}.{kind}" for stem in FILE_STEMS[split] for kind in FORMATS]
    try:
        found = [path for path in candidates if path.is_file()]
    except OSError as e:  # a folder that may not be listed: is_file() raises rather than say False
        raise DataError(f"{candidates[0]}: cannot read ({e.strerror}): check the permissions of --data.data_dir") from None
    if not found:
        for path in candidates:
            if path.exists():  # /dev/zero, a pipe or a folder named train.tsv
                raise DataError(f"{path}: not a regular file (give a file of examples)")
        raise DataError(f"{candidates[0]}: file not found (data_dir must hold {SPLIT_FILES['train']} and {SPLIT_FILES['validation']},"
                        " or train and dev files in CSV or JSON Lines: train.csv, dev.jsonl...)")
    if len(found) > 1:
        raise DataError(f"{data_dir}: both {found[0].name} and {found[1].name}: keep one {split} file there")
    return found[0]


def is_headerless_cola(path: Path) -> bool:
    """Whether path starts like GLUE's CoLA files (source, label 0/1, star, sentence; no header)."""
    try:
        with open(path, "rb") as f:
            first = f.readline().split(b"\t")
    except OSError:
        return True  # the CoLA reader says why, as before
    return path.suffix == ".tsv" and len(first) == 4 and first[1] in (b"0", b"1")


# YAML aliases let 9 lines stand for 43 million values (the "billion laughs"): such a --config took all memory
# (MemoryError at 4 GB). A config or a search space holds hundreds of values.
MAX_YAML_VALUES = 100_000


def check_yaml_size(text: str) -> None:
    """yaml.YAMLError for a document whose values, its aliases expanded, number over MAX_YAML_VALUES (or that
    refers to itself): counted on the parsed node graph, where an alias is one shared node, before any expansion."""
    sizes: dict[int, Optional[int]] = {}

    def size(node: yaml.Node) -> int:
        if id(node) not in sizes:
            sizes[id(node)] = None  # in progress: met again below it, the document contains itself
            children = node.value if isinstance(node, yaml.SequenceNode) else (
                [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
            sizes[id(node)] = 1 + sum(size(child) for child in children)
        if sizes[id(node)] is None:
            raise yaml.YAMLError("a YAML alias refers to a value that contains it")
        return sizes[id(node)]

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    if root is not None and size(root) > MAX_YAML_VALUES:
        raise yaml.YAMLError(f"over {MAX_YAML_VALUES:,} values once its aliases are expanded: not a config")
