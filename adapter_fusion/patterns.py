"""PEFT's module patterns matched as data, never as an unbounded regex in this process.

A rank_pattern/alpha_pattern key matches a module as PEFT's `get_pattern_key` does
(`re.match(rf"(.*\\.)?({key})$", module)`); a target_modules string as `check_target_module_exists`
does (`re.fullmatch(target, module)`). The keys come from clients: `(.+)+!` is a valid regex that
backtracks for minutes holding the GIL, so health, generation and SIGTERM all stall behind it.

So the forms PEFT users actually write (plain names, dotted paths, `re.escape`d literal paths as
`save_adapter` writes them, an optional leading `^` and trailing `$`) are translated into plain
string comparisons with the same result, including `.` as "any character but a newline". Anything
else is a genuine regex: it runs in a child Python process under a wall-clock and memory bound,
killed when over, and the key that did not finish is named in the error.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

_SPECIAL = set(".^$*+?{}[]\\|()")


@dataclass(frozen=True)
class PatternBounds:
    """What one adapter's patterns may cost; checked before any matching starts."""

    max_chars: int = 256  # one key (or target_modules entry); PEFT's longest real keys are module paths
    max_keys: int = 4096  # keys of rank_pattern plus alpha_pattern, entries of target_modules
    regex_time_s: float = 1.0  # wall clock for all genuine regexes of one adapter, child start included
    regex_memory_bytes: int = 512 << 20  # address space of the child that runs them


class PatternError(ValueError):
    """A pattern that cannot be used; the message names the key."""


@dataclass(frozen=True)
class _Literal:
    """A key with no regex operators: characters, None for `.` (any but a newline)."""

    chars: tuple[str | None, ...]
    anchored: bool  # a leading `^`: the match must start at the module path's start

    def _at(self, text: str, start: int) -> bool:
        for offset, want in enumerate(self.chars):
            got = text[start + offset]
            if got != want and (want is not None or got == "\n"):
                return False
        return True

    def suffix(self, module: str) -> bool:
        """`(.*\\.)?(key)$`: a whole dotted suffix; `$` also matches before a final newline."""
        ends = [len(module)] + ([len(module) - 1] if module.endswith("\n") else [])
        for end in ends:
            start = end - len(self.chars)
            if start < 0 or (start > 0 and (self.anchored or module[start - 1] != "." or "\n" in module[: start - 1])):
                continue
            if self._at(module, start):
                return True
        return False

    def full(self, module: str) -> bool:
        """`re.fullmatch(key, module)`."""
        return len(module) == len(self.chars) and self._at(module, 0)


def literal(key: str) -> _Literal | None:
    """The key as a `_Literal`, or None when it uses any regex operator beyond `.`, `^...`, `...$`."""
    anchored = key.startswith("^")
    body = key[1:] if anchored else key
    if body.endswith("$") and not body.endswith("\\$"):
        body = body[:-1]
    chars: list[str | None] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            if i + 1 == len(body) or body[i + 1].isalnum() or not body[i + 1].isascii():
                return None  # \d, \b, octal, a dangling backslash: a genuine regex (or an error)
            chars.append(body[i + 1])
            i += 2
            continue
        if c == ".":
            chars.append(None)
        elif c in _SPECIAL:
            return None
        else:
            chars.append(c)
        i += 1
    return _Literal(tuple(chars), anchored)


# Runs in the child: compile each (mode, key), then one line per key with the indices it matches.
_CHILD = r"""
import json, re, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
job = json.load(sys.stdin)
names = job["names"]
for mode, key in job["keys"]:
    try:
        pattern = re.compile(rf"(.*\.)?({key})$" if mode == "suffix" else key)
    except (re.error, RecursionError, OverflowError) as error:
        print(json.dumps({"error": str(error)}), flush=True)
        continue
    test = pattern.match if mode == "suffix" else pattern.fullmatch
    print(json.dumps({"hits": [i for i, name in enumerate(names) if test(name)]}), flush=True)
"""


