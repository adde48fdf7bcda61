"""Every option of train.py, tune.py, inference.py and serve.py, taken from the script's own parser, tried at the
extremes of its type; run by tests/test_option_fuzz.py, one process per script (the ~6 s of imports paid once):

    python tests/option_fuzz.py SCRIPT MODEL_DIR DATA_DIR CHECKPOINT WORK_DIR [SHARD COUNT]

Each case calls the script's own command entry point (`run()`: the code `python SCRIPT.py` runs) with
sys.argv = [SCRIPT.py, base options..., --option, value], in a new empty folder, and prints one JSON line:
the exit status, stderr, an exception that escaped (in a real process: a traceback) and the files a failed
case left behind. Two things are not run for real, to keep a case under a second: train.py's ONNX export at
the end of a run (tested elsewhere), and serve.py's serving loop (parsing, the model and the socket are real).
"""

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"

HUGE = str(2**64)  # past every C integer (int64, size_t): a "huge count"
CASE_SECONDS = 120  # a case still running after this is a finding (a hang, or a count taken at its word)


def values_for(hint: str) -> list[str]:
    """The extremes of an option's type, by the type's name: numbers at 0, -1, 2**64 (ints) and NaN, inf (floats);
    any option an empty string and a path outside the working folder (../outside: a folder, empty)."""
    values = ["", "../outside"]
    if "int" in hint:
        values += ["0", "-1", HUGE]
    if "float" in hint:
        values += ["0", "-1", "nan", "inf", "-inf"]
    return list(dict.fromkeys(values))


def train_options() -> list[tuple[str, str]]:
    """(--option, its type) for every option train.py's LightningCLI parser has, read from the parser itself."""
    import train

    class Parser(Exception):
        pass

    def stop(self, parser, *args, **kwargs):  # LightningCLI builds the parser, then parses: take it there
        raise Parser(parser)

    original = train.TrainCLI.parse_arguments
    train.TrainCLI.parse_arguments = stop
    try:
        train.main([])
    except Parser as e:
        parser = e.args[0]
    finally:
        train.TrainCLI.parse_arguments = original
    skip = {"help", "print_config"}  # print and exit: no extremes to them
    return [(f"--{a.dest}", str(getattr(a, "_typehint", "") or type(a).__name__)) for a in parser._actions
            if a.dest not in skip and not a.dest.endswith(".help") and type(a).__name__ != "ActionLink"]


def argparse_options(module) -> list[tuple[str, str]]:
    """(--option, its type) for every option of an argparse script (build_parser()); positionals as themselves."""
    options = []
    for action in module.build_parser()._actions:
        if action.dest == "help":
            continue
        name = action.option_strings[0] if action.option_strings else ""
        kind = "flag" if action.nargs == 0 else getattr(action.type, "__name__", "str")
        options.append((name, kind))
    return options


def cases(script: str, model_dir: str, data_dir: str, checkpoint: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(the base command line every case starts from, the (option, type) list)."""
    if script in ("train", "tune"):
        base = ["--model.model_name_or_path", model_dir, "--data.data_dir", data_dir, "--data.batch_size", "16",
                "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
        if script == "tune":
            import tune

            return ["--n_trials", "1", *base], argparse_options(tune)
        return base, train_options()
    if script == "inference":
        import inference

        return ["--checkpoint", checkpoint, "--backend", "torch"], argparse_options(inference)  # + a sentence: main()
    import serve

    return ["--checkpoint", checkpoint, "--backend", "torch", "--port", "0"], argparse_options(serve)


class Timeout(Exception):
    pass


def fake_serving() -> None:
    """serve.py: everything up to serving (parse, check, load, bind) runs; uvicorn's loop returns at once."""
    import uvicorn

    import serve

    def started(self, sockets=None):
        self.started = True

    def no_workers(self):  # --workers N > 1 (2..MAX_WORKERS: no extreme reaches it) would fork N servers
        raise SystemExit("error: the option fuzz starts no --workers")

    uvicorn.Server.run = started
    serve.Supervisor.run = no_workers


def run_case(script: str, argv: list[str], folder: Path) -> dict:
    """One command, as `python SCRIPT.py ARGV` in folder: its status, stderr, escaped exception, files left behind."""
    module = __import__(script)
    folder.mkdir(parents=True)
    environment = dict(os.environ)
    err, out = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True) for _ in range(2))  # reconfigure()-able
    result = {"argv": argv[-2:], "rc": 0, "exception": None}
    os.chdir(folder)
    sys.argv = [f"{script}.py", *argv]
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(Timeout(f"still running after {CASE_SECONDS} s")))
    signal.alarm(CASE_SECONDS)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            (module.run if hasattr(module, "run") else module.main)()  # serve.py's command is main()
    except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit("error: ...") prints it to stderr and exits 1
            err.write(e.code + "\n")
        result["rc"] = 1 if isinstance(e.code, str) else (e.code or 0)
    except BaseException as e:  # noqa: BLE001: a real process would print this as a traceback
        result["rc"], result["exception"] = 1, "".join(traceback.format_exception(e))[-3000:]
    finally:
        signal.alarm(0)
        os.chdir(REPO)
        os.environ.clear()
        os.environ.update(environment)
    result["stderr"] = err.buffer.getvalue().decode("utf-8", "replace")[-3000:]
    if result["rc"] != 0:  # a refused command leaves nothing: no run folder, no file, here or outside
        result["left"] = sorted(str(p) for p in [*folder.rglob("*"), *(folder.parent / "outside").rglob("*")] if p.is_file())
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(folder.parent / "outside", ignore_errors=True)
    (folder.parent / "outside").mkdir()
    return result


def main() -> None:
    # A case that allocates without bound is a MemoryError here (a finding), not the machine's OOM killer at work.
    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    script, model_dir, data_dir, checkpoint, work = sys.argv[1:6]
    shard, count = (int(sys.argv[6]), int(sys.argv[7])) if len(sys.argv) > 7 else (0, 1)
    base, options = cases(script, model_dir, data_dir, checkpoint)
    if script == "train":
        import train

        train.export_for_inference = lambda path: None
    if script == "serve":
        fake_serving()
    work_dir = Path(work)
    (work_dir / "outside").mkdir(parents=True, exist_ok=True)
    todo = [(option, value) for option, kind in options for value in (values_for(kind) if kind != "flag" else [None])]
    for number, (option, value) in enumerate(todo):
        if number % count != shard:
            continue
        extra = [option] if value is None else ([value] if option == "" else [option, value])
        if script == "inference" and option not in ("", "--file", "--export", "--glue_test"):
            extra = ["The dog sat on the mat.", *extra]  # something to classify, so that the option is used
        result = run_case(script, [*base, *extra], work_dir / f"case-{number}")
        result.update(option=option or "(positional)", value=value)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
