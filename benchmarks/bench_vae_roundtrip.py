"""Does the base bundle's autoencoder keep what the groups differ in? (issue 26, the VAE probe)

No UNet can draw what the VAE cannot decode. This round-trips the real test images of a
dataset through a bundle's VAE (encode, decode the latent mean) and measures them with the
evaluation's own prompt-fidelity metric: a classifier trained on the real training images
recognises each attribute in the real test images and in their reconstructions. Per
group, the fidelity is then reconstruction rate / real rate; the bar is 0.95 for every
race group. It also prints the pixel RMSE of the round trip (0-255 scale) and writes a
strip of originals above their reconstructions, to look at the vessels and the texture.

Usage: python benchmarks/bench_vae_roundtrip.py [--config configs/demo.yaml] [--bundle base-model]
       [--out outputs/bench/vae_roundtrip]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from fairdiffusion.config import load_config
from fairdiffusion.data.formats import load_dataset
from fairdiffusion.data.images import load_real_images
from fairdiffusion.evaluation.evaluate import slice_settings
from fairdiffusion.evaluation.fidelity import measure_fidelity

BAR = 0.95


@torch.no_grad()
def round_trip(vae: AutoencoderKL, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """uint8 N x H x W x 3 -> the decoded latent means, uint8 of the same shape."""
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start : start + batch]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        decoded = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        out.append(decoded.add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def _strip(real: np.ndarray, rebuilt: np.ndarray, path: Path, count: int = 12) -> None:
    top, bottom = np.concatenate(list(real[:count]), 1), np.concatenate(list(rebuilt[:count]), 1)
    image = Image.fromarray(np.concatenate([top, bottom], 0))
    image.resize((image.width * 3, image.height * 3), Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--bundle", default=None, help="a diffusers folder with vae/ (default: the config's model)")
    parser.add_argument("--out", default="outputs/bench/vae_roundtrip")
    args = parser.parse_args()
    config = load_config(args.config)
    bundle = Path(args.bundle or str(config.model.pretrained))
    resolution = config.training.resolution
    samples = load_dataset(config.data).samples
    train = samples[samples["split"].isin(config.data.train_splits)].reset_index(drop=True)
    test = samples[samples["split"] == config.data.test_split].reset_index(drop=True)
    real_train = load_real_images(list(train["image_path"]), resolution)
    real = load_real_images(list(test["image_path"]), resolution)
    vae = AutoencoderKL.from_pretrained(bundle / "vae").eval()
    started = time.perf_counter()
    rebuilt = round_trip(vae, real)
    seconds = time.perf_counter() - started
    rmse = float(np.sqrt(((rebuilt.astype(np.float64) - real.astype(np.float64)) ** 2).mean()))
    fidelity = measure_fidelity(
        (real_train, train), real, rebuilt, test, config.data.attributes, config.evaluation.fidelity,
        slice_settings(config.evaluation),
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _strip(real, rebuilt, out / "strip.png")
    print(f"bundle {bundle}: round trip of {len(real)} test images at {resolution} px in {seconds:.1f} s")
    print(f"pixel RMSE {rmse:.2f} of 255; originals above reconstructions: {out / 'strip.png'}")
    print("| attribute | group | n | real rate | round-trip rate | kept (bar 0.95 for race) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, item in fidelity.attributes.items():
        if not item.computable or not item.visible:
            print(f"| {name} | – | – | – | – | {item.reason} |")
            continue
        for g in item.groups:
            rates = f"{g.real_rate:.2f} | {g.generated_rate:.2f} | {g.fidelity:.2f}"
            print(f"| {name} | {g.group} | {g.num_samples} | {rates} |")
    race = fidelity.attributes.get("race")
    kept = {g.group: g.fidelity for g in race.groups} if race is not None else {}
    verdict = bool(kept) and all(v >= BAR for v in kept.values())
    print(f"race kept in every group at >= {BAR}: {'yes' if verdict else 'NO'}")
    record = {"bundle": str(bundle), "rmse": rmse, "seconds": seconds, "fidelity": fidelity.to_dict()}
    (out / "vae_roundtrip.json").write_text(json.dumps(record, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
