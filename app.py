"""Launch the resnext-demo web app (also the Hugging Face Space entry point: `python app.py`).

Thin on purpose: parse flags, pick the device, load the checkpoint (or explain how to get one),
build the UI, launch. The only module-level model of the project lives here.
"""
from __future__ import annotations

import argparse
import os

from resnext_demo import data, weights
from resnext_demo.predict import select_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; defaults come from the environment so a Space needs none."""
    ap = argparse.ArgumentParser(description="ResNeXt on CIFAR-10: predict, look inside, explain, fine-tune.")
    ap.add_argument("--weights", default=os.environ.get("RESNEXT_DEMO_WEIGHTS", str(weights.DEFAULT_WEIGHTS)),
                    help="checkpoint (.safetensors); default $RESNEXT_DEMO_WEIGHTS or weights/default.safetensors")
    ap.add_argument("--data", default=data.default_source() or data.sample_source(),
                    help="CIFAR-10 source for the sample images (torchvision root, image folder or .tar.gz, "
                         "hf://datasets/uoft-cs/cifar10); default $RESNEXT_DEMO_DATA, else ../shared/cifar10/cifar10-jpeg.tar.gz "
                         "when present, else the sample pack shipped in resnext_demo/assets/; '' for none")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME"),
                    help="interface to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    ap.add_argument("--port", type=int, default=int(os.environ["GRADIO_SERVER_PORT"])
                    if os.environ.get("GRADIO_SERVER_PORT") else None, help="port (default 7860 or the next free one)")
    ap.add_argument("--share", action="store_true", help="create a public gradio.live link")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # imports gradio (and `spaces`, before any CUDA use): after argparse so --help is instant
    from resnext_demo.ui import CSS, MAX_FILE_SIZE, THEME, build_demo, on_zero_gpu

    # ZeroGPU: this process has no GPU (`spaces` only emulates one); each booked call moves the model to its GPU.
    device = args.device or ("cpu" if on_zero_gpu() else select_device())
    model = meta = error = None
    try:
        model, meta = weights.load_checkpoint(args.weights, device)
    except weights.CheckpointError as e:  # missing or invalid: the app still starts and says what to do
        error = str(e)
        print(f"warning: {error} The app starts without a model.", flush=True)
    print(f"CIFAR-10 images: {args.data or 'none (set RESNEXT_DEMO_DATA or pass --data)'}", flush=True)
    demo = build_demo(model, meta, args.data or None, weights_path=args.weights, load_error=error)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share or None, show_error=True,
                max_file_size=MAX_FILE_SIZE, css=CSS, theme=THEME)


if __name__ == "__main__":
    main()
