"""Segmentation-guided instance optimisation on the hippocampus validation pairs, and the training of its
segmentation network (issue 17).

Instance optimisation on image similarity (``--io_steps``, LNCC or MSE) lost Dice in every setting
(docs/inference.md): these 1 mm MR crops' intensities do not agree with the anatomy as well as the network
does. This probe replaces the image similarity by the paper's other signal, labels, at test time, without
the pair's own labels: a small segmentation network trained on the 160 subjects of no validation pair (the
registration network's training subjects) labels both images, and the optimisation minimises the soft Dice
loss between the warped predicted moving probabilities and the predicted fixed ones (head and tail), from
the shipped network's field, with the training regulariser: ``RegistrationTestTimeInferer`` with
``similarity="dice"``, which configs/inference.json runs with ``--io_similarity dice --io_seg_ckpt FILE``.

1. trains a MONAI ``UNet`` (configs/inference.json's ``io_segmenter_def``; DiceCE loss, Adam with the rate
   decayed linearly over the time budget, the inference preprocessing, with ``--augment`` random affine,
   contrast and noise: ``augmentation``) for ``--seconds``, or loads ``--seg_ckpt`` if it exists (and saves
   it there after training);
2. scores the segmentation on the 40 validation subjects (Dice of the argmax per label);
3. for each validation pair, the plain field and the optimised ones (each ``--steps`` value), scored with
   the official Learn2Reg metrics (``scripts.metrics.evaluate_pair``) with the true labels. The plain row
   equals configs/inference.json's result on these pairs (a check of the probe's own pipeline).

    # docs/inference.md, "Segmentation-guided instance optimisation": the network trained here (45 min on 2
    # cores), then two more settings with it
    python benchmarks/seg_guided_io.py --dataset_dir runs/HippocampusMR --seconds 2700 --steps 10 20 40 \
        --lr 0.01 --seg_ckpt runs/seg_hippo/model.pt --json benchmarks/seg_guided_io_lr001.json
    python benchmarks/seg_guided_io.py --dataset_dir runs/HippocampusMR --steps 20 40 --lr 0.003 \
        --seg_ckpt runs/seg_hippo/model.pt --json benchmarks/seg_guided_io_lr0003.json
    python benchmarks/seg_guided_io.py --dataset_dir runs/HippocampusMR --steps 20 --lr 0.01 --grid 4 \
        --smooth_weight 0.3 --seg_ckpt runs/seg_hippo/model.pt --json benchmarks/seg_guided_io_grid4.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monai.bundle import ConfigParser  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402
from monai.networks.nets import UNet  # noqa: E402
from monai.transforms import Compose, RandAdjustContrastd, RandAffined, RandGaussianNoised  # noqa: E402

from scripts.inferers import RegistrationTestTimeInferer  # noqa: E402
from scripts.metrics import evaluate_pair  # noqa: E402


def load_cases(dataset_dir: Path, preprocessing) -> tuple[dict, list, list]:
    """{image path: (image (1, H, W, D), label (1, H, W, D))} preprocessed, the training and validation paths."""
    dataset = json.loads((dataset_dir / "HippocampusMR_dataset.json").read_text())
    pairs = dataset["registration_val"]
    val = sorted({p[k] for p in pairs for k in ("fixed", "moving")})
    cases = {}
    for entry in dataset["training"]:
        d = preprocessing({"image": str(dataset_dir / entry["image"]), "label": str(dataset_dir / entry["label"])})
        cases[entry["image"]] = (d["image"].as_tensor().float(), d["label"].as_tensor().float())
    train = [k for k in cases if k not in set(val)]
    return cases, train, pairs


def dice_per_label(pred: torch.Tensor, truth: torch.Tensor, labels=(1, 2)) -> list[float]:
    return [float(2 * ((pred == v) & (truth == v)).sum() / ((pred == v).sum() + (truth == v).sum())) for v in labels]


def augmentation(seed: int):
    """Random affine (rotations up to 0.2 rad, scaling up to 10 %, shifts up to 4 voxels; labels nearest),
    then contrast (gamma 0.7-1.5) and Gaussian noise on the image, each per sample."""
    transform = Compose(
        [
            RandAffined(
                keys=["image", "label"],
                prob=0.8,
                rotate_range=(0.2, 0.2, 0.2),
                scale_range=(0.1, 0.1, 0.1),
                translate_range=(4, 4, 4),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandAdjustContrastd(keys="image", prob=0.5, gamma=(0.7, 1.5)),
            RandGaussianNoised(keys="image", prob=0.3, std=0.02),
        ]
    )
    transform.set_random_state(seed)
    return transform


def train_segmentation(
    cases, train, channels, seconds, batch_size, lr, seed, augment=False, init: Path | None = None
) -> tuple[UNet, dict]:
    torch.manual_seed(seed)
    transform = augmentation(seed) if augment else None
    net = UNet(3, 1, 3, channels=channels, strides=(2,) * (len(channels) - 1), num_res_units=1, norm="instance")
    if init is not None:  # continue a trained network (float16 files load into the float32 one)
        net.load_state_dict({k: v.float() for k, v in torch.load(init, map_location="cpu").items()})
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    start, epoch, history = time.time(), 0, []
    while time.time() - start < seconds:
        for group in optimiser.param_groups:  # linear decay to 0 over the time budget
            group["lr"] = lr * max(0.05, 1 - (time.time() - start) / seconds)
        order = rng.permutation(len(train))
        losses = []
        for i in range(0, len(order) - batch_size + 1, batch_size):
            batch = [cases[train[j]] for j in order[i : i + batch_size]]
            if transform is not None:
                batch = [transform({"image": b[0], "label": b[1]}) for b in batch]
                batch = [(b["image"].as_tensor(), b["label"].as_tensor()) for b in batch]
            image = torch.stack([b[0] for b in batch])
            label = torch.stack([b[1] for b in batch])
            loss = loss_fn(net(image), label)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss))
        epoch += 1
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "seconds": round(time.time() - start, 1)})
        print(f"epoch {epoch}: loss {history[-1]['loss']:.4f} ({history[-1]['seconds']} s)", flush=True)
    result = {"epochs": epoch, "seconds": round(time.time() - start, 1), "history": history}
    return net, {**result, "init": os.path.relpath(init, ROOT)} if init is not None else result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", type=Path, default=ROOT / "runs" / "HippocampusMR")
    parser.add_argument("--ckpt_path", type=Path, default=ROOT / "models" / "model.pt")
    parser.add_argument("--seg_ckpt", type=Path, default=ROOT / "runs" / "seg_hippo" / "model.pt")
    parser.add_argument("--seg_channels", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--seconds", type=float, default=2700, help="segmentation training time")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--augment", action="store_true", help="augment the segmentation training (augmentation())")
    parser.add_argument("--seg_lr", type=float, default=3e-3)
    parser.add_argument("--init_seg_ckpt", type=Path, help="start the segmentation training from these weights")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--grid", type=int, default=2)
    parser.add_argument("--smooth_weight", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = ConfigParser()
    config.read_config(str(ROOT / "configs" / "inference.json"))
    config["bundle_root"] = str(ROOT)
    preprocessing = config.get_parsed_content("preprocessing")
    cases, train, pairs = load_cases(args.dataset_dir, preprocessing)
    print(f"{len(train)} training subjects, {len(pairs)} validation pairs", flush=True)

    channels = tuple(args.seg_channels)
    if args.seg_ckpt.exists():
        seg = UNet(3, 1, 3, channels=channels, strides=(2,) * (len(channels) - 1), num_res_units=1, norm="instance")
        seg.load_state_dict(torch.load(args.seg_ckpt, map_location="cpu"))
        training = {"loaded": str(args.seg_ckpt)}
    else:
        seg, training = train_segmentation(
            cases,
            train,
            channels,
            args.seconds,
            args.batch_size,
            args.seg_lr,
            args.seed,
            args.augment,
            args.init_seg_ckpt,
        )
        args.seg_ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save(seg.state_dict(), args.seg_ckpt)
    seg.eval()

    net = config.get_parsed_content("network_def")
    net.load_state_dict({k: v.float() for k, v in torch.load(args.ckpt_path, map_location="cpu").items()})
    net.eval()
    inferer = config.get_parsed_content("inferer")

    val_ids = sorted({p[k] for p in pairs for k in ("fixed", "moving")})
    probs, seg_dice = {}, []
    with torch.no_grad():
        for key in val_ids:
            image, label = cases[key]
            probs[key] = torch.softmax(seg(image[None]), 1)[:, 1:]
            seg_dice.append(dice_per_label(probs_to_labels(probs[key]), label[0]))
    seg_dice = np.array(seg_dice)
    print(
        f"segmentation Dice on the {len(val_ids)} validation subjects: {seg_dice.mean(0)} (mean {seg_dice.mean():.4f})"
    )

    variants = {"plain": 0, **{f"seg_io_{s}": s for s in args.steps}}
    scores = {name: [] for name in variants}
    seconds = {name: [] for name in variants}
    for pair in pairs:
        moving, moving_label = cases[pair["moving"]]
        fixed, fixed_label = cases[pair["fixed"]]
        with torch.no_grad():
            t0 = time.perf_counter()
            ddf = inferer(torch.cat([moving, fixed])[None], net)
            t_plain = time.perf_counter() - t0
        for name, steps in variants.items():
            t0 = time.perf_counter()
            if steps:
                io = RegistrationTestTimeInferer(
                    steps=steps,
                    lr=args.lr,
                    grid=args.grid,
                    smooth_weight=args.smooth_weight,
                    similarity="dice",
                    segmenter=seg,
                )
                field = io.optimise(torch.cat([moving, fixed])[None], ddf)
            else:
                field = ddf
            seconds[name].append(t_plain + time.perf_counter() - t0)
            disp = field[0].permute(1, 2, 3, 0).numpy()
            res = evaluate_pair(fixed_label[0].numpy(), moving_label[0].numpy(), disp, [1, 2])
            scores[name].append({m: res[m] for m in ("dice", "hd95", "sdlogj", "folding_percent")})
        print(pair["fixed"], pair["moving"], {n: round(s[-1]["dice"], 4) for n, s in scores.items()}, flush=True)

    summary = {}
    for name, rows in scores.items():
        dice = np.array([r["dice"] for r in rows])
        summary[name] = {
            "dice": float(dice.mean()),
            "dice30": float(np.quantile(dice, 0.3)),
            **{m: float(np.mean([r[m] for r in rows])) for m in ("hd95", "sdlogj", "folding_percent")},
            "seconds_per_pair": float(np.median(seconds[name])),
        }
    print("| variant | Dice | Dice30 | HD95 | SDlogJ | folding % | s per pair |\n|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['dice']:.4f} | {s['dice30']:.4f} | {s['hd95']:.2f} | {s['sdlogj']:.3f} | "
              f"{s['folding_percent']:.2f} | {s['seconds_per_pair']:.2f} |")  # fmt: skip
    if args.json:
        result = {
            "command": " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
            "args": {k: os.path.relpath(v, ROOT) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "segmentation": {"training": training, "val_dice_per_label": seg_dice.mean(0).tolist()},
            "variants": summary,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def probs_to_labels(p: torch.Tensor) -> torch.Tensor:
    """(1, 2, H, W, D) head / tail probabilities to a (H, W, D) label map."""
    background = 1 - p.sum(1, keepdim=True)
    return torch.cat([background, p], 1).argmax(1)[0]


if __name__ == "__main__":
    main()
