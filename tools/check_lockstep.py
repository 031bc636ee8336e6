"""Check that the training scripts stay in lockstep (docs/conventions.md, "Shape of a script").

Each script is self-contained, so the plumbing they share is copied into every one of them; this check keeps the
copies honest. Two checks, both on the exact source text (nothing is normalised: whitespace, comments and docstrings
count):

1. Twins (`TWINS`) differ only in their network section (from its `# Networks: ...` banner to the next banner), their
   `Args` class and their module docstring. Everything else is compared line by line and every difference is printed
   as a unified diff with both files' line numbers. The `Args` fields both twins declare must also have the same type
   and default (their docstrings may differ).
2. A top-level function, class, assignment or `if __name__ == "__main__":` block defined under one name in two or
   more of the six scripts (`SCRIPTS`), outside their network sections, has one text in all of them, unless its name
   is in `MEANT_TO_DIFFER` with the reason. The text of a definition runs from its first decorator to its last line,
   so its docstring and the comments inside it are compared too (a drifted docstring is a drifted specification);
   comments above a definition are not part of it. A name in `MEANT_TO_DIFFER` whose copies are all the same, or
   that fewer than two scripts define, is reported too, so that the list stays short.

Usage: python tools/check_lockstep.py [ROOT]   (ROOT: the folder holding the scripts, default this repository)
Exit code 0 when everything is in lockstep; 1 with the report on stdout otherwise; 2 when a script is missing, does
not parse or has no single network section (one line on stderr).
"""

import ast
import difflib
import os
import re
import sys
from collections import defaultdict

SCRIPTS = (
    "sac_fetch_equivariant.py",
    "sac_fetch_mlp.py",
    "dqn_snake_equivariant.py",
    "dqn_snake_cnn.py",
    "ppo_atari.py",
    "rpo_mujoco.py",
)
TWINS = (("sac_fetch_equivariant.py", "sac_fetch_mlp.py"), ("dqn_snake_equivariant.py", "dqn_snake_cnn.py"))

# Names that several scripts define with a different text on purpose, each with the reason. Twins still share each of
# these (check 1 compares everything outside their network sections).
MEANT_TO_DIFFER = {
    "Args": "each script's own arguments",
    "SUPPORTED_ENV_IDS": "each environment family's own ids",
    "make_env": "each environment family's own wrappers",
    "make_vector_env": "each environment family's own vector env (ale-py's, sync or async gymnasium)",
    "validate_args": "each script's own argument checks",
    "ENV_COST": "each environment family's measured memory and build time per env (benchmarks/setup_cost.py)",
    "check_memory": "each script's own memory estimate (replay buffer and networks, or rollout)",
    "ReplayBatch": "SAC + HER's transitions with goals differ from DQN's",
    "LoopState": "the DQN scripts checkpoint mid-episode and also carry the running episodes' returns and lengths",
    "Rollout": "PPO keeps uint8 frames and int64 actions as torch tensors on the device, RPO float32 NumPy arrays",
    "new_rollout": "PPO keeps uint8 frames and int64 actions as torch tensors on the device, RPO float32 NumPy arrays",
    "compute_gae": "PPO's rollout is torch tensors, RPO's NumPy arrays (the same recursion)",
    "flatten_batch": "PPO's rollout is torch tensors, RPO's NumPy arrays moved to the device here",
    "EnvState": "Atari carries lives and episode statistics, MuJoCo the normalisation statistics",
    "env_step": "Atari's life loss and reward clipping, MuJoCo's action clipping and normalisation",
    "collect_rollout": "discrete (Atari) and Gaussian (MuJoCo) policies, normalised observations for MuJoCo",
    "autocast": "SAC's opt-in bfloat16 (--bf16) and DQN's float16 with a GradScaler (--amp, CUDA only)",
    "budget_schedules": "each algorithm's own schedules over --total-timesteps",
    "build_agent": "each algorithm's own networks and optimizers",
    "agent_state": "each algorithm's own networks, optimizers and statistics in model.pt and checkpoint.pt",
    "training_checkpoint": "each algorithm's own training state (replay buffer, rollout boundary, env states)",
    "restore_checkpoint": "the inverse of each script's training_checkpoint",
    "maybe_checkpoint": "checkpoints fall at episode ends (SAC), between vector steps (DQN) or updates (PPO, RPO)",
    "evaluate": "each environment's own episodes and metrics (success rate, score, return)",
    "evaluate_checkpoint": "each algorithm's own agent, rebuilt and evaluated",
    "run_evaluation": "each algorithm's own agent and evaluation arguments",
    "heldout_evaluation": "each algorithm's own agent and evaluation arguments",
    "log_episodes": "Fetch logs success and RecordEpisodeStatistics, Snake its own running episodes and score",
    "train": "each algorithm's own training loop",
    "main": "each algorithm's own set-up of networks, optimizers and envs",
}

