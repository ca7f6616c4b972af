"""Every image reader/writer nnU-Net ships, with its own files: what the launcher writes is plain
nnUNetv2_predict's (file names, sidecars included, and voxels), a case is whole only with all of
its files, the inputs' sidecars belong to their case, and `plan` sizes each format from its header.

The models are copies of the tiny one (make_tiny_model) whose plans name another reader/writer,
and for NaturalImage2DIO a 2d model (make_stage_models' 2d configuration) on RGB .png files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import cli, copy_outputs_mtimes, plain_nnunet, run_args
from launcher.readers_writers import TABLE, reader_writer

# xdist: the tiff model and its reference are built once, on one xdist worker
pytestmark = pytest.mark.xdist_group("readers_writers")

# Small volumes (z, y, x), one anisotropic so that the export resamples along the .json's spacing;
# the last case has no spacing file (nnU-Net reads it as 1, 1, 1 and still writes one).
TIFF_CASES = {
    "tif_a": ((20, 24, 28), [1.5, 1.0, 1.0]),
    "tif_b": ((24, 20, 24), [1.0, 0.8, 1.2]),
    "tif_c": ((16, 24, 20), None),
}
OTHER_FILE = "notes.txt"  # a file nnU-Net skips: the only one the launcher may name as skipped


def volume(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A blob in noise: a random-weight model predicts more than one label on it."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    blob = np.exp(-sum((g - 0.1 * i) ** 2 for i, g in enumerate(grids)) * 4)
    return (blob * 3 + rng.normal(0, 0.5, shape)).astype(np.float32)


def model_copy(source: Path, folder: Path, writer: str, file_ending: str) -> Path:
    """The tiny model with another reader/writer in its plans (and its file ending)."""
    shutil.copytree(source, folder)
    for name, key, value in (
        ("plans.json", "image_reader_writer", writer),
        ("dataset.json", "file_ending", file_ending),
    ):
        content = json.loads((folder / name).read_text())
        content[key] = value
        (folder / name).write_text(json.dumps(content, indent=4))
    return folder


def outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != ".nnunet-launch")


def launcher_run(data: dict, out: Path, *extra: str):
    """One worker, one helper of each kind (as the plain reference): the fewest processes to start."""
    result = cli(*run_args(data, out, "-npp", "1", "-nps", "1", *extra), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def tiff(tiny, tmp_path_factory) -> dict:
    """A Tiff3DIO model, .tif inputs with their .json spacing files, and plain nnU-Net's outputs."""
    base = tmp_path_factory.mktemp("tiff")
    model = model_copy(tiny["model"], base / "model", "Tiff3DIO", ".tif")
    inputs = base / "inputs"
    inputs.mkdir()
    for seed, (case_id, (shape, spacing)) in enumerate(TIFF_CASES.items()):
        # one tiled, as microscopes write them: SimpleITK cannot read its header, tifffile (nnU-Net's) can
        tifffile.imwrite(inputs / f"{case_id}_0000.tif", volume(shape, seed), tile=(16, 16) if seed == 1 else None)
        if spacing is not None:
            (inputs / f"{case_id}.json").write_text(json.dumps({"spacing": spacing}))
    (inputs / OTHER_FILE).write_text("not a scan")
    reference = base / "reference"
    plain_nnunet(inputs, reference, model)
    return {"model": model, "inputs": inputs, "reference": reference, "base": base}


def assert_same_tiff_outputs(out: Path, reference: Path) -> None:
    """Plain nnU-Net's files, each case's .tif and its .json spacing file, with the same content."""
    assert outputs(out) == outputs(reference)
    for case_id in TIFF_CASES:
        assert np.array_equal(tifffile.imread(out / f"{case_id}.tif"), tifffile.imread(reference / f"{case_id}.tif"))
        assert (out / f"{case_id}.json").read_bytes() == (reference / f"{case_id}.json").read_bytes(), case_id


def test_tiff3dio_writes_plain_nnunets_tifs_and_spacing_files_and_names_no_sidecar_as_skipped(tiff, tmp_path):
    reference = tiff["reference"]
    assert {f"{c}.json" for c in TIFF_CASES} <= set(outputs(reference)), "nnU-Net writes a spacing file per case"
    assert json.loads((reference / "tif_a.json").read_text())["spacing"] == [1.5, 1.0, 1.0]
    out = tmp_path / "out"
    result = launcher_run(tiff, out)
    assert_same_tiff_outputs(out, reference)
    said = result.stdout + result.stderr
    skipped = next(line for line in said.splitlines() if "are skipped" in line)
    assert "1 file(s)" in skipped and OTHER_FILE in skipped and ".json" not in skipped


def test_a_tiff_case_without_its_spacing_file_is_predicted_again_on_resume(tiff, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiff["reference"], out)  # plain nnU-Net's outputs, one of them missing its .json
    (out / "tif_b.json").unlink()
    (out / "tif_a.json").write_text('{"spacing": [1.5, 1.0')  # cut: the reader of tif_a.tif fails on it
    before = copy_outputs_mtimes(out)
    # not the launcher's: kept where whole with --continue_prediction; the one without its .json and the one
    # whose .json is cut predicted again
    result = launcher_run(tiff, out, "--continue_prediction")
    assert result.stdout.count("kept (existing output verified)") == len(TIFF_CASES) - 2
    assert_same_tiff_outputs(out, tiff["reference"])
    after = copy_outputs_mtimes(out)
    assert after["tif_a.tif"] > before["tif_a.tif"] and after["tif_b.tif"] > before["tif_b.tif"]
    assert all(after[n] == before[n] for n in ("tif_c.tif", "tif_c.json"))

    # the launcher's own finished run: a case journaled done whose .json vanished is predicted again
    (out / "tif_c.json").unlink()
    before = copy_outputs_mtimes(out)
    launcher_run(tiff, out, "--continue_prediction")
    assert_same_tiff_outputs(out, tiff["reference"])
    after = copy_outputs_mtimes(out)
    assert after["tif_c.tif"] > before["tif_c.tif"]
    assert all(after[n] == before[n] for n in ("tif_a.tif", "tif_a.json", "tif_b.tif", "tif_b.json"))