def _run_regexes(keys: list[tuple[str, str, str]], names: list[str], bounds: PatternBounds) -> list[set[int]]:
    """Match (field, mode, key) regexes against `names` in a killable child; a set of indices each."""
    job = json.dumps({"keys": [(mode, key) for _, mode, key in keys], "names": names})
    command = [sys.executable, "-I", "-S", "-c", _CHILD, str(bounds.regex_memory_bytes)]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        out, _ = child.communicate(job, timeout=bounds.regex_time_s)
    except subprocess.TimeoutExpired:
        child.kill()
        out, _ = child.communicate()
    lines = out.splitlines()
    results: list[set[int]] = []
    for (field, _, key), line in zip(keys, lines + [None] * (len(keys) - len(lines))):
        if line is None:
            why = f"took longer than {bounds.regex_time_s:g} s" if child.returncode and child.returncode < 0 else "exhausted the memory bound"
            raise PatternError(f"{field} key {key[:80]!r}: matching it against the adapter's {len(names)} module names {why} (a regex that backtracks); use plain module names or dotted suffixes")
        answer = json.loads(line)
        if "error" in answer:
            raise PatternError(f"{field} key {key[:80]!r} is not a valid regular expression ({answer['error']})")
        results.append(set(answer["hits"]))
    return results


@dataclass(frozen=True)
class Resolved:
    """Per module path: the rank_pattern and alpha_pattern key that applies (None: the default),
    and whether target_modules selects it."""

    rank_key: dict[str, str | None]
    alpha_key: dict[str, str | None]
    targeted: dict[str, bool]


def _check_size(fields: dict[str, list[str]], bounds: PatternBounds) -> None:
    count = sum(len(keys) for keys in fields.values())
    if count > bounds.max_keys:
        raise PatternError(f"{' + '.join(fields)} hold {count} keys; the limit is {bounds.max_keys}")
    for field, keys in fields.items():
        for key in keys:
            if len(key) > bounds.max_chars:
                raise PatternError(f"{field} key {key[:80]!r}... is {len(key)} characters; the limit is {bounds.max_chars}")


def resolve(
    modules: list[str],
    rank_pattern: list[str],
    alpha_pattern: list[str],
    target_modules: str | list[str] | None,
    bounds: PatternBounds = PatternBounds(),
) -> Resolved:
    """Apply PEFT's matching rules to `modules` with every bound checked first (see module doc)."""
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules or [])
    _check_size({"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "target_modules": targets}, bounds)
    jobs = [("rank_pattern", "suffix", k) for k in rank_pattern] + [("alpha_pattern", "suffix", k) for k in alpha_pattern]
    if isinstance(target_modules, str) and target_modules != "all-linear":
        jobs.append(("target_modules", "full", target_modules))
    hits: dict[tuple[str, str], set[int]] = {}
    regexes = []
    for field, mode, key in jobs:
        form = literal(key)
        if form is None:
            regexes.append((field, mode, key))
        else:
            test = form.suffix if mode == "suffix" else form.full
            hits[field, key] = {i for i, name in enumerate(modules) if test(name)}
    if regexes:
        for (field, _, key), found in zip(regexes, _run_regexes(regexes, modules, bounds)):
            hits[field, key] = found

    def first(field: str, keys: list[str], i: int) -> str | None:
        """The first key that matches; else PEFT's fallback, the module path itself as a key."""
        fallback = modules[i] if modules[i] in keys else None
        return next((key for key in keys if i in hits[field, key]), fallback)

    def selected(i: int, name: str) -> bool:
        if target_modules is None or target_modules == "all-linear":  # PEFT's defaults / every linear layer
            return True
        if isinstance(target_modules, str):
            return i in hits["target_modules", target_modules]
        return name in targets or any(name.endswith(f".{t}") for t in targets)

    return Resolved(
        rank_key={name: first("rank_pattern", rank_pattern, i) for i, name in enumerate(modules)},
        alpha_key={name: first("alpha_pattern", alpha_pattern, i) for i, name in enumerate(modules)},
        targeted={name: selected(i, name) for i, name in enumerate(modules)},
    )
