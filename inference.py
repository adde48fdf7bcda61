"""Classify texts (CoLA: are English sentences grammatical?) with a checkpoint trained by train.py. Offline.

    python inference.py "The boy is sitting on a bench." "Him sat bench."
    python inference.py --file sentences.txt --json > predictions.jsonl
    cat sentences.txt | python inference.py -
    python inference.py --checkpoint logs/rte $'A man is eating.\tSomeone eats.'   # a pair model: tab-separated
    python inference.py --export exported/       # a folder transformers.pipeline() loads
    python inference.py --glue_test glue_data/CoLA/test.tsv > CoLA.tsv   # for the GLUE leaderboard
    python inference.py --glue_test > CoLA.tsv                           # the same, from the Hub's copy

Without --checkpoint it uses the best checkpoint of the most recent run under logs/cola (after tune.py: of its best trial).
A model of sentence pairs (RTE, MRPC...) takes each pair as one argument or line: the two texts, a tab between.

Start-up time is the point of this file's shape: importing torch and transformers' BERT takes ~6 s
on a 2-core machine, onnxruntime and tokenizers ~0.3 s. So the first use of a checkpoint exports
its model to ONNX beside it (`best-....onnx`, with the tokenizer, labels and the checkpoint's sha256
in its metadata; in ~/.cache/mlops-one/ if the run folder is read-only), and every later run loads
only that, after checking that its bytes are as written and that it was made from this checkpoint's
content (export.CachedExport). `--backend onnx-int8` runs a copy with int8 weights instead (CPUs:
faster, probabilities ~0.02 off), `--backend torch` runs the checkpoint in PyTorch (GPUs).

--checkpoint also takes that export itself (a .onnx file, or a folder holding it and perhaps its .int8.onnx
copy): then neither torch, Lightning nor transformers is needed, only requirements-serve.txt (the image).
"""

import argparse
import codecs
import importlib.util
import itertools
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator, Optional

import numpy as np
from tokenizers import Tokenizer

from checkpoints import CheckpointError, find_best_checkpoint, first_line, load_checkpoint, resolve_checkpoint
from export import EXPORT_DAMAGED, CachedExport, export_hf, export_intact, load_classifier, model_facts

if TYPE_CHECKING:
    import onnxruntime

BATCH_SIZE = 64
# --file and stdin are read, predicted and printed this many lines (or bytes) at a time: flat memory. By bytes
# too: 10,000 lines of 16 KiB took 10,000 lines' worth of memory that 10,000 sentences never do.
CHUNK_LINES = 10_000
CHUNK_BYTES = 4 * 1024 * 1024
# Sentences tokenized at once. The tokenizer keeps every 128-token overflow piece of a truncated sentence (a
# 16 KiB line: ~0.7 MB of them), so a whole chunk at once peaked at 7.3 GB for 10,000 such lines; in groups of
# 64, with only the ids kept, memory stays flat (README, "Failures").
TOKENIZE_GROUP = 64
# A longer line is no sentence (the model reads at most 512 tokens, a few thousand characters), and reading it whole
# would take memory without bound (a 20 MB line took 3 GB; /dev/zero has no line end at all).
MAX_LINE_BYTES = 16 * 1024
NOT_FINITE = "the model's output is not a finite number (NaN or infinity): its weights are damaged"
BACKENDS = ("onnx", "onnx-int8", "torch")
HUB_TEST_SPLIT = ""  # --glue_test without a file: the test split of the model's GLUE task on the Hub
PAIR_HOWTO = "a pair is two texts: on a command line or in a file, the first, a tab, the second"


class InputError(Exception):
    """Input that cannot be classified (not text, an unreadable file), reported as one line."""


