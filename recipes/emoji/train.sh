#!/usr/bin/env bash
# Reproduce ldmkit's built-in "emoji" model from scratch, on CPU, with ldmkit's own commands.
#
#   bash recipes/emoji/train.sh            # run (or continue: every stage resumes where it stopped)
#   VAE_STEPS=1500 UNET_STEPS=4000 bash recipes/emoji/train.sh
#
# Stages: build the dataset (holdout left out of training), train the autoencoder, train the
# U-Net with its text encoder jointly from scratch, export to src/ldmkit/assets/emoji.safetensors
# (fp16), evaluate into docs/models/emoji.md. Settings: recipes/emoji/emoji.toml.
# Expected time on 2 CPU cores: ~30 min for the VAE (1500 steps), ~2.5 h for the U-Net (4000 steps
# of 32); each stage checkpoints every 250 steps, so it can be stopped and rerun across sessions.
set -euo pipefail
cd "$(dirname "$0")/../.."
LDMKIT=${LDMKIT:-.venv/bin/ldmkit}
PY=${PY:-.venv/bin/python}
VAE_STEPS=${VAE_STEPS:-1500}
UNET_STEPS=${UNET_STEPS:-4000}
# one thread: on a 2-core machine with anything else running, two threads contend and run ~10x slower
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CFG=recipes/emoji/emoji.toml

[ -f data/emoji/metadata.jsonl ] || "$LDMKIT" data emoji --out data/emoji --size 64

if [ -f runs/emoji-vae/checkpoint.pt ]; then
    "$LDMKIT" train vae --resume runs/emoji-vae --total-steps "$VAE_STEPS"
else
    "$LDMKIT" train vae --config "$CFG" --out runs/emoji-vae --batch-size 16 --total-steps "$VAE_STEPS" \
        --lr 2e-4 --warmup-steps 50 --sample-every 250
fi

if [ -f runs/emoji-ldm/checkpoint.pt ]; then
    "$LDMKIT" train unet --resume runs/emoji-ldm --total-steps "$UNET_STEPS" ${UNET_STOP_AFTER:+--stop-after "$UNET_STOP_AFTER"}
else
    "$LDMKIT" train unet --config "$CFG" --vae runs/emoji-vae --out runs/emoji-ldm --batch-size 32 \
        --total-steps "$UNET_STEPS" --lr 3e-4 --warmup-steps 100 --ema-decay 0.999 --caption-dropout 0.1 \
        --sample-every 500 ${UNET_STOP_AFTER:+--stop-after "$UNET_STOP_AFTER"}
fi

"$LDMKIT" export runs/emoji-ldm src/ldmkit/assets/emoji.safetensors --half
"$PY" bench/eval_emoji.py --model emoji --data data/emoji
