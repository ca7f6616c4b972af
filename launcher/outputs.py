"""The layout of OUT: nnU-Net's own outputs, plus the hidden state folder.

A run's state (journal, lock, logs, tmp, report) lives in OUT/.nnunet-launch, or for node k of a
SLURM array in OUT/.nnunet-launch/node-k. Everything is written under the state's tmp/ first
and moved into OUT with os.replace (atomic within one filesystem), so OUT never shows a
partial file.
"""

from __future__ import annotations

import json
import os
import shutil

from launcher.headers import gzip_stream_intact
from launcher.readers_writers import SIDECAR_ENDINGS, output_sidecar_candidates, reader_writer

STATE_DIR = ".nnunet-launch"


def state_dir(out: str, node: int | None = None, part: int | None = None) -> str:
    """OUT/.nnunet-launch for a plain run; node-k for a SLURM array's node k; part-k for an
    nnU-Net-style `-num_parts N -part_id k` run (their own namespaces: both may share one OUT)."""
    base = os.path.join(out, STATE_DIR)
    if node is not None:
        return os.path.join(base, f"node-{node}")
    return base if part is None else os.path.join(base, f"part-{part}")


def numbered_state_dirs(out: str, prefix: str) -> list[tuple[int, str]]:
    """(k, folder) of every `<prefix>k` state folder (prefix "node-" or "part-"), in order."""
    base = os.path.join(out, STATE_DIR)
    found = []
    for name in os.listdir(base) if os.path.isdir(base) else []:
        number = name[len(prefix) :]
        if name.startswith(prefix) and number.isdigit() and os.path.isdir(os.path.join(base, name)):
            found.append((int(number), os.path.join(base, name)))
    return sorted(found)


def node_state_dirs(out: str) -> list[str]:
    """The state folders of a SLURM array's nodes, in node order."""
    return [path for _, path in numbered_state_dirs(out, "node-")]


def slurm_dir(out: str) -> str:
    return os.path.join(out, STATE_DIR, "slurm")


def stages_dir(state: str) -> str:
    """Intermediate outputs of a multi-stage run, one folder per member (see stages.py)."""
    return os.path.join(state, "stages")


def tmp_dir(state: str) -> str:
    return os.path.join(state, "tmp")


def logs_dir(state: str) -> str:
    return os.path.join(state, "logs")


def journal_path(state: str) -> str:
    return os.path.join(state, "journal.sqlite")


def lock_path(state: str) -> str:
    return os.path.join(state, "lock")


def case_outputs(case_id: str, file_ending: str, save_probabilities: bool, writer: str | None = None) -> list[str]:
    """The file names nnU-Net writes for one case with the model's reader/writer (`writer`, plans.json's
    image_reader_writer: Tiff3DIO adds CASE.json; None: the segmentation alone). The segmentation
    comes last: it is what nnU-Net's --continue_prediction looks for, so it is moved into place last."""
    names = [case_id + ".npz", case_id + ".pkl"] if save_probabilities else []
    return names + reader_writer(writer).output_files(case_id, file_ending)


def case_of_output(name: str, file_ending: str) -> str:
    """The case a file of case_outputs() belongs to."""
    for ending in (file_ending, ".npz", ".pkl", *SIDECAR_ENDINGS):
        if name.endswith(ending):
            return name[: -len(ending)]
    return os.path.splitext(name)[0]


def output_complete(path: str) -> bool:
    """The one rule for "this output file is whole": present, not empty, and for gzip files a
    stream whose length and CRC check out (a truncated .nii.gz reads without an error in
    SimpleITK, with wrong voxels). Used by resume (an output in place but not journaled) and verify."""
    try:
        if os.path.getsize(path) == 0:
            return False
    except OSError:
        return False
    return not path.endswith(".gz") or gzip_stream_intact(path) is None


def outputs_present(
    names_in_out: set[str], case_id: str, file_ending: str, save_probabilities: bool, writer: str | None = None
) -> bool:
    """Every file of the case is in OUT, by name (`names_in_out`: one listing of OUT, so that a
    check of thousands of cases costs one directory read)."""
    return all(name in names_in_out for name in case_outputs(case_id, file_ending, save_probabilities, writer))


def move_into_place(src_dir: str, out: str, names: list[str]) -> None:
    """Move a case's files from its export folder into OUT, in order, each with the sidecars its
    writer left beside it there (Tiff3DIO's CASE.json, before CASE.tif): one case's files are
    placed together, the segmentation last, whether or not `names` lists the sidecars."""
    for name in names:
        sidecars = [s for s in output_sidecar_candidates(name) if s not in names]
        for moved in [*(s for s in sidecars if os.path.isfile(os.path.join(src_dir, s))), name]:
            os.replace(os.path.join(src_dir, moved), os.path.join(out, moved))


def write_json_atomically(path: str, content: dict, scratch_dir: str) -> None:
    """An identical file is left alone, so a resumed run touches nothing."""
    try:
        with open(path) as f:
            if json.load(f) == content:
                return
    except (OSError, ValueError):
        pass
    write_text_atomically(path, json.dumps(content, indent=4, sort_keys=False), scratch_dir)


def write_text_atomically(path: str, text: str, scratch_dir: str) -> None:
    os.makedirs(scratch_dir, exist_ok=True)
    scratch = os.path.join(scratch_dir, os.path.basename(path) + f".{os.getpid()}.partial")
    with open(scratch, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(scratch, path)


def write_run_metadata(out: str, scratch: str, model_folder: str, predict_args: dict | None) -> None:
    """The three files every nnUNetv2_predict run leaves in OUT, written atomically (N manual
    parts race on them; SLURM nodes write identical content). A run that ends in an ensemble or
    postprocessing gets no predict_from_raw_data_args.json (`predict_args` None)."""
    for name in ("dataset.json", "plans.json"):
        with open(os.path.join(model_folder, name)) as f:
            write_json_atomically(os.path.join(out, name), json.load(f), scratch)
    if predict_args is None:
        return
    write_json_atomically(
        os.path.join(out, "predict_from_raw_data_args.json"), dict(sorted(predict_args.items())), scratch
    )


def clear_tmp(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
