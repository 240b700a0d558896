"""Code that runs on some ranks only never calls a collective (a static check of every module).

Under DDP, ``Trainer.log_dir`` (a broadcast), ``strategy.broadcast``, ``barrier``, ``reduce_boolean_decision``,
``all_gather``/``all_reduce``, checkpoint saving and our own ``agree_run_dir`` must be reached by every process;
behind an ``is_global_zero`` test they deadlock (issue 19: three end-of-run hooks read ``trainer.log_dir`` after
``if not trainer.is_global_zero: return``). ``tests/commands/test_ddp_cli.py`` runs the real thing on 2 processes; this
test names the line at once, for every hook, including ones no run reaches.
"""

from __future__ import annotations

import ast
from pathlib import Path

import xright_pl

COLLECTIVES = {
    "log_dir", "broadcast", "barrier", "reduce_boolean_decision", "all_gather", "all_reduce", "reduce",
    "save_checkpoint", "save_last_checkpoint", "_save_last_checkpoint", "_save_topk_checkpoint", "check_agreement",
    "agree_run_dir", "weights_sha256",  # weights_sha256 gathers FSDP2 shards (full_tensor) on every rank
    "full_tensor", "evaluate_losses",  # evaluate_losses runs the validation forwards (FSDP2 all-gathers)
}  # fmt: skip
#: Tests that select some ranks.
RANK_TESTS = ("global_zero", "global_rank", "local_rank", "node_rank")


def _mentions_rank(node: ast.AST) -> bool:
    names = (ast.unparse(n) for n in ast.walk(node) if isinstance(n, (ast.Attribute, ast.Name)))
    return any(t in name for name in names for t in RANK_TESTS)


def _name(n: ast.AST) -> str | None:
    return n.attr if isinstance(n, ast.Attribute) else n.id if isinstance(n, ast.Name) else None


def _names(node: ast.AST, calls: set[str] = frozenset()) -> list[tuple[int, str]]:
    """``(line, name)`` of every collective in ``node``: a name of :data:`COLLECTIVES` anywhere (``log_dir`` is a
    property), a name of ``calls`` where it is called (a local variable of the same name is no call)."""
    out = []
    for n in ast.walk(node):
        if _name(n) in COLLECTIVES:
            out.append((n.lineno, _name(n)))
        elif isinstance(n, ast.Call) and _name(n.func) in calls:
            out.append((n.lineno, _name(n.func)))
    return out


def collective_functions(tree: ast.AST) -> set[str]:
    """The functions and methods of a module that reach a collective, directly or through another function of
    the same module (by name: ``self.run_dir(...)`` reaching ``trainer.log_dir``)."""
    bodies = {fn.name: fn for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))}
    reach: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, fn in bodies.items():
            if name not in reach and any(n != name for _, n in _names(fn, reach)):
                reach.add(name)
                changed = True
    return reach


def _collectives_in(nodes: list[ast.stmt], reach: set[str]) -> list[tuple[int, str]]:
    return [found for stmt in nodes for found in _names(stmt, reach)]


def rank_only_collectives(source: str) -> list[tuple[int, str]]:
    """``(line, name)`` of every collective reached on some ranks only: in the body of an ``if`` that tests the
    rank (``is_global_zero``, ``global_rank``, ...), or after an ``if ...: return`` guard on it in the same block;
    calls of the module's own functions that reach one count too (:func:`collective_functions`)."""
    found = []
    tree = ast.parse(source)
    reach = collective_functions(tree)
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        blocks = [fn.body]
        while blocks:
            body = blocks.pop()
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.If) and _mentions_rank(stmt.test):
                    if stmt.body and isinstance(stmt.body[-1], ast.Return):
                        found += _collectives_in(body[i + 1 :], reach)  # the rest runs on some ranks only
                        found += _collectives_in(stmt.body, reach)
                        break
                    found += _collectives_in(stmt.body, reach) + _collectives_in(stmt.orelse, reach)
                    continue
                for field in ("body", "orelse", "finalbody"):
                    inner = getattr(stmt, field, None)
                    if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                        blocks.append(inner)
                for handler in getattr(stmt, "handlers", []):
                    blocks.append(handler.body)
    return sorted(set(found))


def test_no_rank_only_collective_in_the_package():
    offenders = []
    for path in sorted(Path(xright_pl.__file__).parent.rglob("*.py")):
        for line, name in rank_only_collectives(path.read_text()):
            offenders.append(f"{path.relative_to(Path(xright_pl.__file__).parent.parent)}:{line}: {name}")
    assert not offenders, "collectives in rank-only code:\n" + "\n".join(offenders)


def test_the_check_finds_the_pattern_of_issue_19():
    """The end-of-run hooks as they were: a guard, then ``trainer.log_dir`` (directly, or through a method of the
    same module, as ``RunSummary.run_dir``); and a broadcast inside an ``if``."""
    before = """
def on_train_end(self, trainer, pl_module):
    if not self.enabled or not trainer.is_global_zero or not self.points:
        return
    run_dir = trainer.log_dir or trainer.default_root_dir
    fig.savefig(run_dir)

def other(trainer):
    if trainer.is_global_zero:
        path = trainer.strategy.broadcast(path)
    trainer.strategy.barrier()

class Summary:
    def run_dir(self, trainer):
        return trainer.log_dir or trainer.default_root_dir

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        path = self.run_dir(trainer)
"""
    assert rank_only_collectives(before) == [(5, "log_dir"), (10, "broadcast"), (20, "run_dir")]