class Predictor:
    """A trained classifier: `Predictor("best.ckpt").predict(["Him sat bench."])`; of pairs: predict([("A", "B")]).

    backend "onnx" (default) runs the cached ONNX export on CPU with ONNX Runtime; "onnx-int8" its cached
    int8-weight copy (faster on CPU; probabilities ~0.02 off, and shifting a little with the batch a
    sentence is in); "torch" runs the checkpoint in PyTorch, on the GPU when there is one.
    checkpoint_path may also be an export itself (resolve_model): no PyTorch is imported then.
    """

    def __init__(self, checkpoint_path: str | Path, backend: str = "onnx") -> None:
        if backend not in BACKENDS:
            raise InputError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        path = resolve_model(Path(checkpoint_path), backend)
        if path.suffix == ".onnx":
            session = load_export(path)
        elif backend != "torch":
            _, session = CachedExport(path).session(int8=backend == "onnx-int8")
        if backend != "torch":
            facts = session.get_modelmeta().custom_metadata_map
            self.input_names = [i.name for i in session.get_inputs()]
            self._logits: Callable[[dict], np.ndarray] = lambda inputs: session.run(["logits"], inputs)[0]
        else:
            checkpoint = load_checkpoint(path)
            facts = model_facts(checkpoint)
            classifier, tokenizer = load_classifier(checkpoint)
            self.input_names = tokenizer.model_input_names
            self._logits = torch_logits_function(classifier)
        try:
            self.labels = facts["labels"] if isinstance(facts["labels"], list) else json.loads(facts["labels"])
            self.max_length = int(facts["max_length"])
            self.pad_token_id = int(facts["pad_token_id"])
            self.tokenizer = Tokenizer.from_str(facts["tokenizer"])
            self.base_model: Optional[str] = facts.get("base_model")  # exports since the image: what /health names
            # Exports from before pairs and tasks are CoLA's.
            names = facts.get("text_names", ["sentence"])
            self.text_names = names if isinstance(names, list) else json.loads(names)
            self.task: str = facts.get("task", "cola")
            self.pairs = len(self.text_names) == 2
        except Exception:  # KeyError, ValueError, the tokenizer's own: an ONNX file that inference.py did not write
            raise CheckpointError(f"{path}: not an export of this project (no labels or tokenizer in its metadata);"
                                  " export a checkpoint with inference.py --checkpoint CKPT") from None
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()

    def predict(
        self, sentences: list[str] | tuple[str, ...], batch_size: int = BATCH_SIZE, progress: bool = False
    ) -> list[dict]:
        """One result per sentence, in order: {"sentence", "label", "probabilities": {label: p}}, or
        {"sentence", "error"} for an empty sentence, or one the model gives no finite output for.
        sentences is a list or tuple of strings, or for a model of pairs of (text, text) pairs (results:
        {"pair": [text, text], ...}); anything else (one string, a generator, a dict, None), a sentence
        that is not text and a batch_size that is not a positive integer raise InputError."""
        results, truncated = self.predict_counting_truncated(sentences, batch_size, progress)
        self.warn_truncated(truncated)
        return results

    def warn_truncated(self, count: int) -> None:
        if count:
            print(f"warning: {count} sentence(s) longer than {self.max_length} tokens were truncated", file=sys.stderr)

    def predict_counting_truncated(self, sentences, batch_size: int, progress: bool) -> tuple[list[dict], int]:
        """predict(), and how many sentences were truncated, unreported: the command line reads its input in
        chunks and reports them once for all."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, not {batch_size!r}")
        if not isinstance(sentences, (list, tuple)):
            raise InputError(f"sentences must be a list or tuple of strings, not {type(sentences).__name__}")
        for number, sentence in enumerate(sentences, start=1):
            if self.pairs and not (isinstance(sentence, (list, tuple)) and len(sentence) == 2):
                raise InputError(f"pair {number} is not two texts: this model classifies pairs ({PAIR_HOWTO})")
            for text in sentence if self.pairs else [sentence]:
                if not isinstance(text, str):
                    raise InputError(f"sentence {number} is a {type(text).__name__}, not a string")
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:  # a lone surrogate, e.g. from undecodable bytes in sys.argv
                    raise InputError(f"sentence {number} is not valid Unicode text ({e.reason})") from None
        key = "pair" if self.pairs else "sentence"
        if self.pairs:
            sentences = [tuple(pair) for pair in sentences]  # what the tokenizer takes as a pair
        empty = f"empty text ({PAIR_HOWTO})" if self.pairs else "empty sentence"
        results: list[dict] = [{key: self._shown(s), "error": empty} for s in sentences]
        todo = [i for i, s in enumerate(sentences) if all(t.strip() for t in (s if self.pairs else [s]))]
        encodings, truncated = {}, 0  # sentence index -> (ids, type_ids)
        for start in range(0, len(todo), TOKENIZE_GROUP):
            group = todo[start : start + TOKENIZE_GROUP]
            for i, e in zip(group, self.tokenizer.encode_batch([sentences[i] for i in group])):
                encodings[i] = (np.array(e.ids, dtype=np.int64), np.array(e.type_ids, dtype=np.int64))
                truncated += bool(e.overflowing)
        # Similar lengths share a batch, so padding each batch to its longest sentence adds little.
        todo.sort(key=lambda i: len(encodings[i][0]))
        batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
        for batch in progress_bar(batches, enabled=progress):
            logits = self._logits(self._pad([encodings[i] for i in batch])).astype(np.float64)
            finite = np.isfinite(logits).all(axis=1)
            probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
            probabilities /= probabilities.sum(axis=1, keepdims=True)
            for i, probs, ok in zip(batch, probabilities.tolist(), finite):
                if not ok:  # weights with NaN or infinity in them: no probability would be true
                    results[i] = {key: self._shown(sentences[i]), "error": NOT_FINITE}
                    continue
                results[i] = {
                    key: self._shown(sentences[i]),
                    "label": self.labels[int(np.argmax(probs))],
                    "probabilities": dict(zip(self.labels, probs)),
                }
        return results, truncated

    def _shown(self, item):
        return list(item) if self.pairs else item  # JSON has no tuples

    def _pad(self, encodings: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        width = max(len(ids) for ids, _ in encodings)
        arrays = {
            "input_ids": np.full((len(encodings), width), self.pad_token_id, dtype=np.int64),
            "attention_mask": np.zeros((len(encodings), width), dtype=np.int64),
            "token_type_ids": np.zeros((len(encodings), width), dtype=np.int64),
        }
        for row, (ids, type_ids) in enumerate(encodings):
            n = len(ids)
            arrays["input_ids"][row, :n], arrays["attention_mask"][row, :n] = ids, 1
            arrays["token_type_ids"][row, :n] = type_ids
        return {name: arrays[name] for name in self.input_names}


def resolve_model(path: Path, backend: str = "onnx") -> Path:
    """An exported model (a .onnx file, run as it is; or in a folder of exports, the one for backend:
    NAME.int8.onnx for onnx-int8, the other one otherwise), else the checkpoint resolve_checkpoint finds."""
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):  # a mounted folder, say: one line, no traceback
        raise CheckpointError(f"{path}: this folder is not readable by user id {os.getuid()}; chmod -R a+rX it")
    exports = sorted(path.glob("*.onnx")) if path.is_dir() else [path] if path.suffix == ".onnx" else []
    if not exports and path.exists() and importlib.util.find_spec("torch") is None:  # requirements-serve.txt: the image
        raise CheckpointError(f"{path}: no ONNX export (.onnx) here, and without PyTorch only an export can be served:"
                              " copy best-*.onnx from the run's checkpoints folder, where train.py writes it (for an"
                              " older run, `python inference.py --checkpoint CKPT 'A sentence.'` makes it there)")
    if not exports:
        return resolve_checkpoint(path)
    if backend == "torch":
        raise InputError(f"{path}: --backend torch runs a checkpoint (.ckpt), not an ONNX export")
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: exported model not found")
    matching = [p for p in exports if p.name.endswith(".int8.onnx") == (backend == "onnx-int8")]
    if len(matching) != 1:
        names = ", ".join(p.name for p in exports)
        raise CheckpointError(f"{path}: {len(matching)} exports for --backend {backend} here ({names}); give the .onnx file")
    return matching[0]


def load_export(path: Path) -> "onnxruntime.InferenceSession":
    """path's ONNX Runtime session; CheckpointError in one line for a file that is not an ONNX model."""
    import onnxruntime

    try:
        data = path.read_bytes()  # checked and loaded from these bytes: the file may change meanwhile
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read: {e.strerror}") from None
    try:
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as e:  # InvalidProtobuf, Fail...
        raise CheckpointError(f"{path}: not a loadable ONNX model (truncated or another format): {first_line(e)}") from None
    # This project's export (another ONNX model is refused later, as such): given as it is, it cannot be rebuilt.
    if "checkpoint_sha256" in session.get_modelmeta().custom_metadata_map and not export_intact(data):
        raise CheckpointError(f"{path}: {EXPORT_DAMAGED}; export it again from its checkpoint")
    return session


