"""Downloads from the Hugging Face Hub whose failures read as one line: which thing, why, how to run offline.

transformers and datasets report a missing network, a wrong id and offline mode as long multi-line
errors (an OSError or ConnectionError wrapping the Hub client's own); the cause chain tells them apart.
"""

import contextlib
from pathlib import Path
from typing import Iterator

import datasets
from huggingface_hub import constants
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

OFFLINE_HOWTO = (
    "To train offline, pass a local model folder (--model.model_name_or_path DIR, saved with save_pretrained)"
    " and local CoLA files (--data.data_dir DIR with GLUE's train.tsv and dev.tsv)"
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


@contextlib.contextmanager
def explain_hub_errors(kind: str, name: str) -> Iterator[None]:
    """Re-raise a failure to load `kind` ("model", "tokenizer", "dataset") `name` as a one-line HubError."""
    try:
        yield
    except Exception as error:
        causes = list(_chain(error))
        what = f"{kind} {name!r}"
        if any(isinstance(e, HFValidationError) for e in causes):
            reason = "is neither a local folder nor a valid Hub id (namespace/name)"
        elif any(isinstance(e, (RepositoryNotFoundError, datasets.exceptions.DatasetNotFoundError)) for e in causes):
            # The Hub answers "not found" for private and gated repositories too, unless logged in.
            where = "not on" if kind == "dataset" else "neither a local folder nor on"
            reason = f"is {where} the Hugging Face Hub: check the id (private or gated ones need `hf auth login`)"
        elif any(isinstance(e, (LocalEntryNotFoundError, ConnectionError)) for e in causes):
            if _offline():
                reason = "is not in the local cache, and HF_HUB_OFFLINE is set, so it cannot be downloaded"
            else:
                reason = "could not be downloaded: the Hugging Face Hub is unreachable (no network?), and it is not cached"
        elif kind != "dataset" and Path(name).is_dir():
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            reason = f"is a folder without a usable model or tokenizer ({first_line})"
        else:
            raise
        raise HubError(f"{what} {reason}. {OFFLINE_HOWTO}.") from None

