"""Dice of the app's atlas-based segmentation on held-out hippocampus MRIs, through the app's own infer
task (the code a ``monailabel start_server`` request runs, without the HTTP layer).

Run with the MONAI Label environment, from the bundle folder::

    .venv-monailabel/bin/python apps/monailabel/evaluate_atlas.py \\
        --msd_dir ../shared/data/hippocampus_msd --output runs/atlas_eval.json

Cases: the validation cases of the MSD folder (its last ``--num_val`` cases by id, the rule of
``scripts.learn2reg``; never trained on), minus the atlases. For each case it segments:

- ``single``: with each atlas alone (registered, and not registered), averaged over the atlases;
- ``first``: with the first atlas alone (what ``num_atlases 1`` serves);
- ``all``: with all atlases, majority vote (registered, and not registered).

Dice per case = mean over labels 1 and 2 of 2|P∩T| / (|P| + |T|) on the image's own grid, against
the case's own label map. Prints a table and writes every number to ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import nibabel as nib
import numpy as np

HERE = os.path.dirname(os.path.realpath(__file__))
BUNDLE = os.path.realpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

from lib.infers import AtlasRegistration  # noqa: E402 (after the sys.path entry)

LABELS = (1, 2)


def dice(pred: np.ndarray, truth: np.ndarray) -> dict:
    per = {k: float(2 * np.sum((pred == k) & (truth == k)) / (np.sum(pred == k) + np.sum(truth == k))) for k in LABELS}
    per["mean"] = float(np.mean([per[k] for k in LABELS]))
    return per


def segment(task: AtlasRegistration, image: str, atlases: list, register: bool) -> np.ndarray:
    result_file, _ = task({"image": image, "atlases": atlases, "register": register, "device": "cpu"})
    try:
        out = nib.load(result_file)
        ref = nib.load(image)
        if out.shape != ref.shape or not np.allclose(out.affine, ref.affine, atol=1e-4):
            raise RuntimeError(f"{image}: result not on the image grid ({out.shape} vs {ref.shape})")
        return np.asarray(out.dataobj).astype(int)
    finally:
        os.remove(result_file)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--msd_dir", required=True, help="MSD Task04 folder (dataset.json, imagesTr, labelsTr)")
    parser.add_argument("--num_val", type=int, default=40, help="validation cases: the last num_val by id")
    parser.add_argument("--atlas_dir", default=None, help="default: the bundle's sample_data/HippocampusMR")
    parser.add_argument("--max_cases", type=int, default=0, help="evaluate only the first N cases (0: all)")
    parser.add_argument("--output", default=os.path.join(BUNDLE, "runs", "atlas_eval.json"))
    args = parser.parse_args(argv)

    task = AtlasRegistration(BUNDLE, {}, atlas_dir=args.atlas_dir)
    atlas_ids = [c["id"] for c in task.atlas_cases]
    sys.path.insert(0, BUNDLE)
    from scripts.learn2reg import training_cases

    cases = training_cases(args.msd_dir, args.num_val, exclude_val=False)[-args.num_val :]
    cases = [c for c in cases if c["id"] not in atlas_ids]
    if args.max_cases:
        cases = cases[: args.max_cases]
    print(f"{len(cases)} held-out cases ({cases[0]['id']}..{cases[-1]['id']}), atlases {atlas_ids}", flush=True)

    rows, start = [], time.time()
    for i, case in enumerate(cases):
        truth = np.asarray(nib.load(case["label"]).dataobj).astype(int)
        row = {"id": case["id"], "shape": list(truth.shape)}
        for register in (True, False):
            tag = "registered" if register else "unregistered"
            single = {a: dice(segment(task, case["image"], [a], register), truth) for a in atlas_ids}
            row[f"single_{tag}"] = single
            row[f"single_{tag}_mean"] = float(np.mean([d["mean"] for d in single.values()]))
            row[f"first_{tag}"] = single[atlas_ids[0]]["mean"]
            row[f"all_{tag}"] = dice(segment(task, case["image"], atlas_ids, register), truth)
        rows.append(row)
        print(
            f"[{i + 1}/{len(cases)}] {case['id']}: all {row['all_registered']['mean']:.3f} "
            f"(unregistered {row['all_unregistered']['mean']:.3f}), single mean {row['single_registered_mean']:.3f} "
            f"(unregistered {row['single_unregistered_mean']:.3f}) [{time.time() - start:.0f} s]",
            flush=True,
        )

    def stats(values):
        v = np.asarray(values, dtype=float)
        return {"mean": float(v.mean()), "std": float(v.std()), "p30": float(np.quantile(v, 0.3))}

    summary = {}
    for tag in ("registered", "unregistered"):
        summary[f"1 atlas (each of {len(atlas_ids)}, averaged), {tag}"] = stats([r[f"single_{tag}_mean"] for r in rows])
        summary[f"1 atlas ({atlas_ids[0]}: num_atlases 1), {tag}"] = stats([r[f"first_{tag}"] for r in rows])
        summary[f"{len(atlas_ids)} atlases, majority vote, {tag}"] = stats([r[f"all_{tag}"]["mean"] for r in rows])
        for k in LABELS:
            summary[f"{len(atlas_ids)} atlases, majority vote, {tag}, label {k}"] = stats(
                [r[f"all_{tag}"][k] for r in rows]
            )
    print(f"\n{len(rows)} cases, Dice (mean over labels 1, 2) on the image grid; {time.time() - start:.0f} s")
    print(f"| {'setting':<58} | mean | std | 30th pct |\n|{'-' * 60}|---|---|---|")
    for name, s in summary.items():
        print(f"| {name:<58} | {s['mean']:.3f} | {s['std']:.3f} | {s['p30']:.3f} |")

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(
            {
                "msd_dir": args.msd_dir,  # as given: no machine path in recorded results
                "num_val": args.num_val,
                "atlases": atlas_ids,
                "cases": [r["id"] for r in rows],
                "summary": summary,
                "per_case": rows,
            },
            f,
            indent=1,
        )
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
