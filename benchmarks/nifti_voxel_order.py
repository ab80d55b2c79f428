"""Do a NIfTI input's results line up with it on the raw arrays (nibabel, no reorienting)?

    .venv/bin/python benchmarks/nifti_voxel_order.py [--codes RAS] [--out JSON]

A held-out phantom (seed 424242) is stored in the voxel order ``--codes`` (RAS, as most
NIfTI tools write; LPS is the plugin's own order) and segmented with ``napari-medseg
segment``. Then ``input[labels == liver]`` on nibabel's raw arrays is compared with the
phantom's true liver: the mean HU it reads and the Dice of the voxels it picks. Before
results were stored in the input's own voxel order, a RAS input's labels came back with
i and j reversed, so that line read other voxels.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from _common import emit, machine
from napari_medseg.core.io import write_nifti
from napari_medseg.core.phantom import LABEL_NAMES, generate_phantom


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codes", default="RAS", help="voxel order to store the input in")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp())
    ph = generate_phantom((40, 192, 192), (2.5, 1.5, 1.5), seed=424242, n_lesions=2)
    lps = nib.load(write_nifti(folder / "lps.nii.gz", ph.volume.array, ph.volume.spacing,
                               ph.volume.origin))
    turn = ornt_transform(axcodes2ornt(tuple("LPS")), axcodes2ornt(tuple(args.codes)))
    src = folder / "input.nii.gz"
    nib.save(nib.Nifti1Image(apply_orientation(np.asarray(lps.dataobj), turn),
                             lps.affine @ inv_ornt_aff(turn, lps.shape)), src)
    truth = apply_orientation(ph.labels.transpose(2, 1, 0), turn)  # raw, like the input
    cli = Path(sys.executable).with_name("napari-medseg")
    subprocess.run([str(cli), "segment", str(src), str(folder / "seg.nii.gz"), "-q"],
                   check=True)
    raw_in = np.asarray(nib.load(src).dataobj)
    out = nib.load(folder / "seg.nii.gz")
    raw_seg = np.asarray(out.dataobj)
    liver = next(k for k, v in LABEL_NAMES.items() if v == "liver")
    result = {"benchmark": "nifti_voxel_order", "machine": machine(), "codes": args.codes,
              "input_shape": list(raw_in.shape), "labels_shape": list(raw_seg.shape),
              "affine_max_difference_mm": round(float(np.abs(out.affine - nib.load(src).affine)
                                                      .max()), 6)}
    if raw_seg.shape == raw_in.shape:
        picked, true = raw_seg == liver, truth == liver
        result.update({
            "liver_hu_raw_on_raw": round(float(raw_in[picked].mean()), 1),
            "liver_hu_truth": round(float(raw_in[true].mean()), 1),
            "liver_dice_raw_on_raw": round(float(2 * (picked & true).sum()
                                                 / (picked.sum() + true.sum())), 3)})
    emit(result, args.out)


if __name__ == "__main__":
    main()