def test_plan_sizes_a_tiff_case_from_its_header(tiff, tmp_path):
    args = ["-i", str(tiff["inputs"]), "-o", str(tmp_path / "out"), "-m", str(tiff["model"]), "-f", "0"]
    result = cli("plan", *args, "-device", "cpu", "--workers", "1", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    voxels = sum(int(np.prod(shape)) for shape, _ in TIFF_CASES.values())
    assert plan["parts"][0]["estimated_work"] == voxels  # not the files' sizes (compressed or not)
    assert [w for w in plan["warnings"] if "skipped" in w] == [
        f"1 file(s) in the input folder do not end in '.tif' and are skipped: '{OTHER_FILE}'"
    ]


@pytest.mark.parametrize("writer", ["NibabelIO", "NibabelIOWithReorient"])
def test_nibabel_readers_writers_write_plain_nnunets_niftis(writer, tiny, tmp_path):
    import nibabel

    model = model_copy(tiny["model"], tmp_path / "model", writer, ".nii.gz")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for seed, shape in enumerate(((20, 24, 28), (24, 20, 16))):
        affine = np.diag([-1.2, 1.0, 0.9, 1.0])  # not RAS: NibabelIOWithReorient turns it, and back
        affine[:3, 3] = (4.0, -2.0, 1.0)
        nibabel.save(nibabel.Nifti1Image(volume(shape, seed), affine), inputs / f"nib_{seed}_0000.nii.gz")
    reference, out = tmp_path / "reference", tmp_path / "out"
    plain_nnunet(inputs, reference, model)
    launcher_run({"inputs": inputs, "model": model}, out)
    assert outputs(out) == outputs(reference)
    for name in (n for n in outputs(reference) if n.endswith(".nii.gz")):
        a, b = nibabel.load(reference / name), nibabel.load(out / name)
        assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)), name
        assert np.array_equal(a.affine, b.affine) and a.header == b.header, name


def test_natural_image_2d_writes_plain_nnunets_pngs_from_one_rgb_file_per_case(tmp_path):
    import make_stage_models
    import make_tiny_model
    from skimage import io

    plans = make_stage_models.plans_dict(num_channels=3)
    plans["configurations"] = {"2d": plans["configurations"]["2d"]}
    plans["image_reader_writer"] = "NaturalImage2DIO"
    dataset = {
        **make_tiny_model.dataset_dict(3),
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "file_ending": ".png",
    }
    model = tmp_path / "nnUNetTrainer__nnUNetPlans__2d"
    make_stage_models.make_model(str(model), plans, dataset, "2d", (0,), seed=0)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for seed, shape in enumerate(((40, 56), (48, 36))):
        rgb = np.stack([volume(shape, seed * 3 + c) for c in range(3)], axis=-1)
        io.imsave(
            inputs / f"img_{seed}_0000.png", np.clip(rgb * 40 + 100, 0, 255).astype(np.uint8), check_contrast=False
        )
    reference, out = tmp_path / "reference", tmp_path / "out"
    plain_nnunet(inputs, reference, model)
    result = launcher_run({"inputs": inputs, "model": model}, out)
    assert outputs(out) == outputs(reference)
    for name in (n for n in outputs(reference) if n.endswith(".png")):
        assert np.array_equal(io.imread(out / name), io.imread(reference / name)), name
    assert "skipped" not in result.stdout + result.stderr


# --- the table itself, without a model ------------------------------------------------------------
def test_the_table_names_every_reader_writer_nnunet_ships_with_its_endings():
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES

    assert {c.__name__: tuple(c.supported_file_endings) for c in LIST_OF_IO_CLASSES} == {
        name: rw.endings for name, rw in TABLE.items()
    }


def test_a_tiff_output_is_whole_only_with_its_spacing_file_and_moves_with_it(tmp_path):
    from launcher.outputs import case_outputs, move_into_place, outputs_present

    assert case_outputs("a", ".tif", True, "Tiff3DIO") == ["a.npz", "a.pkl", "a.json", "a.tif"]
    assert case_outputs("a", ".tif", False, "NaturalImage2DIO") == ["a.tif"]
    assert not outputs_present({"a.tif"}, "a", ".tif", False, "Tiff3DIO")
    assert outputs_present({"a.tif", "a.json"}, "a", ".tif", False, "Tiff3DIO")
    assert reader_writer("Tiff3DIO").input_sidecar("a_b_0000.tif") == "a_b.json"  # as nnU-Net cuts the name
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir(), out.mkdir()
    for name in ("a.tif", "a.json", "b.json"):
        (scratch / name).write_text(name)
    # the export's names, as the worker's pipeline gives them: the writer's sidecar goes along
    move_into_place(str(scratch), str(out), ["a.tif"])
    assert sorted(os.listdir(out)) == ["a.json", "a.tif"] and sorted(os.listdir(scratch)) == ["b.json"]
