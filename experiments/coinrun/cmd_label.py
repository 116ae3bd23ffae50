"""``hardtovary coinrun label``: the planning expert labels frames of training and test levels
(:mod:`hardtovary.experiments.coinrun.labelling`)."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

from hardtovary.experiments import executors, options
from hardtovary.experiments.coinrun import labelling
from hardtovary.experiments.coinrun.expert import ExpertSettings
from hardtovary.experiments.errors import UsageError, usage_errors

#: The expert's options: (type, help) per ExpertSettings field, whose defaults are the options' defaults.
_EXPERT_HELP = {
    "rollouts": (options.positive_int, "heuristic rollouts per action class; a class's value is the best of them"),
    "depth": (options.positive_int, "frames of each rollout after the class's hold"),
    "hold": (options.positive_int, "frames each decision holds its action (a state is labelled every HOLD frames)"),
    "gamma": (options.fraction, "discount per frame of the rollouts' returns"),
    "temperature": (options.positive_float, "softmax temperature of the soft targets, in reward units (the coin is "
                                            "worth 10)"),
    "epsilon": (options.fraction, "probability of a random action class at each decision, in the episodes after "
                                  "each level's first (greedy) one"),
}


def add_arguments(parser) -> None:
    options.describe(parser, (
        "Label CoinRun frames with the Monte-Carlo planning expert (paper §3.3, App. B.6; the paper's expert is "
        "PPO, ours plans on saved states). Each level is played alone (num_levels=1, easy mode) and written to "
        "OUT/<train|test>/level_<seed>.npz atomically; a killed run resumes by skipping finished levels. Prints "
        "the expert's success rates and writes OUT/results.json. Needs Procgen (the coinrun extra)."))
    parser.add_argument("--train-levels", type=options.level_range, default="0:64",
                        help="training level seeds START:STOP (the paper: 64 levels; 0:1000 for 1000)")
    parser.add_argument("--test-levels", type=options.level_range, default="1000000:1002000",
                        help="test level seeds START:STOP, disjoint from the training levels (the paper: 2000)")
    parser.add_argument("--states", type=options.positive_int, default=1000,
                        help="labelled states per training level (the paper: 1000)")
    parser.add_argument("--test-states", type=options.positive_int, default=1,
                        help="labelled states per test level (the paper: 1)")
    defaults = ExpertSettings()
    expert = parser.add_argument_group("expert")
    for field in fields(ExpertSettings):
        kind, text = _EXPERT_HELP[field.name]
        expert.add_argument(f"--{field.name}", type=kind, default=getattr(defaults, field.name), help=text)
    parser.add_argument("--seed", type=int, default=0, help="seed of the rollouts and the exploration")
    options.add_run_folder_options(parser, "runs/coinrun-labels")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    executors.add_executor_options(parser, "levels", local_workers="one per CPU")
    parser.set_defaults(interrupted="finished levels are kept in {out}; the same command resumes")


def run(args) -> int:
    overlap = set(args.train_levels) & set(args.test_levels)
    if overlap:
        raise UsageError(f"--train-levels and --test-levels share {len(overlap)} level(s), e.g. {min(overlap)}; "
                         f"test levels must be unseen")
    with usage_errors():
        settings = ExpertSettings(**{f.name: getattr(args, f.name) for f in fields(ExpertSettings)})
        executor = executors.make_executor(args, local_workers=os.cpu_count() or 1)
    results = labelling.run(args.out, train_levels=args.train_levels, test_levels=args.test_levels,
                            states=args.states, test_states=args.test_states, settings=settings, seed=args.seed,
                            executor=executor, fresh=args.fresh, progress=not args.no_progress)
    print(labelling.format_summary(results))
    print(f"\nlabels: {Path(args.out)}  (results: {Path(args.out) / 'results.json'})")
    return 0