BANNER = re.compile(r"# -{20,}")
TITLE = re.compile(r"# (\S.*)")
MAIN_TEST = ast.unparse(ast.parse('__name__ == "__main__"', mode="eval"))


class ScriptError(Exception):
    """A script that cannot be checked: missing, not Python, or without exactly one network section."""


class Script:
    """One script's lines, syntax tree and network section (1-based, inclusive line numbers)."""

    def __init__(self, root: str, name: str):
        path = os.path.join(root, name)
        try:
            with open(path) as f:
                self.text = f.read()
        except OSError as err:
            raise ScriptError(f"cannot read {path}: {err.strerror}") from err
        self.name, self.lines = name, self.text.splitlines(keepends=True)
        try:
            self.tree = ast.parse(self.text, filename=path)
        except SyntaxError as err:
            raise ScriptError(f"{path} does not parse: {err.msg} (line {err.lineno})") from err
        self.network = self.network_section()

    def network_section(self) -> tuple[int, int]:
        """(first, last) line of the section whose banner title starts with "Networks", up to the next banner."""
        banners = [i + 1 for i in range(len(self.lines) - 2)  # 1-based first line; self.lines[first] is the title
                   if BANNER.fullmatch(self.lines[i].rstrip("\n")) and TITLE.fullmatch(self.lines[i + 1].rstrip("\n"))
                   and BANNER.fullmatch(self.lines[i + 2].rstrip("\n"))]  # fmt: skip
        starts = [line for line in banners if self.lines[line].startswith("# Networks")]
        if len(starts) != 1:
            raise ScriptError(f"{self.name} has {len(starts)} network sections ('# Networks...' banners), not one")
        after = [line for line in banners if line > starts[0]]
        return starts[0], (after[0] - 1 if after else len(self.lines))

    def in_network(self, node: ast.AST) -> bool:
        return self.network[0] <= node.lineno <= self.network[1]

    def span(self, node: ast.AST) -> tuple[int, int]:
        """(first, last) line of a statement, its decorators included."""
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        return first, node.end_lineno

    def source(self, node: ast.AST) -> str:
        first, last = self.span(node)
        return "".join(self.lines[first - 1 : last])

    def definitions(self) -> dict:
        """name -> (line, text) of every top-level definition outside the network section; "__main__" for the
        `if __name__ == "__main__":` block."""
        found = {}
        for node in self.tree.body:
            if self.in_network(node):
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [target.id for target in targets if isinstance(target, ast.Name)]
            elif isinstance(node, ast.If) and ast.unparse(node.test) == MAIN_TEST:
                names = ["__main__"]
            else:
                names = []
            for name in names:
                found[name] = (self.span(node)[0], self.source(node))
        return found

    def args_fields(self) -> dict:
        """Field name -> "annotation = default" of the `Args` class."""
        (args,) = [node for node in self.tree.body if isinstance(node, ast.ClassDef) and node.name == "Args"]
        fields = [node for node in args.body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)]
        return {node.target.id: f"{ast.unparse(node.annotation)} = {ast.unparse(node.value) if node.value else ''}"
                for node in fields}  # fmt: skip

    def compared_lines(self) -> list[tuple[int, str]]:
        """(line number, text) of every line outside the module docstring, `Args` and the network section; each of
        those three is one placeholder line, so that the diff shows where it sits."""
        docstring = self.tree.body[0]
        skipped = {self.network: "[network section: not compared]\n"}
        if isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant):
            skipped[self.span(docstring)] = "[module docstring: not compared]\n"
        for node in self.tree.body:
            if isinstance(node, ast.ClassDef) and node.name == "Args":
                skipped[self.span(node)] = "[class Args: fields compared below]\n"
        kept, line = [], 1
        for (first, last), placeholder in sorted(skipped.items()):
            kept += [(n, self.lines[n - 1]) for n in range(line, first)] + [(first, placeholder)]
            line = last + 1
        return kept + [(n, self.lines[n - 1]) for n in range(line, len(self.lines) + 1)]


