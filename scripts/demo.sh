#!/usr/bin/env bash
# The main job: a CPU demo of just-in-time checkpointing. Trains the example
# GPT on 4 ranks (gloo) and kills rank 2 with SIGKILL in the middle of a
# backward pass, twice: on the restart path (the survivors save the last
# completed step, every worker restarts and resumes from it; the launcher's
# failure summary and the checkpoint table follow), then in process (a hot
# spare takes rank 2's place and gets the state from a survivor; nothing
# restarts).
#
# Installs what it needs first (the pinned CPU torch wheel, torchdata, this
# package). Settings: DEMO_STEPS (default 120), DEMO_RUN_DIR (default
# runs/demo and runs/demo-inprocess, recreated), JITCKPT_SKIP_INSTALL=1 to skip the install.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${JITCKPT_SKIP_INSTALL:-}" ]; then
  python -m pip install -q -r requirements-dev.txt
fi
steps=${DEMO_STEPS:-120}
run_dir=${DEMO_RUN_DIR:-runs/demo}
fail_step=$((steps / 2))
rm -rf "$run_dir"
echo "== 1. the restart path: training $steps steps on 4 ranks; rank 2 is killed (SIGKILL) in the backward pass of step $fail_step"
python -m jitckpt run --standalone --nproc-per-node 4 --recovery restart \
  --inject "kill@step=$fail_step,rank=2,phase=backward" \
  examples/train_gpt.py --steps "$steps" --run-dir "$run_dir" --log-every 10 --digest "$run_dir/digest.txt"
echo
echo "== checkpoints written on the failure (jitckpt inspect $run_dir)"
python -m jitckpt inspect "$run_dir"
echo
echo "== 2. in process: the same run and failure with a hot spare (--spares 1); the survivors keep running"
rm -rf "$run_dir-inprocess"
python -m jitckpt run --standalone --nproc-per-node 4 --spares 1 \
  --inject "kill@step=$fail_step,rank=2,phase=backward" \
  examples/train_gpt.py --steps "$steps" --run-dir "$run_dir-inprocess" --log-every 10 --digest "$run_dir-inprocess/digest.txt"
echo
echo "== event logs: $run_dir/events.jsonl and $run_dir-inprocess/events.jsonl; again with: jitckpt report DIR"