def torch_logits_function(classifier) -> Callable[[dict], np.ndarray]:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classifier.to(device)

    @torch.inference_mode()
    def logits(inputs: dict) -> np.ndarray:
        return classifier(**{k: torch.from_numpy(v).to(device) for k, v in inputs.items()}).float().cpu().numpy()

    return logits


def progress_bar(batches: list, enabled: bool):
    if not enabled or len(batches) < 20:
        return batches
    from tqdm import tqdm  # only for long inputs: it costs start-up time

    return tqdm(batches, desc="Predicting", unit="batch", file=sys.stderr)


def check_inputs(args: argparse.Namespace) -> None:
    """Refuse, in one line, a command line whose input is missing or would be partly ignored."""
    if args.export:
        if args.sentences or args.file or args.glue_test is not None:
            raise InputError("--export writes a model folder and classifies nothing: give it without sentences, --file or --glue_test")
    elif args.glue_test is not None:
        if args.sentences or args.file:
            raise InputError("--glue_test classifies GLUE's test.tsv and nothing else: give it without sentences or --file")
    elif not (args.sentences or args.file):
        raise InputError("give sentences, '-' for standard input, --file PATH, --glue_test TSV or --export DIR")
    elif args.file and len(args.file) > 1:
        raise InputError("--file given more than once: one file at a time (or `cat a.txt b.txt | python inference.py -`)")
    elif args.file and args.sentences:
        raise InputError("sentences given both as arguments and with --file: use one of them (add the sentences to the file)")
    elif "-" in args.sentences and args.sentences != ["-"]:
        raise InputError("'-' (read standard input) cannot be mixed with sentences given as arguments: give '-' alone")


