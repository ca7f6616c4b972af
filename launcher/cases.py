"""Case discovery exactly as nnU-Net does it, plus the checks nnU-Net leaves to a crash."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from launcher.errors import LauncherError

_CHANNEL_SUFFIX_LEN = 5  # "_XXXX"


@dataclass(frozen=True)
class Case:
    id: str
    files: tuple[str, ...]  # one per channel, in channel order

    @property
    def size_bytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)


def discover(input_folder: str, file_ending: str, num_channels: int) -> list[Case]:
    """Cases sorted like nnU-Net's np.unique of the names with `_XXXX<file_ending>` cropped.

    Files without the file ending are skipped, as nnU-Net does. A file with the ending but not
    nnU-Net's channel naming, or a case missing a channel, is an error here: nnU-Net itself
    would die mid-run with "Background workers died".
    """
    return discover_with_skipped(input_folder, file_ending, num_channels)[0]


def discover_with_skipped(input_folder: str, file_ending: str, num_channels: int) -> tuple[list[Case], list[str]]:
    """discover(), plus the names of the files nnU-Net would skip silently (another ending)."""
    if not os.path.isdir(input_folder):
        raise LauncherError(missing_folder("input folder", input_folder, "-i takes the folder of scans"))
    with os.scandir(input_folder) as entries:
        listing = [(e.name, e.is_file(), e.is_dir()) for e in entries]
    names = sorted(n for n, is_file, _ in listing if is_file and n.endswith(file_ending))
    skipped = sorted(n for n, is_file, _ in listing if is_file and not n.endswith(file_ending))
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
    for name in names:
        match = channel_file.fullmatch(name)
        if not match:
            raise LauncherError(
                f"{name!r} in the input folder does not follow nnU-Net's naming "
                f"CASE_XXXX{file_ending} (XXXX = channel number)"
            )
        channels.setdefault(match.group(1), {})[int(match.group(2))] = os.path.join(input_folder, name)
    cases = []
    for case_id in sorted(channels):
        found = channels[case_id]
        for channel in range(num_channels):
            if channel not in found:
                raise LauncherError(
                    f"case {case_id!r} is missing channel {channel:04d} "
                    f"({case_id}_{channel:04d}{file_ending}); the model expects "
                    f"{num_channels} channel(s)"
                )
        extra = sorted(set(found) - set(range(num_channels)))
        if extra:
            raise LauncherError(
                f"case {case_id!r} has channel {extra[0]:04d}, but the model expects only {num_channels} channel(s)"
            )
        cases.append(Case(case_id, tuple(found[c] for c in range(num_channels))))
    return cases, skipped


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
