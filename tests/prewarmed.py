"""`python SCRIPT ARGS` for the tests without paying the imports each time.

A `python train.py` spends ~6 s of CPU importing torch, Lightning, transformers and datasets before it reads
its first option; the suite runs it ~150 times. This process imports them once, then forks a child for each
command: the child is a new process (its own pid, exit status, stdout, stderr, working folder) that runs the
script as `python SCRIPT` would (runpy as __main__, sys.argv, sys.path[0]), with the libraries already loaded.
It starts no thread and runs no torch operation before it forks, so the children fork from a clean state.

Protocol, one JSON line each way on stdin/stdout: {"script", "args", "cwd", "env", "stdin", "stdout", "stderr",
"timeout", "address_space" (RLIMIT_AS in bytes, or null)} (the three streams as file paths) -> {"returncode"} or {"timeout": true} (the child was killed).
Used by tests/conftest.py `run_script`; a test that changes a variable the libraries read at import (HF_HOME,
XDG_CACHE_HOME, ...) gets a real subprocess there.
"""

import json
import os
import resource
import runpy
import signal
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = REPO  # as for `python REPO/train.py`: the project's modules import from the repository

# What train.py, tune.py and inference.py import anyway (a real run loads the same modules, once).
import datasets  # noqa: E402,F401
import pytorch_lightning  # noqa: E402,F401
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402,F401  (lazy in transformers 5)

import callbacks, checkpoints, data, export, model, readers  # noqa: E401,E402,F401


def child(request: dict) -> None:
    """In the forked child: become `python SCRIPT ARGS` in request["cwd"], then exit as Python would."""
    import random

    if request["address_space"]:
        resource.setrlimit(resource.RLIMIT_AS, (request["address_space"],) * 2)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])  # the test's, as subprocess.run would pass it
    for fd, path, mode in ((0, request["stdin"], os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                           (2, request["stderr"], os.O_WRONLY)):
        opened = os.open(path, mode)
        os.dup2(opened, fd)
        os.close(opened)
    # New stream objects: the parent's sys.stdin may hold buffered request lines.
    sys.stdin = sys.__stdin__ = open(0, closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False)
    random.seed()  # a fresh process seeds these from the OS; a fork would share the parent's state
    __import__("numpy").random.seed()
    script = os.path.abspath(request["script"])
    sys.argv = [script, *request["args"]]
    sys.path[0] = os.path.dirname(script)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # as the interpreter reads it: None is 0, an int itself, anything else printed and 1
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        import atexit
        import threading

        threading._shutdown()  # wait for non-daemon threads, then the atexit functions, as interpreter exit does
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code & 0xFF)


def serve() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # nothing the libraries print may reach the reply pipe
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                child(request)
            finally:
                os._exit(1)
        deadline = time.monotonic() + request["timeout"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                replies.write(json.dumps({"timeout": True}) + "\n")
                break
            time.sleep(0.02)


if __name__ == "__main__":
    serve()
