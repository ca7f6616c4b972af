"""Multi-stage inference: an ensemble of configurations, postprocessing, a cascade, as nnU-Net's
own chain of commands would run them, cut into units of work per (case, stage).

A stage is a member model's prediction ("2d", "3d_fullres", "3d_lowres", ...) or the final
combination (nnUNetv2_ensemble and/or nnUNetv2_apply_postprocessing). A unit's id is
"<member>/<case>" for a member's prediction (a case id never holds a "/": it is a file name)
and the plain case id for the unit whose output is the case's final output in OUT. Units of one
case depend on each other (the cascade's fullres on its lowres, the combination on every
member); the case book queues a unit once its dependencies are done. A single-stage run has one
unit per case, its id the case id, exactly as before stages existed.

No nnunetv2, no torch: validation runs before any work and must be fast, and the supervisor
never imports them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from launcher import safe_pickle
from launcher.errors import LauncherError
from launcher.outputs import case_of_output, case_outputs
from launcher.spec import Combine, WorkCase

FINAL = "final"  # the stage name of a combination unit in status and reports
COMBINE_WORK_FRACTION = 0.05  # a combination reads and writes; it does not run a network


@dataclass(frozen=True)
class Member:
    name: str  # its stage name: the configuration, or trainer__plans__configuration when ambiguous
    folder: str
    configuration: str
    previous: str | None = None  # the member whose output it needs per case (cascade)
    reader_writer: str | None = None  # its plans' image_reader_writer: what its outputs are


@dataclass(frozen=True)
class Postprocessing:
    pkl: str
    plans_json: str
    dataset_json: str  # nnU-Net takes only the file ending from it (which files to postprocess)
    digest: str  # the pkl's sha256: another file with the same path is another postprocessing


@dataclass(frozen=True)
class StagePlan:
    members: tuple[Member, ...]  # in the order they must run: a cascade's lowres before its fullres
    ensemble: tuple[str, ...]  # the members whose predictions make the final one, in the user's order
    postprocessing: Postprocessing | None
    stages_dir: str  # OUT/.nnunet-launch/stages: one folder per member
    file_ending: str
    save_probabilities: bool  # the user's: the final outputs' .npz/.pkl
    keep: bool = False  # --keep-stages
    # --profile fast: the case's final unit predicts the ensemble's members and averages them in
    # the worker (on its GPU), without member units or their .npz files
    fused: bool = False

    @property
    def combines(self) -> bool:
        """Whether a combination unit makes the final output (else the last member predicts it)."""
        return len(self.ensemble) > 1 or self.postprocessing is not None

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    def member_dir(self, name: str) -> str:
        return os.path.join(self.stages_dir, name)

    def member_outputs(self, name: str, case_id: str) -> list[str]:
        """The files a member's unit leaves in its stage folder for one case."""
        probabilities = self.member_saves_probabilities(name)
        names = case_outputs(case_id, self.file_ending, probabilities, self.member(name).reader_writer)
        return [os.path.join(self.member_dir(name), n) for n in names]

    def member_saves_probabilities(self, name: str) -> bool:
        """nnUNetv2_ensemble averages the members' .npz; a single postprocessed member's are the
        final ones when the user asks for probabilities."""
        if name not in self.ensemble:
            return False
        return len(self.ensemble) > 1 or self.save_probabilities

    def is_combination(self, unit: str) -> bool:
        """Whether the unit only combines its members' files (a fused unit predicts them)."""
        return self.combines and not self.fused and split_unit(unit)[0] is None

    def final_stage(self) -> str:
        return self.final_member() or FINAL

    def final_member(self) -> str | None:
        """The member whose unit writes the final output itself (no combination)."""
        return None if self.combines else self.ensemble[0]

    def units(self, case_id: str) -> dict[str, tuple[str, ...]]:
        """Each unit of a case and the units it needs, in an order that respects them."""
        final = self.final_member()
        units = {}
        for m in self.members:
            if self.fused and m.name in self.ensemble:  # predicted by the final unit
                continue
            needs = (unit_id(m.previous, case_id, final),) if m.previous else ()
            units[unit_id(m.name, case_id, final)] = needs
        if self.fused:
            previous = (self.member(name).previous for name in self.ensemble)
            units[case_id] = tuple(unit_id(p, case_id, None) for p in previous if p)
        elif self.combines:
            units[case_id] = tuple(unit_id(name, case_id, None) for name in self.ensemble)
        return units

    def work_case(self, unit: str, files: tuple[str, ...], verify: bool) -> WorkCase:
        """What a worker needs to run one unit: which model, where its input and output are."""
        member, case_id = split_unit(unit)
        if member is None and self.fused:
            fused = tuple((name, self._previous_output(name, case_id)) for name in self.ensemble)
            combine = self._combine(case_id)
            return WorkCase(unit, files, verify_existing=verify, name=case_id, combine=combine, fused=fused)
        if member is None and self.combines:
            return WorkCase(unit, files, verify_existing=verify, name=case_id, combine=self._combine(case_id))
        member = member or self.final_member()
        prev_stage_file = self._previous_output(member, case_id)
        if unit == case_id:  # the final output, into OUT with the run's settings
            return WorkCase(unit, files, prev_stage_file, verify, name=case_id, member=member)
        return WorkCase(
            unit,
            files,
            prev_stage_file,
            verify,
            name=case_id,
            member=member,
            out_dir=self.member_dir(member),
            save_probabilities=self.member_saves_probabilities(member),
        )

    def _previous_output(self, member: str, case_id: str) -> str | None:
        """The segmentation of a cascade member's previous stage, which its preprocessing reads."""
        previous = self.member(member).previous
        return self.member_outputs(previous, case_id)[-1] if previous else None

    def _combine(self, case_id: str) -> Combine:
        first = self.member(self.ensemble[0])
        ensemble = len(self.ensemble) > 1
        # an ensemble averages the members' .npz (listed first); a single member is postprocessed
        inputs = (
            ()
            if self.fused
            else tuple(self.member_outputs(name, case_id)[0 if ensemble else -1] for name in self.ensemble)
        )
        pp = self.postprocessing
        return Combine(
            inputs,
            ensemble,
            os.path.join(first.folder, "plans.json"),
            os.path.join(first.folder, "dataset.json"),
            pp.pkl if pp else None,
            pp.plans_json if pp else None,
        )

    def identity(self) -> dict:
        """What decides the final outputs beyond the single-model settings: a resumed run must match."""
        pp = self.postprocessing
        return {
            "members": [f"{m.name}={m.folder}" for m in self.members],
            "ensemble": list(self.ensemble),
            "postprocessing": None if pp is None else f"{pp.pkl} (sha256 {pp.digest[:16]})",
            "postprocessing_plans": None if pp is None else pp.plans_json,
            "final_stage": self.final_stage(),  # what status calls the cases' last stage
        }


