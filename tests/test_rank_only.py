"""Code that runs on some ranks only never calls a collective (a static check of every module).

Under DDP, ``Trainer.log_dir`` (a broadcast), ``strategy.broadcast``, ``barrier``, ``reduce_boolean_decision``,
``all_gather``/``all_reduce``, checkpoint saving and our own ``agree_run_dir`` must be reached by every process;
behind an ``is_global_zero`` test they deadlock (issue 19: three end-of-run hooks read ``trainer.log_dir`` after
``if not trainer.is_global_zero: return``). ``tests/test_ddp_cli.py`` runs the real thing on 2 processes; this
test names the line at once, for every hook, including ones no run reaches.
"""

from __future__ import annotations

import ast
from pathlib import Path

import xright_pl

COLLECTIVES = {
    "log_dir", "broadcast", "barrier", "reduce_boolean_decision", "all_gather", "all_reduce", "save_checkpoint",
    "agree_run_dir", "weights_sha256",  # weights_sha256 gathers FSDP2 shards (full_tensor) on every rank
}  # fmt: skip


def _mentions_rank(node: ast.AST) -> bool:
    return any(isinstance(n, (ast.Attribute, ast.Name)) and "global_zero" in ast.unparse(n) for n in ast.walk(node))


def _collectives_in(nodes: list[ast.stmt]) -> list[tuple[int, str]]:
    found = []
    for stmt in nodes:
        for n in ast.walk(stmt):
            name = n.attr if isinstance(n, ast.Attribute) else n.id if isinstance(n, ast.Name) else None
            if name in COLLECTIVES:
                found.append((n.lineno, name))
    return found


def rank_only_collectives(source: str) -> list[tuple[int, str]]:
    """``(line, name)`` of every collective reached on some ranks only: in the body of an ``if`` that tests
    ``is_global_zero``, or after an ``if ...is_global_zero...: return`` guard in the same block."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        blocks = [fn.body]
        while blocks:
            body = blocks.pop()
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.If) and _mentions_rank(stmt.test):
                    if stmt.body and isinstance(stmt.body[-1], ast.Return):
                        found += _collectives_in(body[i + 1 :])  # the rest of the block runs on some ranks only
                        found += _collectives_in(stmt.body)
                        break
                    found += _collectives_in(stmt.body) + _collectives_in(stmt.orelse)
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
    """The end-of-run hook as it was: a guard, then ``trainer.log_dir``; and a broadcast inside an ``if``."""
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
"""
    assert rank_only_collectives(before) == [(5, "log_dir"), (10, "broadcast")]
