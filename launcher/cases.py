"""Case discovery exactly as nnU-Net does it, plus the checks nnU-Net leaves to a crash."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from launcher.errors import LauncherError
from launcher.readers_writers import reader_writer


@dataclass(frozen=True)
class Case:
    id: str
    files: tuple[str, ...]  # one per channel, in channel order

    @property
    def size_bytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)


def discover(
    input_folder: str, file_ending: str, num_channels: int, skip_bad: bool = False, writer: str | None = None
) -> list[Case]:
    """Cases sorted like nnU-Net's np.unique of the names with `_XXXX<file_ending>` cropped.

    Files without the file ending are skipped, as nnU-Net does. A file with the ending but not
    nnU-Net's channel naming, or a case missing a channel, is an error here: nnU-Net itself
    would die mid-run with "Background workers died". `writer`: plans.json's image_reader_writer
    (an RGB .png of NaturalImage2DIO is one file for three channels).
    """
    return discover_with_skipped(input_folder, file_ending, num_channels, skip_bad, writer)[0]


def discover_with_skipped(
    input_folder: str, file_ending: str, num_channels: int, skip_bad: bool = False, writer: str | None = None
) -> tuple[list[Case], list[str], list[str]]:
    """discover(), plus the names of the files nnU-Net would skip silently (another ending, and
    not a file the model's reader/writer `writer` reads with a case, as Tiff3DIO's CASE.json), and
    with `skip_bad` (--skip-bad-inputs) the input problems left out instead of refused: misnamed
    files and cases whose channels are not the model's, one line each."""
    rw = reader_writer(writer)
    if not os.path.isdir(input_folder):
        raise LauncherError(missing_folder("input folder", input_folder, "-i takes the folder of scans"))
    with os.scandir(input_folder) as entries:
        listing = [(e.name, e.is_file(), e.is_dir()) for e in entries]
    names = sorted(n for n, is_file, _ in listing if is_file and n.endswith(file_ending))
    others = sorted(n for n, is_file, _ in listing if is_file and not n.endswith(file_ending))
    if not names:
        folders = sorted(
            n for n, _, is_dir in listing if is_dir and _has_scans(os.path.join(input_folder, n), file_ending)
        )
        hint = f"; scans are in its subfolder {folders[0]!r}: give that folder to -i" if folders else ""
        raise LauncherError(
            f"input folder {input_folder!r} has no file ending in {file_ending!r} (the model's file_ending){hint}"
        )
    channel_file = re.compile(r"(.*)_(\d{4})" + re.escape(file_ending))
    channels: dict[str, dict[int, str]] = {}
    misnamed = []
    for name in names:
        match = channel_file.fullmatch(name)
        if not match:
            misnamed.append(name)
            continue
        channels.setdefault(match.group(1), {})[int(match.group(2))] = os.path.join(input_folder, name)
    read_with = {rw.input_sidecar(os.path.basename(found[min(found)])) for found in channels.values()}
    skipped = [n for n in others if n not in read_with]
    naming = f"nnU-Net's naming CASE_XXXX{file_ending} (XXXX = channel number)"
    cases, problems = [], [f"{name!r} does not follow {naming}" for name in misnamed]
    for case_id in sorted(channels):
        found = channels[case_id]
        # one RGB(A) file holds several channels (NaturalImage2DIO): files 0000.. up to the model's
        files = max(found) + 1 if rw.multichannel_files and max(found) < num_channels else num_channels
        missing = [c for c in range(files) if c not in found]
        extra = sorted(set(found) - set(range(num_channels)))
        if missing:
            problems.append(
                f"case {case_id!r} is missing channel {missing[0]:04d} ({case_id}_{missing[0]:04d}{file_ending})"
            )
        elif extra:
            problems.append(f"case {case_id!r} has channel {extra[0]:04d}")
        else:
            cases.append(Case(case_id, tuple(found[c] for c in range(files))))
    if problems and not skip_bad:  # every one at once, misnamed files and channels: fixed in one go
        raise LauncherError(
            f"{len(problems)} input problem(s): {_some(problems, quote=False)}; the model expects "
            f"{num_channels} channel(s); --skip-bad-inputs predicts the rest"
        )
    return cases, skipped, problems


SHOWN = 5


def _some(items: list[str], quote: bool = True) -> str:
    """The first few of `items`, and how many more: one line however many there are."""
    shown = "; ".join(repr(i) if quote else i for i in items[:SHOWN])
    return shown + (f" (and {len(items) - SHOWN} more)" if len(items) > SHOWN else "")


def _has_scans(folder: str, file_ending: str) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(e.name.endswith(file_ending) for e in entries)
    except OSError:
        return False


def missing_folder(what: str, path: str, hint: str) -> str:
    """Why `path` is no folder: absent, or a file where a folder was wanted."""
    if os.path.exists(path):
        return f"{what} {path!r} is a file, not a folder; {hint}"
    return f"{what} {path!r} does not exist"