def read_sentences(args: argparse.Namespace) -> Iterator[list[str]]:
    """The sentences to classify, in chunks of at most CHUNK_LINES: the arguments, or one per line of a
    UTF-8 file or standard input, read as the chunks are consumed."""
    if args.file and args.file != ["-"]:
        try:
            source = open(args.file[0], "rb")
        except OSError as e:
            raise InputError(f"{args.file[0]}: cannot read ({e.strerror})") from None
        return read_lines(source, args.file[0])
    if args.sentences == ["-"] or args.file == ["-"]:
        return read_lines(sys.stdin.buffer, "<stdin>")
    for number, sentence in enumerate(args.sentences, start=1):
        try:
            sentence.encode("utf-8")
        except UnicodeEncodeError:  # Python keeps undecodable argument bytes as lone surrogates
            raise InputError(f"argument {number} is not valid UTF-8") from None
    return iter([args.sentences])


def read_lines(source: BinaryIO, name: str) -> Iterator[list[str]]:
    """source's lines in chunks of CHUNK_LINES or CHUNK_BYTES; on a bad line, the lines before it, then InputError.
    Lines end at \n (or \r\n) only, as binary files split them: str.splitlines() would also split at
    characters such as \x0c or \u2028 inside a sentence, and the output would no longer have one line
    per input line."""
    chunk: list[str] = []
    number, error, chunk_bytes = 0, None, 0
    with source:
        try:
            for number, raw in enumerate(iter(lambda: source.readline(MAX_LINE_BYTES + 1), b""), start=1):
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    error = InputError(f"{name}:{number}: a line longer than {MAX_LINE_BYTES:,} bytes is no sentence;"
                                       " put one sentence on each line")
                    break
                if number == 1:  # without the byte-order mark some Windows editors write at the start
                    raw = raw.removeprefix(b"\xef\xbb\xbf")
                    if not raw:
                        break  # the file was that mark alone: no line
                chunk.append(raw.decode("utf-8").removesuffix("\n").removesuffix("\r"))
                chunk_bytes += len(raw)
                if len(chunk) == CHUNK_LINES or chunk_bytes >= CHUNK_BYTES:
                    yield chunk
                    chunk, chunk_bytes = [], 0
        except UnicodeDecodeError:
            error = InputError(f"{name}:{number}: not valid UTF-8; save the file as UTF-8")
        except OSError as e:
            error = InputError(f"{name}: cannot read ({e.strerror})")
    if chunk:
        yield chunk
    if error:
        raise error


