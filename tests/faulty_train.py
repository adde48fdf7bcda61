"""`python train.py ARGS` (or $FAULT_SCRIPT ARGS: tune.py) with one fault injected, for the reliability tests.
The fault comes from $FAULT:

    pause_before_step:N    before training step N+1 (N steps done), stop and wait
    pause_in_save:TEXT     half-way through writing the first checkpoint whose file name contains TEXT, stop and wait
    nan_before_step:N      before training step N+1, make the classifier's weights NaN (so the loss is NaN)

Waiting means: write the file $FAULT_MARKER, then sleep until the test kills this process or deletes that file.
"""

import io
import os
import runpy
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # as `python train.py` would

from model import TextClassifier  # noqa: E402  (the class train.py will use: the same module object)


def wait(reason: str) -> None:
    marker = Path(os.environ["FAULT_MARKER"])
    marker.write_text(reason)
    while marker.exists():
        time.sleep(0.02)


fault, _, arg = os.environ["FAULT"].partition(":")
if fault in ("pause_before_step", "nan_before_step"):

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == int(arg):
            if fault == "nan_before_step":
                self.model.classifier.weight.data.fill_(float("nan"))
            else:
                wait(f"before step {self.global_step + 1}")

    TextClassifier.on_train_batch_start = on_train_batch_start
elif fault == "pause_in_save":
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if arg not in str(getattr(f, "name", f)):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        f.flush()
        wait(f"half-way through writing {getattr(f, 'name', f)}")
        f.write(buffer.getvalue()[buffer.tell() // 2 :])

    torch.save = save
else:
    sys.exit(f"unknown FAULT {fault!r}")

sys.argv = [str(REPO / os.environ.get("FAULT_SCRIPT", "train.py")), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