def unit_id(stage: str, case_id: str, final_member: str | None) -> str:
    return case_id if stage == final_member else f"{stage}/{case_id}"


def split_unit(unit: str) -> tuple[str | None, str]:
    """(member stage, case id); the stage is None for a case's final unit."""
    stage, slash, case_id = unit.partition("/")
    return (stage, case_id) if slash else (None, unit)


def stage_of(unit: str, plan: StagePlan | None) -> str:
    """The stage's name as status and reports show it."""
    stage, _ = split_unit(unit)
    if stage is not None:
        return stage
    return "predict" if plan is None else plan.final_stage()


# --- validation --------------------------------------------------------------------------------
# a postprocessing.pkl names nnU-Net's postprocessing functions, never imported while it is checked
POSTPROCESSING_MODULE = "nnunetv2.postprocessing"


def load_postprocessing(pkl: str) -> tuple[list, list]:
    """nnU-Net's (functions, kwargs) from a postprocessing.pkl, in a worker: checked as
    read_postprocessing checks it (nothing is called while unpickling), then loaded with the same
    restrictions and the functions imported."""
    with open(pkl, "rb") as f:
        content = f.read()
    _check_postprocessing(pkl, content)
    return safe_pickle.loads(content, POSTPROCESSING_MODULE, resolve=True)


def _defines(module: str, name: str) -> bool:
    """Whether an installed module's source defines `name`, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return spec is not None
    try:
        with open(spec.origin, encoding="utf-8") as f:
            return f"def {name}(" in f.read()
    except OSError:
        return False


def read_postprocessing(pkl: str, plans_json: str, dataset_json: str) -> Postprocessing:
    """Check that `pkl` is nnU-Net's (functions, kwargs) form, without importing what it names."""
    try:
        with open(pkl, "rb") as f:
            content = f.read()
    except OSError as exc:
        raise LauncherError(f"-pp_pkl_file {pkl!r}: {exc.strerror}") from None
    _check_postprocessing(pkl, content)
    for path, flag in ((plans_json, "-plans_json"), (dataset_json, "-dataset_json")):
        if not os.path.isfile(path):
            raise LauncherError(f"{flag} {path!r} does not exist")
    return Postprocessing(
        os.path.abspath(pkl),
        os.path.abspath(plans_json),
        os.path.abspath(dataset_json),
        hashlib.sha256(content).hexdigest(),
    )