def glue_test_rows(task: str, path: str) -> list[list[str]]:
    """[index, text] (or [index, text, text] for pairs) of each example of a GLUE task's test set: GLUE's test.tsv
    (test_matched.tsv for MNLI) at path, or the Hub's copy."""
    from data import GLUE_TASKS  # the task table; torch and datasets load with it: only on this path

    glue = GLUE_TASKS[task]
    if path == HUB_TEST_SPLIT:
        from hub import HubError, load_glue

        try:
            test = load_glue(task, glue.test, howto=f"Or give GLUE's {task} test file: --glue_test TSV")
        except HubError as e:
            raise InputError(str(e)) from None
        return [[str(index), *texts] for index, *texts in zip(test["idx"], *(test[c] for c in glue.text_columns))]
    try:  # lines end at \n alone, as GLUE's files are split (SST-2's hold \r)
        lines = Path(path).read_bytes().decode("utf-8").removeprefix("\ufeff").removesuffix("\n").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read as UTF-8 text ({getattr(e, 'strerror', None) or e.reason})") from None
    header = [name.removesuffix("\r") for name in lines[0].split("\t")]
    wanted = next((["index" if "index" in header else "id", *c] for c in (glue.tsv_text_columns, glue.text_columns)
                   if c and set(c) <= set(header)), None)
    if not wanted or wanted[0] not in header:
        expected = "<TAB>".join(["index", *(glue.tsv_text_columns or glue.text_columns)])
        raise InputError(f"{path}:1: expected GLUE's {glue.submission.removesuffix('.tsv')} test.tsv header, with {expected}")
    columns = [header.index(name) for name in wanted]
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.removesuffix("\r").split("\t")
        row = [fields[i] if i < len(fields) else "" for i in columns]
        if len(fields) != len(header) or not row[0].isdigit() or not all(text.strip() for text in row[1:]):
            raise InputError(f"{path}:{number}: expected {len(header)} tab-separated fields: an index and {' and '.join(wanted[1:])}")
        rows.append(row)
    return rows


def glue_test_predictions(predictor: Predictor, path: str) -> Iterator[str]:
    """The GLUE leaderboard's file for the model's task (CoLA.tsv: index<TAB>prediction, 1 for acceptable; RTE.tsv:
    entailment or not_entailment, as GLUE's server reads each task) for its test set (glue_test_rows), a header first."""
    from data import GLUE_TASKS

    if predictor.task not in GLUE_TASKS:
        raise InputError(f"--glue_test: this model was trained on {predictor.task!r}, not a GLUE task ({', '.join(GLUE_TASKS)})")
    glue = GLUE_TASKS[predictor.task]
    rows = glue_test_rows(predictor.task, path)
    results = predictor.predict([row[1] if len(row) == 2 else row[1:] for row in rows])
    if any("error" in result for result in results):
        raise CheckpointError(f"{path}: some sentences got no prediction: {NOT_FINITE}")
    print(f"note: GLUE's server reads these predictions from a file named {glue.submission}", file=sys.stderr)
    yield "index\tprediction"
    for row, result in zip(rows, results):
        yield f"{row[0]}\t{result['label'] if glue.submit_label_names else predictor.labels.index(result['label'])}"


