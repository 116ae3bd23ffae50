"""``hardtovary coinrun``: behavioural cloning on CoinRun (paper §3.3, App. B.6), in three stages, each a
module with ``add_arguments(parser)`` and ``run(args)``:

* ``label``: the planning expert labels frames of training and test levels (:mod:`.coinrun.labelling`);
* ``train``: ResNet-18 clones from a label folder with Adam and the temporal AND-mask (:mod:`.coinrun.cmd_train`);
* ``search``: TPE search of both methods with optuna (:mod:`.coinrun.cmd_search`).
"""

from __future__ import annotations

import importlib

from hardtovary.experiments import options, runtime

#: stage -> (module, help line)
STAGES = {
    "label": ("hardtovary.experiments.coinrun.cmd_label",
              "label frames of training and test levels with the planning expert"),
    "train": ("hardtovary.experiments.coinrun.cmd_train",
              "clone the expert with Adam and the temporal AND-mask, test KL on unseen levels"),
    "search": ("hardtovary.experiments.coinrun.cmd_search",
               "TPE search (optuna) of each method's hyperparameters, a Table 3-style listing"),
}


def add_arguments(parser) -> None:
    options.describe(parser, (
        "Behavioural cloning on Procgen's CoinRun (paper §3.3): 'label' makes a label folder with the planning "
        "expert, 'train' clones it with Adam and the temporal AND-mask (Algorithm 1), 'search' tunes both with "
        "TPE. Needs Procgen for 'label' only. See docs/experiments.md."))
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (module_name, help_line) in STAGES.items():
        sub = stages.add_parser(name, help=help_line)
        module = importlib.import_module(module_name)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
        runtime.add_threads_option(sub)
