"""One `run`: plan, open OUT (lock, journal, resume or fresh), supervise, report."""

from __future__ import annotations

import os
import shlex
import sys
import time

import psutil

from launcher.config import RunConfig, output_identity
from launcher.errors import LauncherError
from launcher.journal import DONE, Journal, OutLock
from launcher.outputs import case_outputs, clear_tmp, journal_path, state_dir, tmp_dir, write_run_metadata
from launcher.planning import Plan, make_plan, memory_warning
from launcher.report import summary_lines, write_summary
from launcher.supervisor import Supervisor


def log(message: str) -> None:
    print(message, flush=True)


def run(config: RunConfig, argv: list[str]) -> int:
    plan = make_plan(config)
    out = config.output_folder
    strays = _existing_outputs(config, plan)
    had_state = os.path.isdir(state_dir(out))
    if strays and not had_state and not (config.continue_prediction or config.fresh):
        raise LauncherError(
            f"output folder already holds {len(strays)} prediction(s) not made by "
            f"nnunet-launch (e.g. {strays[0]!r}); add --continue_prediction to keep the "
            "ones that decode completely, or --fresh to predict everything again"
        )
    os.makedirs(state_dir(out), exist_ok=True)
    lock = OutLock(os.path.join(state_dir(out), "lock"))
    lock.acquire()
    try:
        journal = Journal.open(journal_path(out))
        try:
            return _supervise(config, plan, journal, strays, argv)
        finally:
            journal.close()
    finally:
        lock.release()


def _supervise(config: RunConfig, plan: Plan, journal: Journal, strays: list[str], argv: list[str]) -> int:
    out = config.output_folder
    identity = output_identity(config)
    previous = journal.identity()
    if previous is not None and previous != identity:
        if not config.fresh:
            key = next(k for k in identity if previous.get(k) != identity.get(k))
            raise LauncherError(
                f"{out!r} holds a run with a different {key} ({previous.get(key)!r}, now "
                f"{identity[key]!r}); use another output folder, or --fresh to discard it"
            )
    if config.fresh and (previous is not None or strays):
        _discard_previous(config, journal, plan)
        strays = []
    started = time.time()
    clear_tmp(tmp_dir(out))
    run_id = journal.start_run(identity, [(s.part_id, s.label, s.gpu_uuid) for s in plan.slots], plan.part_of())
    write_run_metadata(out, config.model.folder, _predict_args(config, plan))
    done = set(journal.cases_in_state(DONE))
    vanished = sorted(done - set(_existing_outputs(config, plan)))
    if vanished:  # journaled done, but someone removed the output since: predict it again
        journal.reopen_cases(vanished)
        done -= set(vanished)
    verify = {c for c in strays if c not in done}
    log(
        f"nnunet-launch: {len(plan.cases)} case(s), {len(done)} already done, {plan.num_parts} part(s) on "
        f"{', '.join(sorted({s.label for s in plan.slots}))}; per worker: {plan.threads} torch thread(s), "
        f"npp={plan.npp}, nps={plan.nps}"
    )
    if config.device == "cpu":
        log("nnunet-launch: running on the CPU (-device cpu)")
    warning = memory_warning(
        plan, config.model.num_channels, config.model.num_labels, psutil.virtual_memory().available
    )
    if warning:
        print(f"nnunet-launch: {warning}", file=sys.stderr, flush=True)
    exit_code = 2
    try:
        exit_code = Supervisor(config, plan, journal, verify, log).run()
    finally:
        journal.end_run(run_id, exit_code)
        summary = write_summary(out, journal, exit_code, started)
        hint = "nnunet-launch " + shlex.join(argv)
        for line in summary_lines(summary, out, hint):
            print(line, file=sys.stderr if exit_code else sys.stdout, flush=True)
    return exit_code


def _existing_outputs(config: RunConfig, plan: Plan) -> list[str]:
    """Cases whose segmentation is already in OUT (journaled or not)."""
    ending = config.model.file_ending
    out = config.output_folder
    if not os.path.isdir(out):
        return []
    present = set(os.listdir(out))
    return sorted(c for c in plan.cases if c + ending in present)


def _discard_previous(config: RunConfig, journal: Journal, plan: Plan) -> None:
    out = config.output_folder
    names = {n for c in plan.cases for n in case_outputs(c, config.model.file_ending, config.save_probabilities)}
    names |= {n for c in journal.cases_in_state(DONE) for n in case_outputs(c, config.model.file_ending, True)}
    removed = 0
    for name in sorted(names):
        try:
            os.remove(os.path.join(out, name))
            removed += 1
        except FileNotFoundError:
            pass
    journal.clear()
    log(f"nnunet-launch: --fresh: discarded the previous run's state and {removed} output file(s) in {out}")


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
        "num_parts": plan.num_parts,
        "part_id": None,  # every part ran under nnunet-launch
    }
