"""How well ``scripts.deformation.invert_ddf`` inverts the network's fixed->moving fields (what
``--tta_symmetric True`` averages in): the residual |v(x) + u(x + v(x))| in voxels, over the whole grid and
over the fixed image's labels, for every 8th validation pair, with 20 (the option's) and 100 iterations.

    python benchmarks/inverse_residual.py --dataset_dir runs/HippocampusMR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", default=str(ROOT / "sample_data" / "HippocampusMR"))
    parser.add_argument("--ckpt_path", default=str(ROOT / "models" / "model.pt"))
    parser.add_argument("--every", type=int, default=8, help="every Nth validation pair")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    import torch
    from monai.bundle import ConfigParser

    from scripts.deformation import invert_ddf, warp_image
    from scripts.weights import load_pretrained

    torch.set_num_threads(args.threads)
    config = ConfigParser()
    config.read_config(str(ROOT / "configs" / "inference.json"))
    config["dataset_dir"] = args.dataset_dir
    dataset = config.get_parsed_content("dataset")
    net = load_pretrained(config.get_parsed_content("network_def"), args.ckpt_path).eval()
    print(
        "| pair (fixed, moving) | iterations | mean residual, whole grid | 99th percentile | mean on the fixed labels |"
    )
    print("|---|---|---|---|---|")
    for i in range(0, len(dataset), args.every):
        item = dataset[i]
        swapped = torch.cat([item["fixed_image"], item["moving_image"]])[None].as_subclass(torch.Tensor)
        labels = item["fixed_label"].as_subclass(torch.Tensor)[0] > 0
        with torch.no_grad():
            u = net(swapped)  # fixed -> moving, on the moving grid
            for iterations in (20, 100):
                v = invert_ddf(u, iterations)
                r = (v + warp_image(u, v, padding="border")).norm(dim=1)[0]
                pair = f"{dataset.pairs[i]['fixed_id']}, {dataset.pairs[i]['moving_id']}"
                print(f"| {pair} | {iterations} | {r.mean():.3f} | {r.quantile(0.99):.2f} | {r[labels].mean():.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
