"""Registering an image to itself: the field should be the identity.

The siamese encoder subtracts the two encodings level by level, so for identical images the decoder sees
zeros and returns one fixed field whatever the image. A network trained only on pairs of two subjects
never sees that input, and nothing makes that field the identity. For each fixed image of the validation
pairs this registers it to itself with each checkpoint and reports the mean |u| over the grid and over
the hippocampus labels, the largest |u|, the Dice of the labels warped (nearest neighbour) onto
themselves (1 for the identity), and how much the field differs between images (0 when it is one field).

    python benchmarks/self_registration.py --dataset_dir runs/HippocampusMR \\
        --ckpt_paths runs/model_v0.6.0.pt models/model.pt --json benchmarks/self_registration.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", default=str(ROOT / "sample_data" / "HippocampusMR"))
    parser.add_argument("--ckpt_paths", nargs="+", default=[str(ROOT / "models" / "model.pt")])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    import torch
    from monai.bundle import ConfigParser

    from scripts.deformation import warp_labels_nearest
    from scripts.weights import load_pretrained

    torch.set_num_threads(args.threads)
    config = ConfigParser()
    config.read_config(str(ROOT / "configs" / "inference.json"))
    config["dataset_dir"] = args.dataset_dir
    dataset = config.get_parsed_content("dataset")
    fixed, seen = [], set()
    for i in range(len(dataset)):
        item = dataset[i]
        if item["fixed_id"] not in seen:
            seen.add(item["fixed_id"])
            fixed.append((item["fixed_image"][None].as_tensor(), item["fixed_label"][None].as_tensor().long()))

    results = {}
    print(
        "| checkpoint | images | mean \\|u\\|, grid | mean \\|u\\|, labels | max \\|u\\| | self Dice | field spread |"
    )
    print("|---|---|---|---|---|---|---|")
    for ckpt in args.ckpt_paths:
        net = load_pretrained(config.get_parsed_content("network_def"), ckpt).eval()
        rows, fields = [], []
        with torch.no_grad():
            for image, label in fixed:
                u = net(torch.cat([image, image], dim=1))
                norm = u.norm(dim=1)[0]
                warped = warp_labels_nearest(label, u)
                dice = [
                    float(2 * ((warped == k) & (label == k)).sum() / ((warped == k).sum() + (label == k).sum()))
                    for k in (1, 2)
                ]
                rows.append((float(norm.mean()), float(norm[label[0, 0] > 0].mean()), float(norm.max()), sum(dice) / 2))
                fields.append(u)
        spread = float(max((f - fields[0]).abs().max() for f in fields))
        mean = [statistics.mean(r[k] for r in rows) for k in range(4)]
        results[ckpt] = {
            "images": len(rows),
            "mean_abs_u_grid": mean[0],
            "mean_abs_u_labels": mean[1],
            "max_abs_u": max(r[2] for r in rows),
            "self_dice": mean[3],
            "field_spread_max": spread,
        }
        print(f"| {ckpt} | {len(rows)} | {mean[0]:.3f} | {mean[1]:.3f} | {results[ckpt]['max_abs_u']:.2f} | "
              f"{mean[3]:.3f} | {spread:.2g} |")  # fmt: skip
    if args.json:
        meta = {"dataset_dir": args.dataset_dir, "threads": args.threads, "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
