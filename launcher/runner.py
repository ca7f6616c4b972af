"""One `run`: plan, open OUT (lock, journal, resume or fresh), supervise, report."""

from __future__ import annotations

import importlib
import os
import platform
import shlex
import signal
import sqlite3
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import psutil

from launcher.config import RunConfig, RunIdentity, output_identity, run_state_dir
from launcher.errors import LauncherError
from launcher.exits import EXIT_INTERNAL_ERROR, exit_code_of
from launcher.journal import DONE, Journal, JournalRow, JournalWriteError, OutLock, lock_holder, refuse_if_held
from launcher.model_check import Models
from launcher.notify import notify_finished
from launcher.outputs import (
    case_outputs,
    clear_tmp,
    journal_path,
    lock_path,
    logs_dir,
    numbered_state_dirs,
    outputs_present,
    stages_dir,
    state_dir,
    tmp_dir,
    write_run_metadata,
    write_text_atomically,
)
from launcher.picture import write_picture
from launcher.planning import Plan, checkpoint_bytes, make_plan, memory_warning
from launcher.processes import Prestarted, spawn_context
from launcher.progress import Reporter, wants_live_view
from launcher.report import summary_lines, write_summary
from launcher.scheduler import CaseBook, OutFacts, foreign_outputs
from launcher.stages import describe_stages, split_unit, stage_of
from launcher.status import dead_run_line, last_seen_alive, run_states
from launcher.supervisor import Supervisor


def run(config: RunConfig, argv: list[str]) -> int:
    # A closed ssh session or tmux window (SIGHUP) must not end the run, from its first step to its
    # report; what it prints there is best effort (launcher/terminal.py).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    prestarted = Prestarted()
    try:
        return _run(config, argv, prestarted)
    finally:
        prestarted.close()  # those the supervisor did not take: a refusal, a stop, no work


def _run(config: RunConfig, argv: list[str], prestarted: Prestarted) -> int:
    plan = make_plan(config)
    view = inspect_out(config, plan)  # refusals first: exit 2 writes nothing into OUT
    state = run_state_dir(config)
    if nothing_to_predict(config, view):  # a rerun of a finished OUT: no run, its report stays
        summary = os.path.join(state, "summary.json")
        print(f"nnunet-launch: nothing to predict: all {len(plan.cases)} case(s) are done in "
              f"{config.output_folder} (the last run's report: {summary})")  # fmt: skip
        return 0
    refuse_if_held(lock_path(state))  # a busy OUT is said at once, not after the model check
    models = Models.of_config(config)
    prestarted.start(spawn_context(), plan.slots, plan.threads, models)  # they write nothing before their cases
    # matplotlib (the run's picture at the end) is imported while the run goes on, so that the
    # run's last output and its exit are not a second apart
    threading.Thread(target=_import_quietly, args=("matplotlib.backends.backend_agg",), daemon=True).start()
    prestarted.check_model(models)  # a model that cannot load is refused before any worker gets a case
    try:
        os.makedirs(state, exist_ok=True)
    except OSError as exc:
        raise LauncherError(f"cannot create the output folder {config.output_folder!r}: {exc.strerror}") from None
    lock = OutLock(lock_path(state))
    lock.acquire()
    exit_code = EXIT_INTERNAL_ERROR
    try:
        _refuse_running_neighbour(config, state)
        journal = Journal.open(journal_path(state))
        try:
            exit_code = _supervise(config, plan, journal, view, argv, prestarted)
            return exit_code
        finally:
            journal.close()
    except LauncherError:
        exit_code = None  # refused before the run started: nothing to tell
        raise
    except BaseException as exc:
        exit_code = exit_code_of(exc)  # what the process exits with (cli.main), --on-finish is told too
        raise
    finally:
        lock.release()
        # a SLURM array's task is one share of the run, requeued perhaps: the verify job after the
        # array tells --on-finish, once (verify.py)
        if config.on_finish and exit_code is not None and config.node is None:
            notify_finished(config.on_finish, config.output_folder, state, exit_code)


