#!/usr/bin/env bash
# run_all.sh: the experiments in order, by calling the CLIs. No Python logic lives here.
#
#   bash run_all.sh tiny     offline, 2-core CPU, 26 min: the miniature study with one seed, one
#                            behavior-primed condition (restart) and one control (restart_empty_cot)
#   bash run_all.sh mini     offline, 2-core CPU, 76 min: five conditions x two seeds, 10 PPO steps
#   bash run_all.sh satori   offline, 2-core CPU, ~2.5 h after mini: Satori (COAT format tuning, PPO with
#                            Restart-and-Explore, a self-improvement round) against mini's best condition
#   bash run_all.sh paper    one 80 GB GPU, days: Qwen2.5-3B and Llama-3.2-3B base PPO, then Llama
#                            primed on each behavior condition, then PPO on each, then behavior counts
#
# The miniature mirrors the paper's pipeline (README, "The miniature study"):
#   1. held-out test problems; priming traces per condition, all from the same problems (traces.py)
#   2. ONE shared tiny base model pretrained from scratch on behavior-free text (single successful
#      attempts in the traces' step format + arithmetic facts; traces.py corpus): the "Llama" of the
#      miniature; its arithmetic gate (sft.py eval --arithmetic)
#   3. a short priming SFT of that base per condition and seed (N_TRACES traces, 2 epochs, batch 32:
#      the same number of optimizer steps for every condition)
#   4. PPO from each primed model, identical settings, a response cap checked against every
#      condition's traces; validation at T = 1 on the same problems
#   5. each final policy greedily on fresh problems (sft.py eval)
#   6. classify.py report: results.json, results.md (gates, T = 1 and greedy tables) and figures
#
# Every step resumes when rerun (each CLI resumes its own --out; finished files are skipped), so a
# crashed or interrupted run_all.sh is simply started again. Runs of one stage go JOBS at a time
# (default 2 on CPU, one thread each; logs in <dir>/logs/).
#
# Environment knobs:
#   DEVICE=cpu (default) | cuda    where tiny/mini train; cuda runs one job at a time
#   JOBS=N                         parallel runs per stage in tiny/mini
#   PYTHON=python3                 interpreter
# and for `paper`:
#   PRIMING=synthetic (default)  priming traces from countdown.py (offline, exact behavior counts)
#   PRIMING=llm                  priming traces written by Claude through curate.py, as the paper
#                                (needs ANTHROPIC_API_KEY); controls derived with curate.py controls
#   JUDGE=openai (default) | anthropic | rules   behavior judge for classify.py (openai: gpt-4o-mini,
#                                the paper's; needs OPENAI_API_KEY or a --base-url server via JUDGE_ARGS).
#                                rules only on explicit request: its regexes fit some wordings better
#                                than others, so counts compared across models are biased (README)
#   JUDGE_ARGS="..."             extra classify.py flags, e.g. "--base-url http://localhost:8000"
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
MODE=${1:-}
DEVICE=${DEVICE:-cpu}
if [ "$DEVICE" = cpu ]; then JOBS=${JOBS:-2}; THREADS=1; else JOBS=${JOBS:-1}; THREADS=0; fi

skip_if_exists() { [ -e "$1" ] && echo "[run_all] $1 exists, skipping"; }
# threads_of NAME: threads for run NAME (<condition>_s<seed>). LEAD=<condition> gives that condition's runs
# LEAD_THREADS (tiny: its one search-primed chain is ~4x its control's, which runs beside it on one thread)
threads_of() { case $1 in "${LEAD:-}"_s*) echo "${LEAD_THREADS:-$THREADS}" ;; *) echo "$THREADS" ;; esac; }

# background() NAME CMD...: run CMD into $D/logs/NAME.log, at most $JOBS at a time; finish() waits
background() {
    local name=$1; shift
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    echo "[run_all] $name -> $D/logs/$name.log"
    "$@" > "$D/logs/$name.log" 2>&1 &
}
finish() { while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n; done; }

