"""``ldmkit serve``: the web page and A1111-compatible API under uvicorn."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

EXAMPLES = """examples:
  ldmkit serve --model v1-5-pruned-emaonly.safetensors          # http://127.0.0.1:7860
  ldmkit serve --models-dir ~/models --model sd15.safetensors   # switch models from the page or the API
  ldmkit serve --host 0.0.0.0 --api-auth alice:s3cret           # reachable from the network: use auth
  ldmkit serve --allowed-hosts studio.lan                       # also answer to that name (others: HTTP 400)
  ldmkit serve --styles-file styles.csv                         # A1111 prompt styles (requests' "styles")
  ldmkit serve --preview-vae taesd/ --vae-dir vaes/            # tiny live previews; sd_vae picks a VAE from vaes/
  curl -s 127.0.0.1:7860/sdapi/v1/txt2img -H 'Content-Type: application/json' \\
      -d '{"prompt": "a red apple", "steps": 20, "seed": 42}' | jq -r '.images[0]' | base64 -d > apple.png
  (A1111 clients such as the webuiapi package work unchanged; the API schema is at /docs)"""


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("serve", "web page and AUTOMATIC1111-compatible HTTP API", EXAMPLES)
    p.add_argument("--model", default=None, help="checkpoint file, diffusers folder, or built-in name")
    p.add_argument("--models-dir", default=None, help="folder of models to switch between (/sdapi/v1/sd-models)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-auth", default=None, metavar="USER:PASSWORD", help="require HTTP basic auth")
    p.add_argument("--allowed-hosts", default=None, metavar="NAME[,NAME...]",
                   help="Host names clients may use besides the --host address and localhost (a guard against "
                        "DNS rebinding: other names get HTTP 400); '*' turns the check off")
    p.add_argument("--styles-file", default=None, metavar="CSV",
                   help="A1111 styles.csv (name,prompt,negative_prompt): /sdapi/v1/prompt-styles and requests' "
                        "`styles`")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait; more get HTTP 503")
    p.add_argument("--max-pixels", type=int, default=2048 * 2048, help="width x height x batch_size per request")
    p.add_argument("--max-side", type=int, default=2048, help="largest width or height")
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--max-upload-mb", type=float, default=32, help="largest uploaded image (decoded)")
    p.add_argument("--preview-interval", type=float, default=1.0,
                   help="seconds between live previews (0: every step, negative: none)")
    p.add_argument("--preview-vae", default=None, metavar="PATH",
                   help="tiny autoencoder (TAESD file, AutoencoderTiny folder or built-in name) for live "
                        "previews (show_progress_type TAESD, and Approx NN, the default); without one: Approx "
                        "cheap, A1111's linear latent->RGB map (built-in models use their shipped one)")
    p.add_argument("--vae-dir", default=None, metavar="DIR",
                   help="VAE files/folders (KL or tiny) listed at /sdapi/v1/sd-vae; the option sd_vae picks one")
    p.add_argument("--upscaler-dir", default=None, metavar="DIR",
                   help="upscaler files (ESRGAN, Real-ESRGAN, 4x-UltraSharp, ... .pth/.safetensors) for "
                        "/sdapi/v1/upscalers and the extras routes; names are the file stems")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="LoRA/LyCORIS files a prompt applies with <lora:NAME:WEIGHT> (/sdapi/v1/loras)")
    p.add_argument("--embeddings-dir", default=None, metavar="DIR",
                   help="textual-inversion embeddings; a file's name is a word of the prompt (/sdapi/v1/embeddings)")
    p.add_argument("--controlnet-dir", default=None, metavar="DIR",
                   help="ControlNet files/folders for the A1111 ControlNet extension's API (/controlnet/model_list, "
                        "alwayson_scripts controlnet units); named 'stem [hash]' as the extension names them")
    p.add_argument("--output-dir", default=None, help="where requests with save_images write their PNGs")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--low-memory", action="store_true",
                   help="CPU: weights kept in fp16 and computed in fp32 one layer at a time, idle networks paged "
                        "out: under half the memory, ~8%% slower per step (off by default: the faster mode)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode in tiles: the same images, far less memory for large ones")
    p.set_defaults(func=serve)


def build_app(args: argparse.Namespace) -> FastAPI:
    """The app ``ldmkit serve`` runs for these arguments."""
    from ldmkit.server.app import Limits, allowed_host_names, create_app

    limits = Limits(max_side=args.max_side, max_pixels=args.max_pixels, max_steps=args.max_steps,
                    max_upload_bytes=int(args.max_upload_mb * (1 << 20)))
    extra_hosts = [h for h in (args.allowed_hosts or "").split(",") if h.strip()]
    flags = {"listen": args.host not in ("127.0.0.1", "localhost", "::1"), "server_name": args.host,
             "port": args.port}
    return create_app(args.model, models_dir=args.models_dir, api_auth=args.api_auth, queue_size=args.queue_size,
                      limits=limits, device=args.device,
                      preview_interval=args.preview_interval if args.preview_interval >= 0 else None,
                      output_dir=args.output_dir, preview_vae=args.preview_vae, vae_dir=args.vae_dir,
                      upscaler_dir=args.upscaler_dir, lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir,
                      controlnet_dir=args.controlnet_dir,
                      low_memory=args.low_memory, vae_tiling=args.vae_tiling,
                      allowed_hosts=allowed_host_names(args.host, extra_hosts), styles_file=args.styles_file,
                      cmd_flags=flags)


def serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        import ldmkit.server.app  # noqa: F401 - its dependencies, checked before the model loads
    except ImportError as e:
        raise ValueError(f"the server needs its extra dependencies ({e.name} is missing): "
                         "pip install 'ldmkit[server]'") from None
    print(f"loading {args.model or 'the default model'} ...", file=sys.stderr)
    app = build_app(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_auth:
        print(f"warning: listening on {args.host} without --api-auth: anyone who can reach it can use it",
              file=sys.stderr)
    print(f"ldmkit: http://{args.host}:{args.port}/  (API docs at /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
