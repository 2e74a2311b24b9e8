"""`storyfarm simulate`: the real placement policy on a virtual clock, for capacity planning.

An ops engineer sizing a farm asks "how long will tonight's 1000 stories take on 8 GPUs, and which
expert placement should we run?"; the answer comes from the same Scheduler the daemon uses, with a
cost model instead of GPUs (scheduler/simulate.py), in seconds of CPU.
"""

from __future__ import annotations

import json


def add_simulate_parser(sub) -> None:
    sim = sub.add_parser("simulate", help="simulate the scheduler on a virtual clock (capacity planning)")
    sim.add_argument("--stories", type=int, default=100, help="stories in the batch (default 100)")
    sim.add_argument("--shots-per-story", type=int, default=10, help="shots per story (default 10)")
    sim.add_argument("--gpus", type=int, default=8, help="GPUs (default 8)")
    sim.add_argument("--policy", default="both", choices=("both", "swap", "pipeline"),
                     help="expert placement: both resident, swap at the boundary, or a two-GPU pipeline")
    sim.add_argument("--base-s", type=float, default=60.0, help="seconds per shot with no memory (default 60)")
    sim.add_argument("--growth", type=float, default=0.06, help="extra cost per memory frame, as a fraction (default 0.06)")
    sim.add_argument("--swap-s", type=float, default=4.0, help="seconds per expert swap (default 4)")
    sim.add_argument("--jitter", type=float, default=0.1, help="random spread of shot times (default 0.1)")
    sim.add_argument("--failure-rate", type=float, default=0.0, help="chance an attempt fails (default 0)")
    sim.add_argument("--deadline-s", type=float, help="batch deadline, seconds from the start")
    sim.add_argument("--priorities", type=int, default=1, help="spread stories over this many priorities")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--json", action="store_true", help="print the report as JSON")
    sim.set_defaults(run=cmd_simulate)


def cmd_simulate(args, console) -> int:
    from storyfarm.scheduler.simulate import SimConfig, simulate

    try:
        report = simulate(SimConfig(
            stories=args.stories, shots_per_story=args.shots_per_story, gpus=args.gpus, policy=args.policy,
            base_s=args.base_s, growth_per_memory_frame=args.growth, swap_s=args.swap_s, jitter=args.jitter,
            failure_rate=args.failure_rate, deadline_s=args.deadline_s, priorities=args.priorities, seed=args.seed,
        ))
    except ValueError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        return 2
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    r = report
    lines = [
        f"{r.stories} stories x {r.shots_per_story} shots on {r.gpus} GPUs, expert placement {r.policy}",
        f"makespan      {r.makespan_s / 3600:8.2f} h  ({r.makespan_s:.0f} s)",
        f"lower bound   {r.lower_bound_s / 3600:8.2f} h  (makespan / bound = {r.makespan_over_bound:.4f})",
        f"GPU use       {100 * r.gpu_utilisation:8.2f} %",
        f"affinity hits {100 * r.affinity_hit_rate:8.2f} %  {r.placements}",
        f"failures      {r.failed_attempts} attempts, {r.failed_stories} stories failed for good",
        f"ETA error     {r.eta_mean_abs_error_s:8.1f} s mean ({100 * r.eta_mean_rel_error:.2f} %)",
    ]
    if r.deadline_hits is not None:
        lines.append(f"deadline      {r.deadline_hits} of {r.stories} stories finished in time")
    lines.append(f"simulated in  {r.wall_s:.2f} s")
    console.print("\n".join(lines), markup=False, highlight=False)
    return 0