# The miniature study. Settings come from the mode below: D, DESIGN, CONDITIONS, SEEDS, N_TEST, BASE_EPOCHS,
# N_TRACES, N_SOLUTIONS, N_DRILL, PPO_STEPS, PRIME_EPOCHS, and PPO (the shared ppo.py flags).
# DESIGN=restart (tiny, mini): every condition is written from the same N_TRACES problems (rows 0.. of
# train.jsonl), the base's single paths from the next N_SOLUTIONS rows; the test problems are in neither.
# DESIGN=narrated (satori): the first design's narrated searches and corpus (README, "variants tried").
study() {
    mkdir -p $D/data $D/logs $D/gates
    local data_args="" source=all_strategies
    # 1. held-out problems (the PPO test set, excluded from every training file) and priming traces
    local n_train=$((N_TRACES + N_SOLUTIONS)); [ "$DESIGN" = narrated ] && n_train=20000  # as the first study
    skip_if_exists $D/data/test.jsonl || $PY countdown.py problems --distribution priming \
        --n-train $n_train --n-test $N_TEST --seed 777 --out $D/data
    if [ "$DESIGN" = restart ]; then data_args="--problems $D/data/train.jsonl"; source=restart; fi
    for c in $CONDITIONS $source; do
        case $c in *dots) continue ;; esac  # dots are length-matched in the base's tokens: after step 2
        skip_if_exists $D/data/$c.jsonl || \
            $PY traces.py traces --condition $c --n $N_TRACES --seed 2 $data_args --out $D/data/$c.jsonl
    done
    # 2. the shared base: from scratch on behavior-free text; its tokenizer also sees the traces' words
    if [ "$DESIGN" = restart ]; then
        skip_if_exists $D/data/corpus.jsonl || $PY traces.py corpus --design restart --problems $D/data/train.jsonl \
            --offset $N_TRACES --n-solutions $N_SOLUTIONS --n-drill $N_DRILL --seed 1 --out $D/data/corpus.jsonl
    else
        skip_if_exists $D/data/corpus.jsonl || $PY traces.py corpus --design narrated --n-solutions $N_SOLUTIONS \
            --n-drill $N_DRILL --seed 1 --out $D/data/corpus.jsonl
    fi
    [ -e $D/base/final/config.json ] || \
        $PY sft.py --init tiny --data $D/data/corpus.jsonl --tokenizer-data $D/data/$source.jsonl \
            --eval-problems $D/data/test.jsonl --eval-n 200 --eval-max-new-tokens 64 --out $D/base \
            --epochs $BASE_EPOCHS --batch-size 32 --micro-batch-size 32 --val-fraction 0.02 --device $DEVICE \
            --num-threads $BASE_THREADS
    for c in $CONDITIONS; do case $c in *dots)
        skip_if_exists $D/data/$c.jsonl || $PY traces.py traces --condition $c --n $N_TRACES --seed 2 $data_args \
            --tokenizer $D/base/final --out $D/data/$c.jsonl ;;
    esac; done
    # gate: the base's arithmetic on held-out facts of the drill (seed 4242, never trained on)
    [ "$DESIGN" = restart ] && { skip_if_exists $D/gates/base_arithmetic.json || \
        $PY sft.py eval --model $D/base/final --arithmetic 1000 --seed 4242 --device $DEVICE \
            --num-threads $BASE_THREADS > $D/gates/base_arithmetic.json; }
    # 3. priming SFT per condition and seed: N_TRACES traces x PRIME_EPOCHS at batch 32, the same number
    #    of optimizer steps for every condition (the paper: 1,000 x 5 epochs at batch 64 = 75 steps; a
    #    model from scratch knows none of the traces' words and needs more: README, "variants tried")
    for s in $SEEDS; do for c in $CONDITIONS; do prime ${c}_s$s $D/base/final $D/data/$c.jsonl $s; done; done
    finish
    # 4. PPO from every primed model: same settings, same validation problems, sampled at T = 1; the
    #    response cap is checked against the p99 length of every condition's traces before it starts
    #    (the narrated design keeps the first study's cap of 192, which cut its longer traces: README)
    local caps=""
    [ "$DESIGN" = restart ] && for c in $CONDITIONS; do caps="--cap-traces ${caps#--cap-traces }${caps:+,}$D/data/$c.jsonl"; done
    for s in $SEEDS; do for c in $CONDITIONS; do rl ${c}_s$s $D/sft/${c}_s$s/final $s $caps; done; done
    finish
    # 5. each final policy re-evaluated greedily on fresh problems (seed 4343: never used for tuning)
    mkdir -p $D/greedy
    for s in $SEEDS; do for c in $CONDITIONS; do
        local g=$D/greedy/${c}_s$s.json
        [ -s $g ] || background greedy_${c}_s$s sh -c "$PY sft.py eval --model $D/ppo/${c}_s$s/checkpoints/step_$PPO_STEPS/policy \
            --n $N_TEST --seed 4343 --per-count \
            --exclude-data $D/data/train.jsonl,$D/data/test.jsonl --max-new-tokens $MAX_RESPONSE \
            --device $DEVICE --num-threads $(threads_of ${c}_s$s) > $g.tmp && mv $g.tmp $g"
    done; done
    finish
    # 6. the report: results.json, results.md (gates, T = 1 and greedy tables), figures
    [ -n "${REPORT-1}" ] || return 0       # REPORT= (empty): another stage reports these runs
    local runs=""
    for s in $SEEDS; do for c in $CONDITIONS; do runs="$runs $D/ppo/${c}_s$s"; done; done
    $PY classify.py report $runs --out $D --gates $D/gates --greedy $D/greedy
    echo "[run_all] done: $D/results.md, $D/results.json and figures in $D/"
}