def _check_postprocessing(pkl: str, content: bytes) -> None:
    try:
        value = safe_pickle.loads(content, POSTPROCESSING_MODULE)
    except safe_pickle.NotAllowed as exc:
        raise LauncherError(
            f"-pp_pkl_file {pkl!r} names {exc}; a postprocessing file may name only nnU-Net's postprocessing "
            "functions (nnunetv2.postprocessing) and numpy scalars"
        ) from None
    except Exception as exc:
        raise LauncherError(f"-pp_pkl_file {pkl!r} is not a pickle ({type(exc).__name__}: {exc})") from None
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    functions, kwargs = value if ok else ([], [])
    ok = ok and isinstance(functions, list) and isinstance(kwargs, list) and len(functions) == len(kwargs)
    ok = ok and all(isinstance(f, safe_pickle.Reference) for f in functions)
    ok = ok and all(isinstance(k, dict) for k in kwargs)
    if not ok:
        raise LauncherError(
            f"-pp_pkl_file {pkl!r} is not nnU-Net's postprocessing form (a pickled ([functions], [kwargs]) "
            "as nnUNetv2_determine_postprocessing writes it)"
        )
    for f in functions:
        if not _defines(f.module, f.name):
            raise LauncherError(f"-pp_pkl_file {pkl!r} names {f.module}.{f.name}, which is not installed")


def member_names(specs: list[tuple[str, str, str]]) -> list[str]:
    """A member's stage name: its configuration, or trainer__plans__configuration when two members
    share a configuration."""
    configurations = [c for _, _, c in specs]
    return [c if configurations.count(c) == 1 else f"{t}__{p}__{c}" for t, p, c in specs]


class IntermediateFiles:
    """The members' outputs of a multi-stage run: how much disk they hold (the summary reports
    the peak) and their removal once a case's final output is journaled, or the case failed
    (unless --keep-stages), so that they stay bounded by the cases in flight."""

    def __init__(self, plan: StagePlan, done: set[str]):
        self.plan = plan
        self.bytes_per_case: dict[str, int] = {}
        self.now = self.peak = 0
        self.finished: list[str] = []  # cases whose final output is done (or failed), waiting for the journal
        self.failed: set[str] = set()  # cases that failed in this run: a member that still ends is removed too
        for member in plan.members:
            folder = plan.member_dir(member.name)
            os.makedirs(folder, exist_ok=True)
            for name in os.listdir(folder):  # what a stopped run left: removed, or counted
                case_id = case_of_output(name, plan.file_ending)
                path = os.path.join(folder, name)
                if case_id in done and not plan.keep:
                    _remove(path)
                else:
                    self._add(case_id, os.path.getsize(path))

    def _add(self, case_id: str, size: int) -> None:
        self.bytes_per_case[case_id] = self.bytes_per_case.get(case_id, 0) + size
        self.now += size
        self.peak = max(self.peak, self.now)

    def unit_done(self, unit: str) -> None:
        member, case_id = split_unit(unit)
        if member is not None:
            self._add(case_id, sum(_size(p) for p in self.plan.member_outputs(member, case_id)))
        if not self.plan.keep and (member is None or case_id in self.failed):
            self.finished.append(case_id)

    def case_failed(self, case_id: str) -> None:
        """The case's final unit failed: its members' outputs serve nothing (a rerun predicts them
        again with the case)."""
        self.failed.add(case_id)
        if not self.plan.keep:
            self.finished.append(case_id)

    def remove_finished(self) -> None:
        for case_id in self.finished:
            for member in self.plan.members:
                for path in self.plan.member_outputs(member.name, case_id):
                    _remove(path)
            self.now -= self.bytes_per_case.pop(case_id, 0)
        self.finished = []


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def describe_stages(plan: StagePlan) -> str:
    """One line: what runs per case, e.g. "2d + 3d_fullres -> ensemble -> postprocessing"."""
    steps = []
    for m in plan.members:
        steps.append(f"{m.previous} -> {m.name}" if m.previous else m.name)
    text = " + ".join(s for s in steps if not any(o.startswith(f"{s} -> ") for o in steps))
    if len(plan.ensemble) > 1:
        text += " -> ensemble" + (" (averaged in the worker: --profile fast)" if plan.fused else "")
    if plan.postprocessing:
        text += f" -> postprocessing ({os.path.basename(plan.postprocessing.pkl)})"
    return text
