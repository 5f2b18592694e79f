"""One image through the test pipeline, step by step: where ``Segmenter`` (``edgeseg predict``) and evaluation spend
their time at ADE20K's 150 classes.

Rows, timed alternately in the same run (medians; ratios are same-round medians):

- ``model`` — the forward pass alone, eager and fused (what ``Segmenter`` runs by default);
- ``upsample`` — the logits resized to the image (mmseg: to the network input, then to the original size);
- ``softmax dim=1`` vs ``channel_softmax`` — the per-view probabilities evaluation needs, over the class axis of
  the channels-last logits a fused model returns: PyTorch's strided path vs along memory
  (``edgeseg.engine.inference.channel_softmax``, what evaluation runs);
- ``argmax`` — the labels; ``resize + argmax, one pass`` — both in the native kernel ``Segmenter`` runs
  (``edgeseg.engine.inference.whole_labels``: the upsampled logits are never written);
- ``Segmenter(…)`` — the whole call, fused (the default) and eager (``fuse=False``); ``labels via probabilities``
  is the call as it was before it took the argmax of the logits (full-resolution probabilities first, now by
  ``channel_softmax``; before that by the ``softmax dim=1`` row).

    PYTHONPATH=src .venv/bin/python benchmarks/predict_pipeline.py [--model segformer-b0] [--image 512 683]
        [--threads 2] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from edgeseg import Segmenter, create_model
from edgeseg.deploy.benchmark import compare_latency
from edgeseg.engine.inference import channel_softmax, whole_inference, whole_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="segformer-b0")
    parser.add_argument("--image", nargs=2, type=int, default=[512, 683], metavar=("H", "W"),
                        help="image size (default: a 4:3 ADE20K-sized image, short side 512)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = create_model(args.model).eval()
    fused, eager = Segmenter(model), Segmenter(model, fuse=False)
    rgb = (np.random.default_rng(0).random((*args.image, 3)) * 255).astype(np.uint8)
    img = fused.transform(rgb)[0][None]
    size = rgb.shape[:2]
    with torch.inference_mode():
        native = fused.model(img)
        logits = whole_inference(fused.model, img, size)

    fns = {
        "model, eager": lambda: eager.model(img),
        "model, fused": lambda: fused.model(img),
        "upsample (fused model's logits)": lambda: whole_inference(lambda _: native, img, size),
        "softmax dim=1": lambda: logits.softmax(dim=1),
        "channel_softmax": lambda: channel_softmax(logits),
        "argmax": lambda: logits.argmax(dim=1),
        "resize + argmax, one pass": lambda: whole_labels(lambda _: native, img, size),
        "Segmenter(image), fused": lambda: fused(rgb),
        "Segmenter(image), eager": lambda: eager(rgb),
        "labels via probabilities, fused": lambda: fused.probabilities(rgb).argmax(0),
    }
    times = compare_latency(fns, rounds=args.rounds)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(f"{args.model}, {size[0]}×{size[1]} image ({img.shape[-2]}×{img.shape[-1]} network input), "
          f"{model.num_classes} classes, {torch.get_num_threads()} threads, {args.rounds} alternating rounds")
    print("| step | median ms |")
    print("|---|---|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.1f} |")
    print()
    print(f"channel_softmax / softmax dim=1: {ratio('channel_softmax', 'softmax dim=1'):.2f}")
    one_pass = statistics.median(o / (u + a) for o, u, a in zip(
        times["resize + argmax, one pass"], times["upsample (fused model's logits)"], times["argmax"]))
    print(f"resize + argmax, one pass / upsample + argmax: {one_pass:.2f}")
    print(f"Segmenter fused / eager: {ratio('Segmenter(image), fused', 'Segmenter(image), eager'):.2f}")
    print(f"Segmenter (argmax of logits) / labels via probabilities: "
          f"{ratio('Segmenter(image), fused', 'labels via probabilities, fused'):.2f}")


if __name__ == "__main__":
    main()