# prime NAME MODEL DATA SEED [FLAGS...]: the study's priming SFT into $D/sft/NAME, in the background
prime() {
    local name=$1 model=$2 data=$3 seed=$4; shift 4
    [ -e $D/sft/$name/final/config.json ] || background sft_$name \
        $PY sft.py --model $model --data $data --eval-problems $D/data/test.jsonl --eval-n 0 --out $D/sft/$name \
            --epochs ${PRIME_EPOCHS:-2} --batch-size 32 --micro-batch-size 32 --lr 2e-3 --val-fraction 0 --seed $seed \
            --device $DEVICE --num-threads $(threads_of $name) "$@"
}

# rl NAME MODEL SEED [FLAGS...]: the study's PPO into $D/ppo/NAME, in the background
rl() {
    local name=$1 model=$2 seed=$3; shift 3
    background ppo_$name $PY ppo.py --model $model --out $D/ppo/$name --seed $seed \
        --train-data $D/data/train.jsonl --test-data $D/data/test.jsonl --steps $PPO_STEPS \
        --device $DEVICE --threads $(threads_of $name) --no-progress $PPO "$@"
}

# PPO for tiny models: far larger learning rates than the paper's 1e-6 / 1e-5 (a 1M-parameter model
# from scratch), 32 prompts x 4 samples (a search trace costs ~130 tokens; at 64 x 4 one step of a
# primed model took ~30 s on one core), T = 1 validation every 10 steps, the paper's other settings.
TINY_PPO="--batch-prompts 32 --samples 4 --mini-batch-prompts 16 --micro-batch 64 --max-response 192 \
    --actor-lr 2e-4 --critic-lr 1e-3 --no-grad-checkpointing --val-temperature 1.0 --val-every 10"
# The restart design's PPO: a response cap above the p99 length of every condition's traces (checked
# by --cap-traces before PPO starts), and half the actor lr with ten times the KL of TINY_PPO: on the
# dev set the latter kept the stated arithmetic that TINY_PPO's settings let drift (README).
MAX_RESPONSE=256
RESTART_PPO="--batch-prompts 32 --samples 4 --mini-batch-prompts 16 --micro-batch 64 --max-response $MAX_RESPONSE \
    --actor-lr 1e-4 --critic-lr 1e-3 --kl-coef 0.01 --no-grad-checkpointing --val-temperature 1.0 --val-every 10"
BASE_THREADS=$([ "$DEVICE" = cpu ] && echo 2 || echo 0)  # the base trains alone: both cores

case "$MODE" in
tiny)
    # a base of 3 epochs: with 2, the primed model's checks and numbers were too loose for search to pay
    # (step-0 lead 1.5 points, behind the control after PPO: README, "variants tried")
    D=runs/tiny DESIGN=restart CONDITIONS="restart restart_empty_cot" SEEDS="1" N_TEST=400 BASE_EPOCHS=3
    N_TRACES=4000 N_SOLUTIONS=20000 N_DRILL=12000 PRIME_EPOCHS=2 PPO_STEPS=10 PPO=$RESTART_PPO
    # restart's priming, PPO and greedy run on 2 threads (1.57x for its SFT, ~1.2x for decoding, measured)
    # while the control's short chain takes the other core: 32.7 min with one thread each, over the 30
    LEAD=restart LEAD_THREADS=$((THREADS * 2))
    study
    ;;
