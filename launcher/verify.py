"""After a SLURM array: does every case of the input have a complete output? Merges the nodes'
journals into OUT/.nnunet-launch/summary.json and cases.csv and names what is missing with the
one command that finishes it (shell-quoted: OUT may hold any character but a line break).

It runs after every array task ended (afterany), so no launcher writes a journal any more and
reading the journals directly is safe on any filesystem (see status.py)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from launcher.cases import discover
from launcher.config import RunConfig
from launcher.outputs import case_outputs, node_state_dirs, output_complete, state_dir
from launcher.planning import available_cores
from launcher.report import write_report_files
from launcher.scheduler import static_parts
from launcher.slurm import resubmit_command, verify_command
from launcher.status import status_and_cases


def _incomplete(out: str, ids: list[str], names_of) -> list[str]:
    """The cases whose outputs are not all complete. zlib releases the GIL while it inflates, so
    threads read outputs in parallel: every core works on an archive of thousands of outputs."""

    def complete(case_id: str) -> bool:
        return all(output_complete(os.path.join(out, n)) for n in names_of(case_id))

    with ThreadPoolExecutor(max_workers=available_cores()) as pool:
        return [c for c, ok in zip(ids, pool.map(complete, ids), strict=True) if not ok]


def verify(config: RunConfig, nodes: int, parts_per_node: int) -> tuple[int, list[str]]:
    """(exit code, lines to print)."""
    out, model = config.output_folder, config.model
    found = discover(
        config.input_folder, model.file_ending, model.num_channels, config.skip_bad_inputs, model.reader_writer
    )
    ids = [c.id for c in found]
    missing = _incomplete(
        out, ids, lambda c: case_outputs(c, model.file_ending, config.save_probabilities, model.reader_writer)
    )
    if node_state_dirs(out):
        merged, rows = status_and_cases(out)
        write_report_files(state_dir(out), merged, rows, 0 if not missing else 1, None)
    if not missing:
        return 0, [f"nnunet-launch verify: all {len(ids)} case(s) have complete outputs in {out}"]
    parts = static_parts(ids, nodes * parts_per_node)
    node_of = {c: k // parts_per_node for k, part in enumerate(parts) for c in part}
    to_rerun = sorted({node_of[c] for c in missing})
    shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
    return 1, [
        f"nnunet-launch verify: {len(missing)} of {len(ids)} case(s) have no complete output: {shown}",
        f"finish them with: {resubmit_command(out, to_rerun)}",
        f"once they ended, check again with: {verify_command(out)}",
    ]