def _import_quietly(module: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError:
        pass  # said where it is needed


def nothing_to_predict(config: RunConfig, view: OutView) -> bool:
    """Every planned unit is done and whole in OUT (and --fresh was not asked), and the last run
    wrote its report (one killed before it gets a run that writes it, predicting nothing)."""
    book = view.book
    return not config.fresh and view.reported and bool(book.work) and len(book.done) == len(book.work)


@dataclass(frozen=True)
class OutView:
    """What OUT holds for this run, read without writing anything (run and plan share it)."""

    strays: list[str]  # planned cases whose segmentation is in OUT (journaled or not)
    complete: set[str]  # ... whose every output is there (with probabilities: .npz and .pkl too)
    book: CaseBook  # the case book this run starts from (CaseBook.resume of the journal, read-only)
    fresh_would_delete: list[str]  # the files --fresh would remove
    reported: bool = False  # the last run ended and wrote its report

    @property
    def done(self) -> set[str]:
        """Cases whose final output is done and whole in OUT."""
        return self.book.done & set(self.strays)


def inspect_out(config: RunConfig, plan: Plan) -> OutView:
    """Refuse what `run` must refuse (exit 2, nothing written): predictions not made by the
    launcher without --continue_prediction/--fresh, or a run with other output-changing settings
    without --fresh. Reads the journal read-only."""
    _refuse_running_neighbour(config, run_state_dir(config))
    _refuse_uncreatable(config.output_folder)
    strays, complete = _existing_outputs(config, plan)
    path = journal_path(run_state_dir(config))
    previous, rows, ended = None, {}, False
    if os.path.isfile(path):
        journal = Journal.open_readonly(path)
        try:
            previous, rows, ended = journal.identity(), journal.book_rows(), journal.last_run_ended()
        finally:
            journal.close()
    _refuse_other_run(config, previous)
    placed_beside = _placed_by_other_shares(config, output_identity(config))
    _refuse_foreign(config, [c for c in foreign_outputs(rows, strays) if c not in placed_beside])
    journaled_done = {c for c, row in rows.items() if row.state == DONE}
    fresh = _fresh_targets(config, plan, journaled_done) if config.fresh else []
    if config.fresh:
        strays, complete, rows = [], set(), {}
    reported = ended and os.path.isfile(os.path.join(run_state_dir(config), "summary.json"))
    return OutView(strays, complete, resume_book(plan, rows, strays, complete), fresh, reported)


def _placed_by_other_shares(config: RunConfig, identity: RunIdentity) -> set[str]:
    """Cases whose outputs another share of this OUT placed (a plain run beside `-part_id k` runs,
    which take turns): journaled done in another state folder by a run of the same model and
    settings. They are the launcher's, not another tool's: kept once they decode."""
    mine = run_state_dir(config)
    placed: set[str] = set()
    if config.node is not None:  # a SLURM node owns its share: no other share placed its cases
        return placed
    for _, node, folder in run_states(config.output_folder):
        # SLURM nodes' journals are left alone: they may be written on other hosts now (status.py)
        if folder == mine or node is not None or not os.path.isfile(journal_path(folder)):
            continue
        try:
            journal = Journal.open_readonly(journal_path(folder))
            try:
                theirs = journal.identity()
                if theirs is not None and not RunIdentity.from_json(theirs).diff(identity):
                    placed |= {c for c, row in journal.book_rows().items() if row.state == DONE}
            finally:
                journal.close()
        except (LauncherError, sqlite3.Error):
            continue  # unreadable: its outputs are not vouched for
    return placed


def resume_book(plan: Plan, rows: dict[str, JournalRow], strays: list[str], complete: set[str]) -> CaseBook:
    """The case book a run starts from: the journal's rows and OUT's facts (read here, decided by
    CaseBook.resume)."""
    journaled_done = {c for c, row in rows.items() if row.state == DONE}
    facts = OutFacts(
        # an output with a file missing (a .npz, Tiff3DIO's .json) is predicted again, not verified
        present=frozenset(c for c in strays if c in complete),
        vanished=frozenset(_vanished(plan, journaled_done, complete)),
        broken={u: why for c, why in plan.broken.items() for u in _units_of(plan, c)},
    )
    static = plan.part_of() if plan.schedule == "static" else None
    return CaseBook.resume(plan.unit_work(), rows, facts, plan.part_of(), static, plan.unit_deps, time.time())


def _refuse_uncreatable(out: str) -> None:
    """OUT must be creatable where it is: `plan` says so as `run` would, writing nothing to find
    out (the nearest folder that exists must be writable, on a filesystem mounted read-write)."""
    path = os.path.abspath(out)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return  # config.py refuses an OUT inside a file, naming it
    if not os.access(path, os.W_OK | os.X_OK) or os.statvfs(path).f_flag & os.ST_RDONLY:
        raise LauncherError(f"cannot create the output folder {out!r}: {path!r} is not writable")


def _refuse_foreign(config: RunConfig, foreign: list[str]) -> None:
    if foreign and not (config.continue_prediction or config.fresh):
        raise LauncherError(
            f"output folder already holds {len(foreign)} prediction(s) not made by "
            f"nnunet-launch (e.g. {foreign[0]!r}); add --continue_prediction to keep the "
            "ones that decode completely, or --fresh to predict everything again"
        )


def stage_facts(plan: Plan, view: OutView) -> dict:
    """`plan`'s view of a multi-stage run: what runs per case, and per stage what is done."""
    per_stage: dict[str, dict[str, int]] = {}
    for case_id in plan.cases:
        final_done = case_id in view.done
        for unit in plan.stages.units(case_id):
            counts = per_stage.setdefault(stage_of(unit, plan.stages), {"done": 0, "total": 0})
            counts["total"] += 1
            counts["done"] += final_done or unit in view.book.done
    return {"stages": describe_stages(plan.stages), "per_stage": per_stage}


def _refuse_running_neighbour(config: RunConfig, state: str) -> None:
    """A plain run and `-part_id k` runs predict the same cases into one OUT: they do not run at
    once (SLURM nodes own their shares and are not concerned)."""
    if config.node is not None:
        return
    out = config.output_folder
    plain = state_dir(out)
    others = [path for _, path in numbered_state_dirs(out, "part-")] if state == plain else [plain]
    for other in others:
        pid = lock_holder(lock_path(other))
        if pid is not None:
            what = "a plain run" if other == plain else f"-part_id {other.rsplit('-', 1)[1]}"
            raise LauncherError(
                f"{what} of this output folder is running (pid {pid}); a plain run and -num_parts/-part_id "
                "runs on one output folder take turns"
            )


def _refuse_other_run(config: RunConfig, previous: dict | None) -> None:
    """OUT holds another run's outputs: refused, naming every field that differs."""
    if previous is None or config.fresh:
        return
    refusal = identity_refusal(config.output_folder, RunIdentity.from_json(previous), output_identity(config))
    if refusal:
        raise LauncherError(refusal)


def identity_refusal(out: str, old: RunIdentity, new: RunIdentity) -> str | None:
    changed = old.diff(new)
    if not changed:
        return None
    what = "; ".join(f"{name} ({getattr(old, name)!r}, now {getattr(new, name)!r})" for name in changed)
    why = ""
    if changed == ["folds"] and sorted(old.folds) == sorted(new.folds):
        why = " (nnU-Net sums the folds' predictions in the order given, and float sums differ by order)"
    return f"{out!r} holds a run with a different {what}{why}; use another output folder, or --fresh to discard it"


def _supervise(
    config: RunConfig, plan: Plan, journal: Journal, view: OutView, argv: list[str], prestarted: Prestarted
) -> int:
    out = config.output_folder
    strays, complete = view.strays, view.complete
    identity = output_identity(config).to_json()
    previous = journal.identity()
    _refuse_other_run(config, previous)  # again under the lock: another run may have changed OUT
    if config.fresh and (previous is not None or strays):
        _discard_previous(config, journal, plan)
        strays, complete = [], set()
    started = time.time()
    state = run_state_dir(config)
    clear_tmp(tmp_dir(state))
    parts = [(s.part_id, s.label, s.gpu_uuid) for s in plan.slots]
    dead = journal.close_dead_run(last_seen_alive(state))
    run_id = journal.start_run(identity, parts, plan.unit_work())
    # the last step of the manual chain decides which of nnUNetv2_predict's files OUT gets
    predicted = plan.stages is None or not plan.stages.combines
    write_run_metadata(out, tmp_dir(state), config.model.folder, _predict_args(config, plan) if predicted else None)
    book = resume_book(plan, journal.book_rows(), strays, complete)
    journal.apply(book.startup_updates)
    os.makedirs(logs_dir(state), exist_ok=True)
    supervisor_log = os.path.join(logs_dir(state), "supervisor.log")
    reporter = Reporter(
        supervisor_log, journal, {s.gpu_uuid: s.label for s in plan.slots if s.gpu_uuid}, wants_live_view()
    )
    if dead is not None:
        reporter.log(f"nnunet-launch: {dead_run_line(dead)}")
    again = f", {book.retried} failed case(s) of the last run tried again" if book.retried else ""
    reporter.log(
        f"nnunet-launch: {len(plan.cases)} case(s), {len(book.done & set(plan.cases))} already done{again}, "
        f"{plan.num_parts} part(s) on "
        f"{', '.join(sorted({s.label for s in plan.slots}))}, {plan.schedule} schedule; per worker: "
        f"{plan.threads} torch thread(s), npp={plan.npp}, nps={plan.nps}"
    )
    if config.device == "cpu":
        reporter.log("nnunet-launch: running on the CPU (-device cpu)")
    if config.profile == "fast":
        reporter.log(
            "nnunet-launch: --profile fast: export with nnU-Net's torch resampling"
            + (" on each GPU" if config.device == "cuda" else " in the export helpers")
            + "; outputs differ from plain nnU-Net in a few voxels (agreement: README)"
        )
    if config.deterministic:
        reporter.log(
            "nnunet-launch: --deterministic: cuDNN's deterministic kernels, no autotuning (a CPU run is so already)"
        )
    if plan.stages is not None:
        reporter.log(f"nnunet-launch: stages per case: {describe_stages(plan.stages)}")
    if config.num_parts > 1:
        reporter.log(
            f"nnunet-launch: -num_parts {config.num_parts} -part_id {config.part_id}: only this part of nnU-Net's "
            f"split ({len(plan.cases)} case(s)), on every local worker; state in {state}"
        )
    host_memory = memory_warning(
        plan,
        config.model.num_channels,
        config.model.num_labels,
        psutil.virtual_memory().available,
        checkpoint_bytes(config),
    )
    for warning in [*plan.warnings, *([host_memory] if host_memory else [])]:
        reporter.log(f"nnunet-launch: warning: {warning}")
    for case_id, why in sorted((c, why) for c, why in plan.broken.items() if c not in book.done):
        reporter.log(f"nnunet-launch: case {case_id}: {why}; not predicted")
    exit_code = EXIT_INTERNAL_ERROR
    supervisor = None
    try:
        supervisor = Supervisor(config, plan, journal, book, reporter, run_id, prestarted)
        exit_code = supervisor.run()
    except BaseException as exc:
        exit_code = exit_code_of(exc)
        if exit_code == EXIT_INTERNAL_ERROR:
            reporter.log("nnunet-launch: internal error:\n" + traceback.format_exc().rstrip())
        else:
            reporter.log(f"nnunet-launch: stopped: {exc}")
        raise
    finally:
        intermediates = supervisor.books.intermediates if supervisor else None
        facts = {"intermediate_peak_bytes": intermediates.peak} if intermediates else {}
        facts["skipped_inputs"] = plan.bad_inputs  # --skip-bad-inputs: named in the summary and the report
        _finish(config, journal, reporter, run_id, exit_code, started, argv, facts)
    return exit_code


def _units_of(plan: Plan, case_id: str) -> list[str]:
    return list(plan.stages.units(case_id)) if plan.stages else [case_id]


def _vanished(plan: Plan, done: set[str], in_out: set[str]) -> set[str]:
    """Units journaled done whose outputs someone removed since. A member's outputs matter only
    while a unit that needs them is not done (then they are removed on purpose)."""
    vanished = {c for c in plan.cases if c in done and c not in in_out}
    if plan.stages is None:
        return vanished
    for case_id in plan.cases:
        if case_id in done and case_id not in vanished:
            continue
        units = plan.stages.units(case_id)
        for unit in reversed(list(units)):  # what needs a unit comes after it
            member, _ = split_unit(unit)
            if member is None or unit not in done:
                continue
            needed = any(unit in needs and (u not in done or u in vanished) for u, needs in units.items())
            if needed and not all(os.path.isfile(p) for p in plan.stages.member_outputs(member, case_id)):
                vanished.add(unit)
    return vanished


def _finish(
    config: RunConfig, journal: Journal, reporter, run_id: int, exit_code: int, started: float, argv, facts: dict
) -> None:
    """Close the run's books. Best-effort: on a full disk the journal or the report may not be
    writable, and that must not hide why the run stopped."""
    state = run_state_dir(config)
    try:
        journal.end_run(run_id, exit_code)
    except JournalWriteError as exc:
        reporter.log(f"nnunet-launch: {exc}")
    reporter.close()
    try:
        summary = write_summary(state, journal, exit_code, started, {**_run_facts(config, argv), **facts})
    except OSError as exc:
        print(f"nnunet-launch: could not write the run's summary: {exc}", file=sys.stderr)
        return
    try:  # the picture of the run is a bonus: it never changes how the run ends
        picture = write_picture(state, journal)[0]
    except Exception as exc:  # noqa: BLE001 - matplotlib, the disk, anything
        reporter.append_to_file([f"nnunet-launch: could not draw the run's picture: {exc}"])
        picture = None
    hint = "nnunet-launch " + shlex.join(resume_argv(argv))
    lines = summary_lines(summary, config.output_folder, state, hint, picture)
    for line in lines:
        print(line, file=sys.stderr if exit_code else sys.stdout, flush=True)
    reporter.append_to_file(lines)


def _run_facts(config: RunConfig, argv: list[str]) -> dict:
    """What summary.json records about the run, so that a result can be traced to its model."""
    from importlib import metadata

    versions = {}
    for package in ("nnunet-launch", "nnunetv2", "torch"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    stages = config.stages
    return {
        "command": ["nnunet-launch", *argv],
        # absolute: a summary read later, elsewhere, still names the folders
        "input_folder": os.path.abspath(config.input_folder),
        "output_folder": os.path.abspath(config.output_folder),
        "working_directory": os.getcwd(),
        "host": platform.node(),
        **({"stages": stages.identity()} if stages else {}),
        "model_folder": os.path.abspath(config.model.folder),
        "configuration": config.model.configuration,
        "folds": list(config.model.folds),
        "checkpoint": config.checkpoint,
        "profile": config.profile,
        "deterministic": config.deterministic,
        "versions": versions,
    }


def resume_argv(argv: list[str]) -> list[str]:
    """The command that resumes this run: the same, less what must not happen twice (--fresh
    would discard the outputs this run just made)."""
    return [a for a in argv if a != "--fresh"]


def _existing_outputs(config: RunConfig, plan: Plan) -> tuple[list[str], set[str]]:
    """The cases whose segmentation is already in OUT (journaled or not), and of those the ones
    whose every output is (a deleted .npz or .pkl makes a finished case unfinished)."""
    ending, writer = config.model.file_ending, config.model.reader_writer
    out = config.output_folder
    if not os.path.isdir(out):
        return [], set()
    present = set(os.listdir(out))
    strays = sorted(c for c in plan.cases if c + ending in present)
    return strays, {c for c in strays if outputs_present(present, c, ending, config.save_probabilities, writer)}


def _fresh_targets(config: RunConfig, plan: Plan, journaled_done: set[str]) -> list[str]:
    """The output files --fresh removes: this plan's cases' outputs and those of every case the
    previous run finished (with probabilities, whatever it was asked)."""
    ending, out, writer = config.model.file_ending, config.output_folder, config.model.reader_writer
    names = {n for c in plan.cases for n in case_outputs(c, ending, config.save_probabilities, writer)}
    # no member units
    names |= {n for c in journaled_done if "/" not in c for n in case_outputs(c, ending, True, writer)}
    return sorted(n for n in names if os.path.isfile(os.path.join(out, n)))


FRESH_NAMES_SHOWN = 20


def describe_fresh(names: list[str], listed_in: str | None) -> str:
    """What --fresh deletes, by name: the first few, and where all of them are listed."""
    if not names:
        return "no output file"
    more = f", ... and {len(names) - FRESH_NAMES_SHOWN} more" if len(names) > FRESH_NAMES_SHOWN else ""
    where = f" (all of them listed in {listed_in})" if listed_in else ""
    return f"{len(names)} output file(s): {', '.join(names[:FRESH_NAMES_SHOWN])}{more}{where}"


def _discard_previous(config: RunConfig, journal: Journal, plan: Plan) -> None:
    out = config.output_folder
    targets = _fresh_targets(config, plan, set(journal.cases_in_state(DONE)))
    listed_in = None
    if targets:  # a record of what was deleted, before anything is
        logs = logs_dir(run_state_dir(config))
        os.makedirs(logs, exist_ok=True)
        listed_in = os.path.join(logs, f"fresh-deleted-{time.strftime('%Y%m%d-%H%M%S')}.txt")
        write_text_atomically(listed_in, "".join(f"{name}\n" for name in targets), tmp_dir(run_state_dir(config)))
    print(f"nnunet-launch: --fresh: deleting {describe_fresh(targets, listed_in)} in {out}", flush=True)
    removed = 0
    for name in targets:
        try:
            os.remove(os.path.join(out, name))
            removed += 1
        except FileNotFoundError:
            pass
    journal.clear()
    clear_tmp(stages_dir(run_state_dir(config)))
    print(f"nnunet-launch: --fresh: discarded the previous run's state and {removed} output file(s) in {out}")


def _predict_args(config: RunConfig, plan: Plan) -> dict:
    """What nnUNetv2_predict records in predict_from_raw_data_args.json, for the whole run."""
    return {
        "list_of_lists_or_source_folder": config.input_folder,
        "output_folder_or_list_of_truncated_output_files": config.output_folder,
        "save_probabilities": config.save_probabilities,
        "overwrite": not config.continue_prediction,
        "num_processes_preprocessing": plan.npp,
        "num_processes_segmentation_export": plan.nps,
        "folder_with_segs_from_prev_stage": config.prev_stage_predictions,
        # nnU-Net's split as the user asked for it (a whole run: 1 part, part 0), not the launcher's workers
        "num_parts": config.num_parts,
        "part_id": config.part_id,
    }
