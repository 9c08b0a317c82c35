#!/usr/bin/env bash
# Reproduce the second-generation built-in "emoji" model (issue 17) from scratch with ldmkit's own
# commands: data, autoencoder, U-Net + text encoder, decoder fine-tune, export, evaluation (old
# metrics + the category-balanced one), LCM distillation (emoji-lcm) and the tiny decoder (emoji-taesd).
#
#   bash recipes/emoji2/train.sh                 # 64x64, f=4 autoencoder (recipes/emoji2/emoji2.toml)
#   SIZE=128 bash recipes/emoji2/train.sh        # native 128x128, f=8 autoencoder (emoji2-128.toml)
#   DEVICE=cuda bash recipes/emoji2/train.sh     # on a GPU (the stages one after another; same steps)
#
# Every stage checkpoints every CKPT=50 steps (minutes apart on a busy core) and resumes exactly
# where it stopped: rerun the same command. VAE_RUN=DIR uses an autoencoder run trained elsewhere
# (e.g. the comparison runs in runs/emoji2-ae/) instead of training $R-vae.
# Estimated time on one idle CPU core per job (docs/models/emoji2-plan.md: step costs measured by
# bench/emoji2_cost.py as ratios to the shipped model's 0.85 s (U-Net) and 1.36 s (VAE) per step):
#   64 px:  VAE 3000 x 1.2 s = 1 h; U-Net 8000 x 1.8 s = 4 h, beside the decoder (4000 steps, ~1.3 h);
#           LCM ~2 h; TAESD ~0.5 h; evaluation ~0.5 h: ~8 h on 2 cores.
#   128 px: VAE 3000 x 5.9 s = 5 h; U-Net as at 64 (the same 16x16 latents) 4 h beside the decoder
#           (~5.5 h); LCM ~2.5 h; TAESD ~1 h: ~14 h. A GPU run has not been measured yet.
# Outputs go to runs/emoji2-*; the shipped files are written only by the export lines at the end
# (EXPORT=1), so an experiment never overwrites src/ldmkit/assets/emoji*.safetensors by accident.
set -euo pipefail
cd "$(dirname "$0")/../.."
LDMKIT=${LDMKIT:-.venv/bin/ldmkit}
PY=${PY:-.venv/bin/python}
SIZE=${SIZE:-64}
DEVICE=${DEVICE:-auto}
VAE_STEPS=${VAE_STEPS:-3000}
UNET_STEPS=${UNET_STEPS:-8000}
DECODER_STEPS=${DECODER_STEPS:-4000}
LCM_STEPS=${LCM_STEPS:-1300}
TAESD_STEPS=${TAESD_STEPS:-3000}
EXPORT=${EXPORT:-0}
CKPT=${CKPT:-50}  # steps between checkpoints: ~5 min apart for a U-Net step of ~6 s on a busy core
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$SIZE" = 128 ]; then CFG=recipes/emoji2/emoji2-128.toml; DATA=data/emoji2-128; R=runs/emoji2-128
else CFG=recipes/emoji2/emoji2.toml; DATA=data/emoji2; R=runs/emoji2; fi
VAE_RUN=${VAE_RUN:-$R-vae}

# Data: Noto Color Emoji at SIZE, with Unicode groups, alias captions and class-balanced weights.
# The U-Net and LCM stages train on them: --balanced draws each epoch by metadata.jsonl's "weight"
# (every Unicode group the same share; held-out images never), --caption-choice random trains one of
# each emoji's "captions" (name, the emoji package's aliases, "name, group") per step. The autoencoder
# stages keep the uniform order (every image once per epoch): they must reconstruct all of them, and
# held-out PSNR was measured that way (emoji2-plan.md).
# (needs: apt-get install fonts-noto-color-emoji unicode-data)
[ -f "$DATA/metadata.jsonl" ] || "$LDMKIT" data emoji --out "$DATA" --size "$SIZE" --augment-captions --balance

if [ -f "$VAE_RUN/checkpoint.pt" ]; then "$LDMKIT" train vae --resume "$VAE_RUN" --total-steps "$VAE_STEPS"
else "$LDMKIT" train vae --config "$CFG" --data "$DATA" --out "$VAE_RUN" --device "$DEVICE" --batch-size 16 \
        --total-steps "$VAE_STEPS" --lr 2e-4 --warmup-steps 50 --sample-every 250 --checkpoint-every "$CKPT"; fi