def twin_diff(a: Script, b: Script) -> list[str]:
    """Unified diff (3 lines of context, hunk headers with both files' line numbers) of the twins' compared lines,
    and one line per shared `Args` field whose type or default differs."""
    lines_a, lines_b = a.compared_lines(), b.compared_lines()
    text_a, text_b = [text for _, text in lines_a], [text for _, text in lines_b]
    report = []
    for group in difflib.SequenceMatcher(None, text_a, text_b, autojunk=False).get_grouped_opcodes(3):
        (_, i1, _, j1, _), (_, _, i2, _, j2) = group[0], group[-1]
        where = lambda lines, i, j: f"{lines[i][0]}-{lines[j - 1][0]}" if j > i else f"after {lines[i - 1][0]}"  # noqa: E731
        report.append(f"@@ {a.name}:{where(lines_a, i1, i2)} {b.name}:{where(lines_b, j1, j2)} @@\n")
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                report += [f" {text}" for text in text_a[i1:i2]]
                continue
            report += [f"-{text}" for text in text_a[i1:i2]] + [f"+{text}" for text in text_b[j1:j2]]
    fields_a, fields_b = a.args_fields(), b.args_fields()
    for field in sorted(set(fields_a) & set(fields_b)):
        if fields_a[field] != fields_b[field]:
            report.append(f"Args.{field}: {a.name} `{fields_a[field]}`, {b.name} `{fields_b[field]}`\n")
    return [line if line.endswith("\n") else line + "\n" for line in report]


def shared_definition_report(scripts: list[Script]) -> list[str]:
    """One block per name whose copies differ (unless allowed), with a diff of each variant against the most common
    one, and one line per stale `MEANT_TO_DIFFER` entry."""
    copies = defaultdict(dict)  # name -> script -> (line, text)
    for script in scripts:
        for name, found in script.definitions().items():
            copies[name][script.name] = found
    report = []
    for name, where in sorted(copies.items()):
        variants = defaultdict(list)  # text -> [script:line, ...]
        for script, (line, text) in where.items():
            variants[text].append(f"{script}:{line}")
        if name in MEANT_TO_DIFFER:
            if len(where) < 2 or len(variants) == 1:
                found = "defined once" if len(where) < 2 else "one text"
                report.append(f"{name}: listed in MEANT_TO_DIFFER but {found} in {', '.join(where)}; remove it from "
                              "the list\n")  # fmt: skip
            continue
        if len(variants) == 1:
            continue
        ranked = sorted(variants.items(), key=lambda item: -len(item[1]))
        report.append(f"{name}: {len(variants)} different texts: "
                      + "; ".join(", ".join(places) for _, places in ranked) + "\n")  # fmt: skip
        (base, base_places), *others = ranked
        for text, places in others:
            report += difflib.unified_diff(base.splitlines(keepends=True), text.splitlines(keepends=True),
                                           base_places[0], places[0])  # fmt: skip
        report.append("\n")
    return [line if line.endswith("\n") else line + "\n" for line in report]


def check(root: str) -> list[str]:
    """The whole report for the scripts in `root`; empty when they are in lockstep. Raises ScriptError."""
    scripts = {name: Script(root, name) for name in SCRIPTS}
    report = []
    for a, b in TWINS:
        diff = twin_diff(scripts[a], scripts[b])
        if diff:
            report += [f"== twins {a} and {b} differ outside their network section, Args and module docstring (or "
                       "in the type or default of an Args field both declare):\n", *diff, "\n"]  # fmt: skip
    shared = shared_definition_report(list(scripts.values()))
    if shared:
        report += ["== definitions that several scripts share, with copies that differ (reconcile them, or list the "
                   "name in MEANT_TO_DIFFER in tools/check_lockstep.py with the reason):\n", *shared]  # fmt: skip
    return report


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print(next(line for line in __doc__.splitlines() if line.startswith("Usage: ")), file=sys.stderr)
        return 2
    root = argv[0] if argv else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        report = check(root)
    except ScriptError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not report:
        print(f"lockstep: {len(TWINS)} twin pairs and the definitions shared by {len(SCRIPTS)} scripts agree")
        return 0
    sys.stdout.writelines(report)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
