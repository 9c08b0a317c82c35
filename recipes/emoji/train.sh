#!/usr/bin/env bash
# Reproduce ldmkit's built-in "emoji" model from scratch, on CPU, with ldmkit's own commands.
#
#   bash recipes/emoji/train.sh            # run (or continue: every stage resumes where it stopped)
#   VAE_STEPS=1500 UNET_STEPS=8000 DECODER_STEPS=4000 DECODER2_STEPS=4000 bash recipes/emoji/train.sh
#
# Stages: build the dataset (holdout left out of training); train the autoencoder; then, side by side
# (one core each), train the U-Net with its text encoder jointly from scratch on the autoencoder's
# latents (each caption phrased at random as "red apple", "a red apple", "red apple emoji", "a red
# apple emoji" or "an emoji of a red apple": caption_templates in emoji.toml), and fine-tune the
# autoencoder's decoder alone in two legs (the encoder stays frozen, so the U-Net's latents stay
# valid); export to src/ldmkit/assets/emoji.safetensors (fp16) with the fine-tuned decoder; evaluate
# into docs/models/emoji.md. Settings: recipes/emoji/emoji.toml.
# Expected time on 2 CPU cores: ~35 min for the VAE (1500 steps of 16), then ~1 h 55 min for the
# U-Net (8000 steps of 32, ~0.85 s/step on one core) with the two decoder legs (4000 steps of 16
# each, ~1 h 10 min each beside the U-Net, ~45 min alone) on the other core, ~5 min for the
# evaluation: ~3 h in all. Every stage checkpoints every 250 steps, so it can be stopped and rerun
# across sessions.
set -euo pipefail
cd "$(dirname "$0")/../.."
LDMKIT=${LDMKIT:-.venv/bin/ldmkit}
PY=${PY:-.venv/bin/python}
VAE_STEPS=${VAE_STEPS:-1500}
UNET_STEPS=${UNET_STEPS:-8000}
DECODER_STEPS=${DECODER_STEPS:-4000}
DECODER2_STEPS=${DECODER2_STEPS:-4000}
# one thread per job: on a 2-core machine two threads per job contend and run ~10x slower
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CFG=recipes/emoji/emoji.toml

[ -f data/emoji/metadata.jsonl ] || "$LDMKIT" data emoji --out data/emoji --size 64

if [ -f runs/emoji-vae/checkpoint.pt ]; then
    "$LDMKIT" train vae --resume runs/emoji-vae --total-steps "$VAE_STEPS"
else
    "$LDMKIT" train vae --config "$CFG" --out runs/emoji-vae --batch-size 16 --total-steps "$VAE_STEPS" \
        --lr 2e-4 --warmup-steps 50 --sample-every 250
fi

unet() {
    if [ -f runs/emoji-ldm/checkpoint.pt ]; then
        "$LDMKIT" train unet --resume runs/emoji-ldm --total-steps "$UNET_STEPS"
    else
        # vocab = data: embedding rows only for the captions' ~1,900 tokens (CLIP's full 49,408 would be
        # 2/3 of the file and of every optimizer step)
        "$LDMKIT" train unet --config "$CFG" --vae runs/emoji-vae --out runs/emoji-ldm --vocab data \
            --batch-size 32 --total-steps "$UNET_STEPS" --lr 3e-4 --warmup-steps 100 --ema-decay 0.999 \
            --caption-dropout 0.1 --sample-every 1000
    fi
}
decoder_leg() {  # INIT OUT STEPS
    if [ -f "$2/checkpoint.pt" ]; then
        "$LDMKIT" train vae --resume "$2" --total-steps "$3"
    else
        # SD's ft-MSE recipe in small: decoder only, MSE plus a lighter structure term
        "$LDMKIT" train vae --init-from "$1" --freeze-encoder --data data/emoji --size 64 --no-flip \
            --out "$2" --batch-size 16 --total-steps "$3" --lr 1e-4 \
            --warmup-steps 50 --rec-loss l2 --perceptual-weight 0.1 --ema-decay 0.999 --sample-every 250
    fi
}
decoder() {
    # two legs of one cosine schedule each, as the shipped decoder was trained (the second restarts the
    # learning rate: +0.1 dB per 250 steps where the first had flattened)
    decoder_leg runs/emoji-vae runs/emoji-vae-decoder "$DECODER_STEPS"
    decoder_leg runs/emoji-vae-decoder runs/emoji-vae-decoder2 "$DECODER2_STEPS"
}
unet & U=$!
decoder & D=$!
wait "$U"
wait "$D"

"$LDMKIT" export runs/emoji-ldm src/ldmkit/assets/emoji.safetensors --half --vae runs/emoji-vae-decoder2
"$PY" bench/eval_emoji.py --model emoji --data data/emoji

# The few-step "emoji-lcm" (issue 12): latent consistency distillation of the model above, guidance w = 4
# (CFG 5, the teacher's best) baked in, sampled with LCM / 4 steps / CFG 1 (recorded in the file).
# ~1 h on one core of a busy 2-core machine (1300 steps of 32, ~2.7 s/step). See docs/models/emoji.md.
LCM_STEPS=${LCM_STEPS:-1300}
if [ -f runs/emoji-lcm/checkpoint.pt ]; then
    "$LDMKIT" train lcm --resume runs/emoji-lcm --total-steps "$LCM_STEPS"
else
    "$LDMKIT" train lcm --model emoji --data data/emoji --out runs/emoji-lcm --size 64 --batch-size 32 \
        --total-steps "$LCM_STEPS" --warmup-steps 50 --lr 3e-5 --ema-decay 0.995 --w-min 4 --w-max 4 \
        --target-decay 0.95 --checkpoint-every 100 --log-every 10 --sample-every 0 \
        --caption-templates "{caption}" "{a} {caption}" "{caption} emoji" "{a} {caption} emoji" "an emoji of {a} {caption}"
fi
"$LDMKIT" export runs/emoji-lcm src/ldmkit/assets/emoji-lcm.safetensors --half
"$PY" bench/eval_emoji.py --model emoji-lcm --data data/emoji --sampler LCM --steps 4 --cfg-scale 1 --cfg-sweep 1 \
    --marker eval-lcm --outputs runs/emoji-lcm-eval
