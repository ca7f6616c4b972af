"""nnU-Net's image readers/writers: what differs between them, in one table.

The model's plans.json names the one that reads every input and writes every segmentation
(`image_reader_writer`; nnUNetv2_predict takes no other). What the launcher must know of it:

- the files it reads besides a case's images: Tiff3DIO reads the spacing from CASE.json beside
  CASE_0000.tif (the first channel's name less `_0000` and its extension), so that file belongs
  to its case and is not "skipped";
- the files it writes besides a segmentation: Tiff3DIO writes CASE.json (the spacing) beside
  CASE.tif; they are moved into OUT together and a case is whole only with both;
- whether one file may hold several of the model's channels: NaturalImage2DIO reads an RGB(A)
  .png as 3 (4) channels, and nnU-Net's RGB datasets name one file per case for them.

How big an image is comes from its file format's header (headers.py), whichever reader reads it.
A reader/writer not in the table (a custom class in nnunetv2.imageio) is taken to read and
write nothing but the images, as nnU-Net's base class does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ReaderWriter:
    name: str
    endings: tuple[str, ...]  # nnU-Net's supported_file_endings
    sidecar: str | None = None  # the ending of CASE<sidecar>, read beside its images, written beside its output
    multichannel_files: bool = False  # one image file may hold several channels (RGB)

    def input_sidecar(self, first_channel: str) -> str | None:
        """The file the reader reads beside a case's images (a path or name, as its first
        channel's), if it reads one: nnU-Net's rule, the name less its last extension and `_XXXX`."""
        return _less_extension(first_channel)[:-5] + self.sidecar if self.sidecar else None

    def output_files(self, case_id: str, file_ending: str) -> list[str]:
        """What write_seg writes for a case: sidecars first, the segmentation last (it is what
        nnU-Net's --continue_prediction and the launcher's resume look for, so it is placed last)."""
        segmentation = case_id + file_ending
        return ([_less_extension(segmentation) + self.sidecar] if self.sidecar else []) + [segmentation]


def _less_extension(name: str) -> str:
    """The name less its last extension (".tif" of "a_0000.tif"), as nnU-Net's Tiff3DIO cuts it."""
    return name[: -(len(name.split(".")[-1]) + 1)]


NIFTI = (".nii", ".nii.gz")
TABLE = {
    rw.name: rw
    for rw in (
        ReaderWriter("SimpleITKIO", (".nii.gz", ".nrrd", ".mha", ".gipl")),
        ReaderWriter("NibabelIO", NIFTI),
        ReaderWriter("NibabelIOWithReorient", NIFTI),
        ReaderWriter("Tiff3DIO", (".tif", ".tiff"), sidecar=".json"),
        ReaderWriter("NaturalImage2DIO", (".png", ".bmp", ".tif"), multichannel_files=True),
    )
}
SIDECAR_ENDINGS = tuple(sorted({rw.sidecar for rw in TABLE.values() if rw.sidecar}))


def reader_writer(name: str | None) -> ReaderWriter:
    """The table's entry for plans.json's `image_reader_writer` (None: not known, images only)."""
    return TABLE.get(name or "", ReaderWriter(name or "unknown", ()))


def of_plans(plans: dict) -> str | None:
    return plans.get("image_reader_writer")


def output_sidecar_candidates(segmentation: str) -> list[str]:
    """The files some writer of that file ending writes beside `segmentation` (a path or a
    name): what an export may have left beside it in its scratch folder."""
    found = []
    for rw in TABLE.values():
        if rw.sidecar and segmentation.lower().endswith(rw.endings):
            candidate = _less_extension(segmentation) + rw.sidecar
            if candidate not in found:
                found.append(candidate)
    return found


def previous_reader_writer(out: str) -> str | None:
    """The writer of the run that wrote OUT, from the plans.json it left there (None: no run)."""
    import json

    try:
        with open(os.path.join(out, "plans.json")) as f:
            return of_plans(json.load(f))
    except (OSError, ValueError, AttributeError):
        return None
