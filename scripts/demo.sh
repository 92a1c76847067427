#!/usr/bin/env bash
# The main job: a CPU demo of just-in-time checkpointing. Trains the example
# GPT on 4 ranks (gloo), kills rank 2 with SIGKILL in the middle of a backward
# pass, lets the survivors save the last completed step, resumes from it and
# prints the launcher's failure summary and the checkpoint table.
#
# Installs what it needs first (the pinned CPU torch wheel, torchdata, this
# package). Settings: DEMO_STEPS (default 120), DEMO_RUN_DIR (default
# runs/demo, recreated), JITCKPT_SKIP_INSTALL=1 to skip the install.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${JITCKPT_SKIP_INSTALL:-}" ]; then
  python -m pip install -q -r requirements-dev.txt
fi
steps=${DEMO_STEPS:-120}
run_dir=${DEMO_RUN_DIR:-runs/demo}
fail_step=$((steps / 2))
rm -rf "$run_dir"
echo "== training $steps steps on 4 ranks; rank 2 is killed (SIGKILL) in the backward pass of step $fail_step"
python -m jitckpt run --standalone --nproc-per-node 4 \
  --inject "kill@step=$fail_step,rank=2,phase=backward" \
  examples/train_gpt.py --steps "$steps" --run-dir "$run_dir" --log-every 10 --digest "$run_dir/digest.txt"
echo
echo "== checkpoints written on the failure (jitckpt inspect $run_dir)"
python -m jitckpt inspect "$run_dir"
echo
echo "== event log: $run_dir/events.jsonl; again with: jitckpt report $run_dir"
