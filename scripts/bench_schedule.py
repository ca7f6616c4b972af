"""Scheduling policy, simulated (the pure scheduler, no processes).

Makespan / lower bound (max(total work / slots, largest case)) for nnU-Net's static strided
split vs the launcher's dynamic largest-first queue (with the lookahead workers really hold),
for 2, 4, 8 slots and 200 to 5,000 cases.

Case sizes: CT volumes of 512 x 512 x S voxels with S drawn like KiTS19's imaging (210 public
kidney CT scans with 29 to 1,059 slices each, per the KiTS19 challenge paper): a lognormal
with median 110 slices and sigma 0.75, clipped to [29, 1059]. The per-case table is not bundled
(no network here); the range is KiTS19's, the shape of the distribution is our assumption.
Work is taken as proportional to voxels (nnU-Net's sliding window and export both scale so).

    python scripts/bench_schedule.py [--seeds 5]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics

from launcher.scheduler import DYNAMIC_PLAN_LOOKAHEAD, lower_bound, simulate_dynamic, simulate_static


def kits19_like_work(num_cases: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    work = {}
    for i in range(num_cases):
        slices = min(1059, max(29, round(rng.lognormvariate(4.70, 0.75))))  # e^4.70 ~ 110
        work[f"case_{i:05d}"] = 512 * 512 * slices
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    print(
        f"# bench_schedule on {platform.node()} ({platform.processor() or platform.machine()}), "
        f"seeds={args.seeds}, lookahead={DYNAMIC_PLAN_LOOKAHEAD}"
    )
    print("| cases | slots | static / bound (mean, worst) | dynamic / bound (mean, worst) |")
    print("|---:|---:|---:|---:|")
    worst_dynamic = 0.0
    for num_cases in (200, 1000, 5000):
        for slots in (2, 4, 8):
            static, dynamic = [], []
            for seed in range(args.seeds):
                work = kits19_like_work(num_cases, seed)
                bound = lower_bound(work, slots)
                static.append(simulate_static(work, slots) / bound)
                dynamic.append(simulate_dynamic(work, slots, DYNAMIC_PLAN_LOOKAHEAD)[0] / bound)
            worst_dynamic = max(worst_dynamic, max(dynamic))
            print(
                f"| {num_cases} | {slots} | {statistics.mean(static):.3f}, {max(static):.3f} "
                f"| {statistics.mean(dynamic):.4f}, {max(dynamic):.4f} |"
            )
    print(
        f"\nworst dynamic / bound: {worst_dynamic:.4f} (target <= 1.03): "
        f"{'met' if worst_dynamic <= 1.03 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
