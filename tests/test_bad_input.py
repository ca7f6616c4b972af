"""Every bad invocation: exit 2, one line on stderr, no traceback, OUT untouched."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import cli

FAKE_GPUS = [
    {"index": 0, "uuid": "GPU-aaaa", "name": "H100", "memory_total": 1, "memory_used": 0},
    {"index": 1, "uuid": "GPU-bbbb", "name": "H100", "memory_total": 1, "memory_used": 0},
]


@pytest.fixture
def world(tiny, tmp_path):
    """A scratch copy of the inputs and model that a row may break, and an OUT with user files."""
    inputs = tmp_path / "inputs"
    shutil.copytree(tiny["inputs"], inputs)
    model = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    shutil.copytree(tiny["model"], model)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep me.txt").write_text("the user's file")
    fake = tmp_path / "gpus.json"
    fake.write_text(json.dumps(FAKE_GPUS))
    return {"inputs": inputs, "model": model, "out": out, "tmp": tmp_path, "fake": fake}


def _cascade(w):
    plans = json.loads((w["model"] / "plans.json").read_text())
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    cascade = w["tmp"] / "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres"
    shutil.copytree(w["model"], cascade)
    (cascade / "plans.json").write_text(json.dumps(plans))
    return cascade


def _base(w, **change):
    args = {"-i": w["inputs"], "-o": w["out"], "-m": w["model"], "-f": "0", "-device": "cpu"}
    args.update(change)
    return [str(x) for k, v in args.items() if v is not None for x in (k, v)]


def _with_config(w, text: str) -> list[str]:
    """The base arguments with --config of a TOML file holding `text`."""
    config = w["tmp"] / "c.toml"
    config.write_text(text)
    return _base(w) + ["--config", str(config)]


# (id, how to break the world, extra args, env, words the message must contain)
ROWS = [
    ("input missing", lambda w: _base(w, **{"-i": w["tmp"] / "nope"}), {}, "does not exist"),
    (
        "input is a file",
        lambda w: _base(w, **{"-i": w["inputs"] / "case_000_0000.nii.gz"}),
        {},
        "is a file, not a folder; -i takes the folder of scans",
    ),
    (
        "previous stage for a model without one",
        lambda w: _base(w) + ["-prev_stage_predictions", str(w["tmp"])],
        {},
        "configuration '3d_fullres' has no previous stage",
    ),
    ("dry run flag", lambda w: _base(w) + ["--dry-run"], {}, "`nnunet-launch plan` with the same arguments"),
    (
        "input empty",
        lambda w: (w["tmp"] / "empty").mkdir() or _base(w, **{"-i": w["tmp"] / "empty"}),
        {},
        "no file ending in '.nii.gz'",
    ),
    (
        "no file with the ending",
        lambda w: [p.rename(p.with_suffix(".mha")) for p in w["inputs"].iterdir()] and _base(w),
        {},
        "no file ending in",
    ),
    (
        "missing channel",
        lambda w: (w["inputs"] / "case_003_0000.nii.gz").rename(w["inputs"] / "case_003_0001.nii.gz") and _base(w),
        {},
        "'case_003' is missing channel 0000",
    ),
    (
        "bad file name",
        lambda w: (w["inputs"] / "scan.nii.gz").write_bytes(b"") or _base(w),
        {},
        "does not follow nnU-Net's naming",
    ),
    (
        "every bad file name and missing channel at once",
        lambda w: (
            [(w["inputs"] / n).write_bytes(b"") for n in ("scan.nii.gz", "x_1.nii.gz")]
            and (w["inputs"] / "case_003_0000.nii.gz").rename(w["inputs"] / "case_003_0001.nii.gz")
            and _base(w)
        ),
        {},
        "3 input problem(s): 'scan.nii.gz' does not follow nnU-Net's naming CASE_XXXX.nii.gz (XXXX = channel "
        "number); 'x_1.nii.gz' does not follow nnU-Net's naming CASE_XXXX.nii.gz (XXXX = channel number); "
        "case 'case_003' is missing channel 0000 (case_003_0000.nii.gz); the model expects 1 channel(s); "
        "--skip-bad-inputs predicts the rest",
    ),
    ("model missing", lambda w: _base(w, **{"-m": w["tmp"] / "no model"}), {}, "does not exist"),
    ("fold missing", lambda w: _base(w, **{"-f": "3"}), {}, "folds with checkpoint_final.pth: 0"),
    (
        "checkpoint missing",
        lambda w: _base(w) + ["-chk", "checkpoint_best.pth"],
        {},
        "checkpoints found: checkpoint_final.pth",
    ),
    ("configuration missing", lambda w: _base(w) + ["-c", "2d"], {}, "configuration '2d' is not in"),
    ("out is input", lambda w: _base(w, **{"-o": w["inputs"]}), {}, "inside the input folder"),
    ("out inside input", lambda w: _base(w, **{"-o": w["inputs"] / "sub"}), {}, "inside the input folder"),
    ("out under a file", lambda w: _base(w, **{"-o": w["out"] / "keep me.txt" / "x"}), {}, "is not a folder"),
    ("workers 0", lambda w: _base(w) + ["--workers", "0"], {}, "--workers must be an integer >= 1"),
    ("step size 0", lambda w: _base(w) + ["-step_size", "0"], {}, "-step_size must be in (0, 1]"),
    ("step size 1.5", lambda w: _base(w) + ["-step_size", "1.5"], {}, "-step_size must be in (0, 1]"),
    ("negative retries", lambda w: _base(w) + ["--case-retries", "-1"], {}, "--case-retries must be"),
    ("negative restarts", lambda w: _base(w) + ["--max-restarts", "-2"], {}, "--max-restarts must be"),
    ("bad device", lambda w: _base(w, **{"-device": "tpu"}), {}, "'tpu' is not one of 'cuda', 'cpu'"),
    ("bad schedule", lambda w: _base(w) + ["--schedule", "fifo"], {}, "'fifo' is not one of 'dynamic', 'static'"),
    ("hang timeout nan", lambda w: _base(w) + ["--hang-timeout", "nan"], {}, "--hang-timeout must be a finite"),
    ("hang timeout inf", lambda w: _base(w) + ["--hang-timeout", "inf"], {}, "--hang-timeout must be a finite"),
    (
        "hang timeout nan in a config file",
        lambda w: _with_config(w, "hang_timeout = nan\n"),
        {},
        "--hang-timeout must be a finite number of seconds > 0, got nan",
    ),
    ("bad profile", lambda w: _base(w) + ["--profile", "turbo"], {}, "'turbo' is not one of 'exact', 'fast'"),
    (
        "bad profile in a config file",
        lambda w: _with_config(w, 'profile = "turbo"\n'),
        {},
        "--profile must be exact or fast, got 'turbo'",
    ),
    (
        "part id out of range",
        lambda w: _base(w) + ["-num_parts", "2", "-part_id", "2"],
        {},
        "-part_id must be in 0..1 for -num_parts 2",
    ),
    (
        "fresh in a config file",
        lambda w: _with_config(w, "fresh = true\n"),
        {},
        "'fresh' cannot be a setting",
    ),
    ("unknown flag", lambda w: _base(w) + ["--turbo"], {}, "No such option '--turbo'"),
    ("not a number", lambda w: _base(w) + ["--workers", "two"], {}, "'two' is not a valid integer"),
    ("cuda without nvml", lambda w: _base(w, **{"-device": "cuda"}), {}, "-device cpu --workers N"),
    ("gpu absent", lambda w: _base(w, **{"-device": "cuda"}) + ["--gpus", "5"], {"fake": 1}, "not on this machine"),
    (
        "gpu hidden",
        lambda w: _base(w, **{"-device": "cuda"}) + ["--gpus", "1"],
        {"fake": 1, "CUDA_VISIBLE_DEVICES": "0"},
        "CUDA_VISIBLE_DEVICES='0' hides",
    ),
    ("cascade without previous stage", lambda w: _base(w, **{"-m": _cascade(w)}), {}, "needs -prev_stage_predictions"),
    (
        "cascade with missing previous-stage files",
        lambda w: _base(w, **{"-m": _cascade(w)}) + ["-prev_stage_predictions", str(w["tmp"])],
        {},
        "-prev_stage_predictions lacks 12 case(s)",
    ),
    (
        "-d without nnUNet_results",
        lambda w: _base(w, **{"-m": None}) + ["-d", "1", "-c", "3d_fullres"],
        {"nnUNet_results": ""},
        "nnUNet_results",
    ),
    (
        "-d unknown dataset",
        lambda w: _base(w, **{"-m": None}) + ["-d", "7", "-c", "3d_fullres"],
        {"nnUNet_results": "TMP"},
        "dataset '7' not found",
    ),
    (
        "config unknown key",
        lambda w: _with_config(w, "wrokers = 2\n"),
        {},
        "unknown key 'wrokers'",
    ),
    (
        "config not toml",
        lambda w: _with_config(w, "workers = = 2\n"),
        {},
        "not valid TOML",
    ),
    (
        "predictions not made by the launcher",
        lambda w: (w["out"] / "case_000.nii.gz").write_bytes(b"x") and _base(w),
        {},
        "--continue_prediction",
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
@pytest.mark.parametrize("command", ["run", "plan"])
def test_bad_invocation_exits_2_with_one_line_and_leaves_out_untouched(world, row, command):
    _, make_args, env, words = row
    args = make_args(world)
    env = {k: str(world["tmp"]) if v == "TMP" else v for k, v in env.items()}
    if env.pop("fake", None):
        env["NNUNET_LAUNCH_FAKE_GPUS"] = str(world["fake"])
    before = sorted(os.listdir(world["out"]))
    result = cli(command, *args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert words in result.stderr
    assert sorted(os.listdir(world["out"])) == before
    assert result.stdout == ""


def test_config_file_supplies_settings_and_flags_win(world):
    config = world["tmp"] / "run.toml"
    config.write_text('device = "cpu"\nworkers = 3\nfolds = ["0"]\n')
    args = ["-i", str(world["inputs"]), "-o", str(world["out"]), "-m", str(world["model"])]
    from_file = json.loads(cli("plan", *args, "--config", str(config), "--json").stdout)
    assert from_file["num_parts"] == 3
    overridden = json.loads(cli("plan", *args, "--config", str(config), "--workers", "2", "--json").stdout)
    assert overridden["num_parts"] == 2


def test_a_refused_resume_writes_nothing_into_out_not_even_the_lock(world):
    from conftest import fake_env

    args = _base(world)
    first = cli("run", *args, env=fake_env(world["tmp"]))
    assert first.returncode == 0, first.stderr
    state = world["out"] / ".nnunet-launch"
    before = {p: p.stat().st_mtime_ns for p in state.rglob("*")} | {
        p: p.stat().st_mtime_ns for p in world["out"].iterdir()
    }
    for command in ("run", "plan"):
        refused = cli(command, *args, "-step_size", "0.7", env=fake_env(world["tmp"]))
        assert refused.returncode == 2 and "different step_size (0.5, now 0.7)" in refused.stderr
    after = {p: p.stat().st_mtime_ns for p in state.rglob("*")} | {
        p: p.stat().st_mtime_ns for p in world["out"].iterdir()
    }
    assert after == before


def test_an_output_folder_that_cannot_be_created_is_one_line_and_exit_2_for_run_and_plan(world):
    result = cli("run", *_base(world, **{"-o": "/proc/no such process/out"}))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "cannot create the output folder" in result.stderr
    a_file = world["tmp"] / "a file"
    a_file.write_text("")
    for command in ("run", "plan"):  # plan refuses what run refuses, writing nothing to find out
        result = cli(command, *_base(world, **{"-o": str(a_file / "out")}))
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "is not a folder" in result.stderr


# --- gzip inputs that are whole although their last trailer does not size the file ---------------
def _bgzf(data: bytes) -> bytes:
    """What bgzip writes: gzip members of at most 64 KiB, each with a "BC" extra field, and an
    empty member at the end."""
    import struct
    import zlib

    out = b""
    for start in range(0, len(data), 65280):
        chunk = data[start : start + 65280]
        deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        body = deflate.compress(chunk) + deflate.flush()
        header = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", 6) + b"BC"
        out += header + struct.pack("<HH", 2, 25 + len(body)) + body + struct.pack("<II", zlib.crc32(chunk), len(chunk))
    return out + bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")


def test_multi_member_and_trailing_byte_inputs_are_read_like_nnunets_reader_and_not_inflated_at_start(
    tmp_path, monkeypatch
):
    """bgzip'ed inputs (many members) are whole, but the last trailer sizes only the last member:
    they were inflated in full in the supervisor before anything started (about 25 min for 1,000
    CTs). A BGZF header is recognised in its first 18 bytes and the full check left to the
    preprocessing helper. Bytes after a complete stream are ignored, as SimpleITK (zlib) does."""
    import gzip

    import numpy as np
    import SimpleITK as sitk

    from launcher import planning
    from launcher.cases import discover
    from launcher.headers import gzip_stream_intact

    volume = np.random.default_rng(0).normal(size=(20, 30, 40)).astype(np.float32)
    plain = tmp_path / "plain.nii"
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(plain))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    raw = plain.read_bytes()
    files = {
        "bgzf_0000.nii.gz": _bgzf(raw),
        "trailing_0000.nii.gz": gzip.compress(raw) + b"bytes after the stream",
        "members_0000.nii.gz": gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]),
        "cut_0000.nii.gz": gzip.compress(raw)[:-2000],
    }
    for name, content in files.items():
        (inputs / name).write_bytes(content)
        readable = name != "cut_0000.nii.gz"
        assert (gzip_stream_intact(str(inputs / name)) is None) == readable, name
        if readable:  # what nnU-Net's SimpleITK reader makes of it: the whole image
            assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(inputs / name))), volume), name

    inflated = []
    real = planning.gzip_stream_intact
    monkeypatch.setattr(planning, "gzip_stream_intact", lambda path: inflated.append(path) or real(path))
    _, _, broken = planning.survey(discover(str(inputs), ".nii.gz", 1))
    checked = sorted(p.rsplit("/", 1)[1] for p in inflated)  # trailers that disagree: all but BGZF's
    assert checked == ["cut_0000.nii.gz", "members_0000.nii.gz", "trailing_0000.nii.gz"]
    assert list(broken) == ["cut"], "a concatenation and trailing bytes are whole"
