"""What the demo's champion draws, from a checkout where `make demo` ran: prints one JSON line.

FIDs of the champion, of the base model it was fine-tuned from and of the real-vs-real floor
(the domain extractor, from outputs/eval/evaluation.json), and the independent pixel-space
check: the champion's Fréchet distance to the real test images over that of uniform noise.
Run by benchmarks/bench_demo.py inside its fresh clone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from fairdiffusion.data.fairgenmed import load_fairgenmed
from fairdiffusion.data.images import load_real_images
from fairdiffusion.evaluation.evaluate import _png_name
from fairdiffusion.evaluation.reference import noise_ratio


def main() -> None:
    report = json.loads(Path("outputs/eval/evaluation.json").read_text())
    metrics, x = report["metrics"], report["extractor"]
    rows = load_fairgenmed(Path("data"), ["test"]).reset_index(drop=True)
    resolution = int(report["protocol"]["generation_resolution"])
    real = load_real_images(list(rows["image_path"]), resolution)
    folder = Path(report["image_dir"])
    generated = np.stack([np.asarray(Image.open(folder / _png_name(str(s))).convert("RGB")) for s in rows["subject"]])
    print(
        json.dumps(
            {
                f"champion FID ({x})": metrics[f"fid_{x}/overall"],
                "champion FID interval high": metrics[f"ci_high/fid_{x}/overall"],
                "base model FID": metrics[f"ref_base_fid_{x}/overall"],
                "real-vs-real floor FID (halves)": metrics[f"floor_fid_{x}/overall"],
                "champion FID at the halves / floor": metrics[f"fid_over_floor_{x}/overall"],
                "pixel-space distance, champion / noise": noise_ratio(real, generated),
            }
        )
    )


if __name__ == "__main__":
    main()
