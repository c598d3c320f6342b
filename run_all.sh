#!/usr/bin/env bash
# run_all.sh: the paper's experiments in order, by calling the CLIs. No Python logic lives here.
#
#   bash run_all.sh tiny     offline, CPU, ~25 min: synthetic traces -> a 1M-parameter model trained
#                            from scratch (sft.py --init tiny) -> PPO -> behavior counts (rules judge)
#   bash run_all.sh paper    one 80 GB GPU, days: Qwen2.5-3B and Llama-3.2-3B base PPO, then Llama
#                            primed on each behavior condition, then PPO on each, then behavior counts
#
# Every step resumes when rerun (each CLI resumes its own --out; finished files are skipped), so a
# crashed or interrupted run_all.sh is simply started again.
#
# Environment knobs for `paper`:
#   PRIMING=synthetic (default)  priming traces from countdown.py (offline, exact behavior counts)
#   PRIMING=llm                  priming traces written by Claude through curate.py, as the paper
#                                (needs ANTHROPIC_API_KEY); controls derived with curate.py controls
#   JUDGE=rules (default) | openai | anthropic   behavior judge for classify.py (openai: gpt-4o-mini,
#                                the paper's; needs OPENAI_API_KEY or a --base-url server via JUDGE_ARGS)
#   JUDGE_ARGS="..."             extra classify.py flags, e.g. "--base-url http://localhost:8000"
#   PYTHON=python3               interpreter
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
MODE=${1:-}

skip_if_exists() { [ -e "$1" ] && echo "[run_all] $1 exists, skipping"; }

case "$MODE" in
tiny)
    D=runs/tiny
    # 1. problems: a held-out test set first, so every later step can exclude it
    skip_if_exists $D/data/test.jsonl || \
        $PY countdown.py problems --distribution priming --n-train 3000 --n-test 500 --seed 777 --out $D/data
    # 2. priming data: synthetic direct-solution traces (the shortest kind; a 1M model learns them fastest on CPU)
    skip_if_exists $D/data/negative_control.jsonl || \
        $PY countdown.py traces --condition negative_control --n 50000 --seed 1 --out $D/data/negative_control.jsonl
    # 3. SFT from scratch: tokenizer + model trained on the traces; test problems are dropped from the data
    [ -e $D/sft/final/config.json ] || \
        $PY sft.py --init tiny --data $D/data/negative_control.jsonl --eval-problems $D/data/test.jsonl \
            --out $D/sft --epochs 2 --batch-size 32 --num-threads 1
    # 4. PPO (a tiny model needs far larger learning rates than the paper's 1e-6 / 1e-5); validation
    #    samples at T = 1, the accuracy the paper reports (greedy: --val-temperature 0)
    $PY ppo.py --model $D/sft/final --out $D/ppo --device cpu --threads 1 \
        --train-data $D/data/train.jsonl --test-data $D/data/test.jsonl \
        --batch-prompts 64 --samples 4 --mini-batch-prompts 32 --micro-batch 64 --max-response 96 \
        --steps 150 --actor-lr 2e-4 --critic-lr 1e-3 --no-grad-checkpointing --val-temperature 1.0
    # 5. behavior counts of every validation's completions, offline rules judge
    $PY classify.py --input $D/ppo/completions --judge rules --out $D/labels
    echo "[run_all] done: accuracy per step in $D/ppo/metrics.jsonl, behaviors in $D/labels/summary.csv"
    ;;
paper)
    CONDITIONS="all_strategies only_backtracking backtracking_verification backtracking_subgoal backtracking_backward"
    CONTROLS="no_positive empty_cot dots"
    PRIMING=${PRIMING:-synthetic}
    JUDGE=${JUDGE:-rules}
    DATA=data/priming
    mkdir -p $DATA
    # 1. priming data: 1,200 examples per condition (1,000 train + 200 held out, as the paper)
    for c in $CONDITIONS $CONTROLS; do
        if [ "$PRIMING" = llm ]; then
            case " $CONTROLS " in
            *" $c "*) skip_if_exists $DATA/$c.jsonl || \
                $PY curate.py controls --input $DATA/all_strategies.jsonl --kind $c --out $DATA/$c.jsonl ;;
            *) $PY curate.py priming --condition $c --n 1200 --out $DATA ;;
            esac
        else
            skip_if_exists $DATA/$c.jsonl || \
                $PY countdown.py traces --condition $c --n 1200 --seed 0 --out $DATA/$c.jsonl
        fi
    done
    # 2. priming SFT of Llama-3.2-3B on each condition (paper recipe: 5 epochs, batch 64, lr 1e-5)
    for c in $CONDITIONS $CONTROLS; do
        [ -e runs/sft/$c/final/config.json ] || \
            $PY sft.py --model llama-3.2-3b --data $DATA/$c.jsonl --val-fraction 0.1667 \
                --out runs/sft/$c --grad-checkpointing
    done
    # 3. PPO exactly as the paper ran it: both base models, then every primed Llama. --fidelity turns
    #    on the original's quirks (micro-batch-dependent loss mean, 4x more critic steps, lr 0 on the
    #    first iteration, V trained on the post-EOS state); ppo.py's default is the cleaned-up variant.
    #    Validation samples at T = 1: the paper's accuracy curves and behavior counts come from those.
    PPO_ARGS="--fidelity --val-temperature 1.0"
    $PY ppo.py --model qwen2.5-3b --out runs/ppo/qwen_base $PPO_ARGS
    $PY ppo.py --model llama-3.2-3b --out runs/ppo/llama_base $PPO_ARGS
    for c in $CONDITIONS $CONTROLS; do
        $PY ppo.py --model runs/sft/$c/final --out runs/ppo/llama_$c $PPO_ARGS
    done
    # 4. behavior counts per validation step (200 completions per step, seeded)
    for run in runs/ppo/*/; do
        $PY classify.py --input ${run}completions --judge $JUDGE --out ${run}labels ${JUDGE_ARGS:-}
    done
    echo "[run_all] done: runs/ppo/*/metrics.jsonl (accuracy), runs/ppo/*/labels/summary.csv (behaviors)"
    ;;
*)
    echo "usage: bash run_all.sh tiny|paper   (see the comments at the top of this file)" >&2
    exit 2
    ;;
esac
