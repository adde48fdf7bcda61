"""Downloads from the Hugging Face Hub whose failures read as one line: which thing, why, how to run offline.

transformers and datasets report a missing network, a wrong id and offline mode as long multi-line
errors (an OSError or ConnectionError wrapping the Hub client's own); the cause chain tells them apart.
"""

import contextlib
import os
import socket
import threading
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import datasets
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

GLUE = "nyu-mll/glue"  # GLUE on the Hub: a configuration per task (cola, sst2, ...)
OFFLINE_HOWTO = (
    "To train offline, pass a local model folder (--model.model_name_or_path DIR, saved with save_pretrained)"
    " and local data files (--data.data_dir DIR with GLUE's train.tsv and dev.tsv)"
)


class HubError(Exception):
    """A model or dataset that could not be loaded from the Hub or a local folder, reported as one line."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _offline() -> bool:
    return constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE


PROBE_SECONDS = 3.0
_hub_unreachable = None  # None: not probed yet in this process


def _probe_hub() -> bool:
    """Whether the Hub answers a TCP connection within PROBE_SECONDS (name lookup included)."""
    address = urlsplit(constants.ENDPOINT)
    port = address.port or (443 if address.scheme == "https" else 80)
    reached, done = [], threading.Event()

    def connect() -> None:
        try:
            socket.create_connection((address.hostname, port), timeout=PROBE_SECONDS).close()
            reached.append(True)
        except OSError:
            pass
        finally:
            done.set()

    threading.Thread(target=connect, daemon=True).start()  # a thread: a name lookup ignores socket timeouts
    done.wait(PROBE_SECONDS)
    return bool(reached)


def _go_offline_if_unreachable(kind: str, name: str) -> None:
    """With no network, huggingface_hub retries each download five times with backoff (~25 s, ten lines of
    "Retrying in Ns") before failing. Probe the Hub once instead: if it does not answer, work offline, as
    HF_HUB_OFFLINE=1 does (cached models and data still load), and say it is unreachable if something is not
    cached. Behind a proxy the probe is skipped: the Hub is reached through it, not directly."""
    global _hub_unreachable
    if _hub_unreachable is not None or _offline() or (kind != "dataset" and Path(name).is_dir()):
        return
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        _hub_unreachable = False
        return
    _hub_unreachable = not _probe_hub()
    if _hub_unreachable:
        constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True


@contextlib.contextmanager
def explain_hub_errors(kind: str, name: str, howto: str = OFFLINE_HOWTO) -> Iterator[None]:
    """Re-raise a failure to load `kind` ("model", "tokenizer", "dataset") `name` as a one-line HubError naming
    the Hub it came from (HF_ENDPOINT, if set) and ending with howto."""
    _go_offline_if_unreachable(kind, name)
    try:
        yield
    except Exception as error:
        causes = list(_chain(error))
        what, hub = f"{kind} {name!r}", f"the Hub at {constants.ENDPOINT}"
        if any(isinstance(e, HFValidationError) for e in causes):
            reason = "is neither a local folder nor a valid Hub id (namespace/name)"
        elif any(isinstance(e, GatedRepoError) for e in causes):
            reason = f"is gated on {hub}: accept its conditions on its page there, then `hf auth login` or set HF_TOKEN"
        elif any(isinstance(e, (RepositoryNotFoundError, datasets.exceptions.DatasetNotFoundError)) for e in causes):
            # The Hub answers "not found" for private and gated repositories too, unless logged in.
            where = "not on" if kind == "dataset" else "neither a local folder nor on"
            reason = f"is {where} {hub}: check the id (a private or gated one needs `hf auth login` or HF_TOKEN)"
        elif any(isinstance(e, (LocalEntryNotFoundError, ConnectionError)) for e in causes):
            if _offline() and not _hub_unreachable:
                reason = "is not in the local cache, and HF_HUB_OFFLINE is set, so it cannot be downloaded"
            else:
                reason = f"could not be downloaded: {hub} is unreachable (no network?), and it is not cached"
        elif broken := next((e for e in causes if "TransportError" in {c.__name__ for c in type(e).__mro__}), None):
            # Cut off midway, after huggingface_hub's own resumed retries; it then deletes the part (2.x).
            # By class name: huggingface_hub 2.x raises the errors of httpx2 (a package of its own), not httpx's.
            reason = f"could not be downloaded from {hub}: the connection broke off ({broken}); nothing partial was kept, run the same command again"
        elif kind != "dataset" and Path(name).is_dir():
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            reason = f"is a folder without a usable model or tokenizer ({first_line})"
        else:
            raise
        raise HubError(f"{what} {reason}. {howto}.") from None


def load_glue(task: str, split: str, howto: str = OFFLINE_HOWTO) -> datasets.Dataset:
    """One split of a GLUE task (cola, sst2, ...) from the Hub (or the datasets cache), with its ClassLabel; test's labels are -1."""
    with explain_hub_errors("dataset", GLUE, howto):
        return datasets.load_dataset(GLUE, task, split=split)