mini)
    # tiny's base, traces and PPO with all five conditions and two seeds; 10 PPO steps as tiny (with 20
    # it took 101 minutes on 2 cores, over the 90 asked: a search-primed PPO step costs ~30 s on one core)
    D=runs/mini DESIGN=restart SEEDS="1 2" N_TEST=400 BASE_EPOCHS=3 N_TRACES=4000 N_SOLUTIONS=20000 N_DRILL=12000
    CONDITIONS="restart restart_only_backtracking restart_no_positive restart_empty_cot restart_dots"
    PRIME_EPOCHS=2 PPO_STEPS=10 PPO=$RESTART_PPO
    study
    ;;
satori)
    # Satori beside the behavior study (README, "Satori"): mini's base, problems, budgets and PPO, and
    # mini's best behavior-primed condition (only_backtracking) as the comparison; all reused when
    # `mini` has run. Then COAT format tuning (the all_strategies searches written with meta-action
    # tokens, the tokens added to the base), PPO from it without and with Restart-and-Explore plus
    # the reflection bonus, and one round of iterative self-improvement: each RAE policy's right
    # answers during RL distilled into its format-tuned model by SFT, then the same RL again.
    D=runs/satori DESIGN=narrated CONDITIONS="only_backtracking" SEEDS="1 2" N_TEST=400 BASE_EPOCHS=1
    N_TRACES=4000 N_SOLUTIONS=20000 N_DRILL=30000 PPO_STEPS=100 PPO=$TINY_PPO REPORT= BASE_THREADS=$THREADS
    MAX_RESPONSE=192
    study
    SATORI="--rae --reflection-bonus 0.5"
    skip_if_exists $D/data/coat.jsonl || \
        $PY traces.py traces --condition coat --n $N_TRACES --seed 2 --out $D/data/coat.jsonl
    for s in $SEEDS; do prime coat_s$s $D/base/final $D/data/coat.jsonl $s --add-tokens coat; done
    finish
    for s in $SEEDS; do
        rl coat_s$s $D/sft/coat_s$s/final $s
        rl coat_rae_s$s $D/sft/coat_s$s/final $s $SATORI --save-correct
    done
    finish
    for s in $SEEDS; do prime coat_round2_s$s $D/sft/coat_s$s/final $D/ppo/coat_rae_s$s/correct.jsonl $s; done
    finish
    for s in $SEEDS; do rl coat_round2_s$s $D/sft/coat_round2_s$s/final $s $SATORI; done
    finish
    mkdir -p $D/satori
    $PY classify.py report $D/ppo/only_backtracking_s* $D/ppo/coat_s* $D/ppo/coat_rae_s* $D/ppo/coat_round2_s* \
        --out $D/satori
    echo "[run_all] done: $D/satori/results.md, results.json and figures"
    ;;
paper)
    CONDITIONS="all_strategies only_backtracking backtracking_verification backtracking_subgoal backtracking_backward"
    CONTROLS="no_positive empty_cot dots"
    PRIMING=${PRIMING:-synthetic}
    JUDGE=${JUDGE:-openai}
    # The behavior counts compare base and primed models, which word the same behavior
    # differently: that needs an LLM judge. Check for its key now, not after days of training.
    if [ "$JUDGE" = rules ]; then
        echo "[run_all] WARNING: JUDGE=rules counts behaviors with regexes. They are exact only on" \
             "countdown.py's synthetic wording and miss many phrasings real models use (README," \
             "classify.py: per-behavior precision/recall on hand-labelled text), and base and primed" \
             "models word behaviors differently, so comparisons across models are biased. Use" \
             "JUDGE=openai (the paper's gpt-4o-mini) or a local server via JUDGE_ARGS." >&2
    elif [ -z "${JUDGE_ARGS:-}" ]; then
        KEY_VAR=$([ "$JUDGE" = anthropic ] && echo ANTHROPIC_API_KEY || echo OPENAI_API_KEY)
        if [ -z "${!KEY_VAR:-}" ]; then
            echo "[run_all] error: JUDGE=$JUDGE needs \$$KEY_VAR, or JUDGE_ARGS=\"--base-url" \
                 "http://host:port --model NAME\" for a local OpenAI-compatible server, or" \
                 "JUDGE=rules (offline; biased across models, see README)" >&2
            exit 2
        fi
    fi
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
                $PY traces.py traces --condition $c --n 1200 --seed 0 --out $DATA/$c.jsonl
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
    echo "usage: bash run_all.sh tiny|mini|satori|paper   (see the comments at the top of this file)" >&2
    exit 2
    ;;
esac
