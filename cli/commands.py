"""Every ``crucible`` command: the module that defines it and its one-line help.

The table lets ``crucible --help`` list the commands, and ``crucible list`` build its parser,
without importing the other commands' modules (the Lab, the colouring kernels, numba): a
command line imports only the group it names. Each group's ``add_commands`` takes its help
lines from here (:func:`help_of`), so the listing and the command's own ``--help`` agree;
a test holds the table equal to what the groups define, in the same order.
"""

from __future__ import annotations

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("cli.demo", "run a small supervised tree that shows restarts"),
    "run": ("cli.run", "run an experiment spec in the foreground"),
    "color": ("cli.run", "colour a DIMACS graph (the full pipeline, checked)"),
    "list": ("cli.runs", "list the runs in an artifacts folder"),
    "export": ("cli.runs", "export a run to CSV, JSONL or Parquet"),
    "compare": ("cli.runs", "statistical comparison of two runs on one metric"),
    "sync": (
        "cli.runs",
        "send to the history what runs that ended hold in their files and it lacks "
        "(events a stop could not send, a missing run record)",
    ),
    "monitor": ("cli.monitor", "follow a run from its files: --tail, --summary, --follow"),
    "set": ("cli.spec", "set spec values (validated; comments and layout kept)"),
    "get": ("cli.spec", "print a spec value (defaults filled in)"),
    "show": ("cli.spec", "print the whole effective spec"),
    "tune": ("cli.tuning", "propose starting parameters from prior runs and new trials (Optuna TPE)"),
    "ab": ("cli.tuning", "A/B: hypertune on vs off over N seeds, with statistics"),
    "instances": ("cli.instances", "list the DIMACS instances shipped with the package"),
    "lab": ("cli.lab", "the lab daemon: a queue of experiments behind the dashboard's API"),
    "submit": ("cli.client", "queue a spec on a lab daemon"),
    "ls": ("cli.client", "list a lab daemon's experiments and its queue"),
    "pause": ("cli.client", "pause an experiment of a lab daemon"),
    "resume": ("cli.client", "resume an experiment of a lab daemon"),
    "stop": ("cli.client", "stop (or cancel, when queued) an experiment of a lab daemon"),
    "steer": ("cli.client", "set a control of a running experiment of a lab daemon (KEY=VALUE)"),
    "open": ("cli.client", "print a new sign-in link to a dashboard (each link works once)"),
}
"""command -> (its module, its help), in the order ``crucible --help`` lists them."""

GROUPS: tuple[str, ...] = tuple(dict.fromkeys(module for module, _ in COMMANDS.values()))
"""The command modules, each once, in the table's order."""


def help_of(command: str) -> str:
    """The one-line help of ``command`` (a KeyError for a command the table lacks: add it)."""
    return COMMANDS[command][1]
