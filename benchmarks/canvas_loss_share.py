"""How much of the similarity and smoothness terms the padding of a 64^3 canvas carries.

Runs the shipped weights (training mode, moving->fixed) on a few pairs of MSD hippocampus training
cases padded to 64^3 and compares each term on the whole canvas with the same term on its centre of
the size of a smaller canvas (what ``--spatial_size`` pads to; the padding is symmetric, so the
smaller canvas is that centre). docs/training.md, "Fewer voxels", reports the output of

    python benchmarks/canvas_loss_share.py --msd_dir ../shared/data/hippocampus_msd --canvas 48 64 48
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--msd_dir", required=True)
    parser.add_argument("--canvas", type=int, nargs=3, default=[48, 64, 48])
    parser.add_argument("--ckpt", default="models/model.pt")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from scripts.deformation import gradient_to_ddf, warp_image
    from scripts.losses import LocalNCCLoss

    cfg = ConfigParser()
    cfg.read_config(str(ROOT / "configs" / "train.json"))
    cfg["dataset_dir"], cfg["num_val"] = args.msd_dir, 40
    net = cfg.get_parsed_content("network_def")
    net.load_state_dict(torch.load(args.ckpt, map_location="cpu"))
    net.train()
    preprocessing = cfg.get_parsed_content("preprocessing")
    cases = cfg.get_parsed_content("train#cases")[: 2 * args.pairs]
    images = [preprocessing(c)["image"].as_tensor()[None] for c in cases]
    size = images[0].shape[2:]
    centre = (slice(None), slice(None)) + tuple(
        slice((s - c) // 2, (s - c) // 2 + c) for s, c in zip(size, args.canvas, strict=True)
    )
    lncc = LocalNCCLoss(kernel_size=9)
    print(
        f"canvas {tuple(size)} against its centre {tuple(args.canvas)}: voxel ratio "
        f"{torch.Size(args.canvas).numel() / size.numel():.4f}"
    )
    for moving, fixed in zip(images[0::2], images[1::2], strict=True):
        with torch.no_grad():
            g = net(torch.cat([moving, fixed], 1))["grad_mf"][:, 0]
            warped = warp_image(moving, gradient_to_ddf(g))
            whole, part = lncc(warped, fixed).item(), lncc(warped[centre], fixed[centre]).item()
        smooth = (g - 1).abs()
        share = smooth[centre].sum().item() / smooth.sum().item()
        print(f"LNCC loss whole/centre {whole / part:.3f}; share of the smoothness sum in the centre {share:.0%}")


if __name__ == "__main__":
    main()