def print_results(results: list[dict], as_json: bool, first_line: int = 1, label_width: int = 0) -> None:
    """One line per result on stdout (JSON, or label, probability, sentence); in text mode an error is a
    warning on stderr instead. first_line numbers the results in those warnings."""
    ascii_only = codecs.lookup(sys.stdout.encoding or "ascii").name not in ("utf-8", "utf-16", "utf-32")
    for line_no, result in enumerate(results, start=first_line):
        if as_json:  # where stdout takes no UTF-8 (PYTHONIOENCODING=ascii): \u escapes, the same JSON
            print(json.dumps(result, ensure_ascii=ascii_only, allow_nan=False))
        elif "error" in result:
            print(f"warning: input {line_no} skipped: {result['error']}", file=sys.stderr)
        else:
            probability = result["probabilities"][result["label"]]
            text = result["sentence"] if "sentence" in result else "\t".join(result["pair"])  # as it was given
            print(f"{result['label']:<{label_width}}  {probability:.3f}  {text}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sentences", nargs="*", help="sentences to classify (for a model of pairs: two texts with a tab"
                        " between); '-' reads them from standard input")
    parser.add_argument("--file", action="append", help="a UTF-8 text file, one sentence (or tab-separated pair) per line"
                        " ('-': standard input)")
    parser.add_argument("--checkpoint", type=Path, help="a .ckpt file, a run folder, a folder of runs (default: logs/cola),"
                        " or an export: a .onnx file or a folder holding it")
    parser.add_argument("--json", action="store_true", help="one JSON object per input line")
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    parser.add_argument("--backend", choices=BACKENDS, default="onnx", help="torch uses the GPU if present")
    parser.add_argument("--export", metavar="DIR", help="write a Hugging Face model folder to DIR (new or empty) and exit")
    parser.add_argument("--glue_test", metavar="TSV", nargs="?", const=HUB_TEST_SPLIT, help="print GLUE's leaderboard"
                        " predictions (CoLA.tsv, RTE.tsv...) for the model's task's test.tsv; without TSV, for the Hub's"
                        " nyu-mll/glue test split of that task")
    # argparse prints its usage before the error: one line instead, as every other problem.
    parser.error = lambda message: sys.exit(f"error: {message} (python inference.py --help lists the options)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    check_inputs(args)
    # A sentence stdout's encoding cannot write (PYTHONIOENCODING=ascii, a C locale) was a traceback: \xdf instead.
    sys.stdout.reconfigure(errors="backslashreplace")

    checkpoint = args.checkpoint or find_best_checkpoint()
    if args.export:
        try:
            export_hf(checkpoint, args.export)
        except OSError as e:  # refused (exists, not a folder) or failed (permissions, disk full)
            raise InputError(f"--export {args.export}: {e.strerror}") from None
        print(f"Exported to {args.export}: pipeline('text-classification', model='{args.export}')")
        return
    if args.glue_test is not None:
        print("\n".join(glue_test_predictions(Predictor(checkpoint, backend=args.backend), args.glue_test)))
        return
    chunks = read_sentences(args)
    # Bad input at the very start fails before the model loads; a second chunk means a long input. A bad line after
    # good ones: those are answered first, then the error (read_lines yields the lines before it).
    head, error = [], None
    try:
        for chunk in chunks:
            head.append(chunk)
            if len(head) == 2:
                break
    except InputError as e:
        if not head:
            raise
        error, chunks = e, iter([])
    predictor = Predictor(checkpoint, backend=args.backend)
    label_width = max(len(label) for label in predictor.labels)
    line, truncated, not_finite, bar = 1, 0, 0, None
    if len(head) > 1:  # one bar over all sentences, however many chunks; not per chunk
        from tqdm import tqdm  # only for long inputs: it costs start-up time

        bar = tqdm(desc="Predicting", unit=" sentences", file=sys.stderr)
    try:
        for chunk in itertools.chain(head, chunks):
            extra_tabs = {}  # a pair line with more than one tab: which tab ends the first text is anyone's guess
            if predictor.pairs:  # "first<TAB>second"; without a tab, an empty second text, reported as such
                fields = [line.split("\t") for line in chunk]
                extra_tabs = {i: len(f) - 1 for i, f in enumerate(fields) if len(f) > 2}
                chunk = [(f + [""])[:2] if i not in extra_tabs else ["", ""] for i, f in enumerate(fields)]
            results, chunk_truncated = predictor.predict_counting_truncated(chunk, args.batch_size, progress=bar is None)
            for i, tabs in extra_tabs.items():
                results[i] = {"pair": fields[i], "error": f"{tabs} tabs ({PAIR_HOWTO}: one tab)"}
            print_results(results, args.json, line, label_width)
            sys.stdout.flush()  # output starts at once, even into a pipe
            line, truncated = line + len(chunk), truncated + chunk_truncated
            not_finite += sum(r.get("error") == NOT_FINITE for r in results)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()  # its line ended before any error follows it
    predictor.warn_truncated(truncated)
    if error:
        raise error
    if not_finite:
        raise CheckpointError(f"{checkpoint}: {not_finite} sentence(s) got no prediction: {NOT_FINITE}")


def run() -> None:
    """main() as a command: a bad input or checkpoint is one line on stderr and exit status 1."""
    try:
        main()
    except (InputError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    except BrokenPipeError:  # `... | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        sys.exit(1)


ColaPredictor = Predictor  # its name when it knew CoLA alone

if __name__ == "__main__":
    run()