unet() {
    if [ -f "$R-ldm/checkpoint.pt" ]; then "$LDMKIT" train unet --resume "$R-ldm" --total-steps "$UNET_STEPS"
    else "$LDMKIT" train unet --config "$CFG" --data "$DATA" --vae "$VAE_RUN" --out "$R-ldm" --device "$DEVICE" \
            --vocab data --batch-size 32 --total-steps "$UNET_STEPS" --lr 3e-4 --warmup-steps 100 \
            --ema-decay 0.999 --caption-dropout 0.1 --sample-every 1000 --checkpoint-every "$CKPT" \
            --balanced --caption-choice random; fi
}
decoder() {  # SD's ft-MSE recipe in small: decoder only, encoder frozen so the U-Net's latents stay valid
    if [ -f "$R-vae-decoder/checkpoint.pt" ]; then "$LDMKIT" train vae --resume "$R-vae-decoder" --total-steps "$DECODER_STEPS"
    else "$LDMKIT" train vae --init-from "$VAE_RUN" --freeze-encoder --data "$DATA" --size "$SIZE" --no-flip \
            --out "$R-vae-decoder" --device "$DEVICE" --batch-size 16 --total-steps "$DECODER_STEPS" --lr 1e-4 \
            --warmup-steps 50 --rec-loss l2 --perceptual-weight 0.1 --ema-decay 0.999 --sample-every 250 \
            --checkpoint-every "$CKPT"; fi
}
if [ "$DEVICE" = cuda ]; then unet; decoder; else unet & U=$!; decoder & D=$!; wait "$U"; wait "$D"; fi

MODEL=$R.safetensors
"$LDMKIT" export "$R-ldm" "$MODEL" --half --vae "$R-vae-decoder"
"$PY" bench/eval_emoji.py --model "$MODEL" --data "$DATA" --card "$R-card.md" --outputs "$R-eval"
"$PY" bench/eval_emoji.py --model "$MODEL" --data "$DATA" --balanced 20 --outputs "$R-eval"

# Few-step emoji-lcm: latent consistency distillation, guidance w = 4 baked in, LCM / 4 steps / CFG 1
if [ -f "$R-lcm/checkpoint.pt" ]; then "$LDMKIT" train lcm --resume "$R-lcm" --total-steps "$LCM_STEPS"
else "$LDMKIT" train lcm --model "$MODEL" --data "$DATA" --out "$R-lcm" --size "$SIZE" --device "$DEVICE" \
        --batch-size 32 --total-steps "$LCM_STEPS" --warmup-steps 50 --lr 3e-5 --ema-decay 0.995 --w-min 4 \
        --w-max 4 --target-decay 0.95 --checkpoint-every "$CKPT" --log-every 10 --sample-every 0 \
        --balanced --caption-choice random \
        --caption-templates "{caption}" "{a} {caption}" "{caption} emoji" "{a} {caption} emoji" "an emoji of {a} {caption}"; fi
"$LDMKIT" export "$R-lcm" "$R-lcm.safetensors" --half
"$PY" bench/eval_emoji.py --model "$R-lcm.safetensors" --data "$DATA" --balanced 20 --outputs "$R-eval"

# Tiny decoder (TAESD architecture, width 32, decoder only) distilled from the model's KL decoder
if [ -f "$R-taesd/checkpoint.pt" ]; then "$LDMKIT" train taesd --resume "$R-taesd" --total-steps "$TAESD_STEPS"
else "$LDMKIT" train taesd --model "$MODEL" --data "$DATA" --out "$R-taesd" --size "$SIZE" --device "$DEVICE" \
        --batch-size 16 --total-steps "$TAESD_STEPS" --width 32 --taesd-parts decoder --rec-loss l2 \
        --checkpoint-every "$CKPT"; fi
"$LDMKIT" export "$R-taesd" "$R-taesd.safetensors" --half

if [ "$EXPORT" = 1 ]; then  # ship: replaces the built-in model files (check the card's numbers first)
    cp "$MODEL" src/ldmkit/assets/emoji.safetensors
    cp "$R-lcm.safetensors" src/ldmkit/assets/emoji-lcm.safetensors
    cp "$R-taesd.safetensors" src/ldmkit/assets/emoji-taesd.safetensors
fi
