"""A host-compilable copy of csrc/: what the CUDA emulator compiles with g++.

The kernels in csrc/ are not edited for the emulator; this copy changes only what a host
compiler cannot take, each by a mechanical rule:

- ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
  ``::emu::launcher(kernel, "kernel", __FILE__, __LINE__).config(grid, block, smem, stream)(args)``;
- ``extern __shared__ T name[];`` becomes a pointer to the block's dynamic shared memory, and
  ``__shared__ T name[dims];`` a reference to a per-block buffer (keyed by a static tag, one per
  declaration and instantiation);
- each ``asm volatile("...": outputs: inputs: clobbers)`` becomes
  ``::emu::ptx("...", __FILE__, __LINE__, {operands})``, the operands numbered as GCC numbers
  them, for the emulator's PTX interpreter;
- every ``__global__`` function's body starts with ``EMU_KERNEL_ENTRY();`` (names the running
  instantiation).

``#line`` directives keep the original file names and line numbers in compiler and sanitizer
messages. The rest (threadIdx, __syncthreads, shuffles, CUDA runtime calls) is provided by
runtime/emu.h, force-included into every translation unit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")


class RewriteError(ValueError):
    """The source has a construct the rewriter does not know (it names file and line)."""


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _skip_string(text: str, i: int) -> int:
    """Index just past the string or char literal starting at text[i]."""
    quote = text[i]
    i += 1
    while text[i] != quote:
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _match_paren(text: str, i: int, open_: str = "(", close: str = ")") -> int:
    """Index of the bracket closing the one at text[i] (strings skipped)."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            i = _skip_string(text, i)
            continue
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise RewriteError("unbalanced brackets")


def _split_top(text: str, sep: str) -> list[str]:
    """Splits at ``sep`` outside brackets and strings."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            i = _skip_string(text, i)
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


# ---------------------------------------------------------------------------- asm
_OPERAND = re.compile(r'\s*"([^"]*)"\s*\((.*)\)\s*$', re.DOTALL)


def _asm_call(body: str, where: str) -> str:
    sections = _split_top(body, ":")
    template = sections[0].strip()
    if not template.startswith('"'):
        raise RewriteError(f"{where}: asm without a string template")
    operands = []
    for section, is_output in ((sections[1:2], True), (sections[2:3], False)):
        for text in section:
            for item in _split_top(text, ","):
                if not item.strip():
                    continue
                m = _OPERAND.match(item)
                if not m:
                    raise RewriteError(f"{where}: cannot read asm operand {item.strip()!r}")
                constraint, expr = m.groups()
                if is_output != constraint.startswith(("=", "+")):
                    raise RewriteError(f"{where}: operand {item.strip()!r} in the wrong section")
                if constraint.lstrip("=+&") not in ("r", "l", "f", "d", "h", "n"):
                    raise RewriteError(f"{where}: asm constraint {constraint!r} not emulated")
                fn = "out" if is_output else "in"
                operands.append(f"::emu::{fn}({expr.strip()})")
    return f"::emu::ptx({template}, __FILE__, __LINE__, {{{', '.join(operands)}}})"


def _rewrite_asm(text: str, name: str) -> tuple[str, int]:
    out, pos, count = [], 0, 0
    for m in re.finditer(r"\basm\s+volatile\s*\(|\basm\s*\(", text):
        if m.start() < pos:
            continue
        open_ = m.end() - 1
        close = _match_paren(text, open_)
        where = f"{name}:{_line_of(text, m.start())}"
        call = _asm_call(text[open_ + 1:close], where)
        # Keep the line count: the call on the first line, the asm's other lines left empty.
        call += "\n" * text.count("\n", m.start(), close + 1)
        out += [text[pos:m.start()], call]
        pos = close + 1
        count += 1
    out.append(text[pos:])
    return "".join(out), count


# ---------------------------------------------------------------------------- launches
_IDENT_TAIL = re.compile(r"[\w:]+$")


def _kernel_expr_start(text: str, end: int) -> int:
    """Start of the kernel expression that ends at ``end`` (before ``<<<``): an identifier,
    possibly qualified, possibly with template arguments."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if text[i - 1] == ">":  # template arguments: walk back to the matching '<'
        depth = 0
        while True:
            i -= 1
            if text[i] == ">":
                depth += 1
            elif text[i] == "<":
                depth -= 1
                if depth == 0:
                    break
    m = _IDENT_TAIL.search(text, 0, i)
    if not m:
        raise RewriteError("a <<<...>>> launch without a kernel name")
    return m.start()


def _rewrite_launches(text: str, name: str) -> tuple[str, int]:
    count = 0
    while True:
        start = text.find("<<<")
        if start < 0:
            return text, count
        end = text.find(">>>", start)
        if end < 0:
            raise RewriteError(f"{name}:{_line_of(text, start)}: '<<<' without '>>>'")
        k0 = _kernel_expr_start(text, start)
        kernel = text[k0:start].strip()
        config = text[start + 3:end]
        lines = "\n" * config.count("\n")
        label = " ".join(kernel.split()).replace('"', "'")
        repl = (f'::emu::launcher({kernel}, "{label}", __FILE__, __LINE__)'
                f".config({' '.join(config.split())}){lines}")
        text = text[:k0] + repl + text[end + 3:]
        count += 1


# ---------------------------------------------------------------------------- shared memory
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*(\d+)\s*\)\s+)?([\w:<>, ]+?)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(
    r"__shared__\s+(?:__align__\(\s*(\d+)\s*\)\s+)?([\w:<>, ]+?)\s+(\w+)\s*((?:\[[^\]]*\]\s*)+);")


def _rewrite_shared(text: str, name: str) -> tuple[str, int]:
    count = 0

    def dynamic(m: re.Match) -> str:
        nonlocal count
        count += 1
        _, type_, var = m.groups()
        return f"{type_}* {var} = static_cast<{type_}*>(::emu::dynamic_smem());"

    def static(m: re.Match) -> str:
        nonlocal count
        count += 1
        _, type_, var, dims = m.groups()
        dims = "".join(dims.split())
        return (f"static char emu_tag_{var}; auto& {var} = "
                f"::emu::static_smem_ref<{type_}{dims}>(&emu_tag_{var});")

    text = _EXTERN_SHARED.sub(dynamic, text)
    text = _STATIC_SHARED.sub(static, text)
    left = re.search(r"__shared__", text)
    if left:
        raise RewriteError(f"{name}:{_line_of(text, left.start())}: a __shared__ declaration "
                           "the rewriter does not know")
    return text, count


# ---------------------------------------------------------------------------- kernels
def _kernel_names_and_entries(text: str, name: str) -> tuple[str, list[str]]:
    """Inserts EMU_KERNEL_ENTRY(); at the top of every __global__ function body; returns the
    kernel names (templates once)."""
    names, out, pos = [], [], 0
    for m in re.finditer(r"\b__global__\b", text):
        i, depth = m.end(), 0
        while i < len(text):
            c = text[i]
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
            elif depth == 0 and c in ";{":
                break
            i += 1
        if i >= len(text) or text[i] == ";":
            continue  # a declaration
        head = text[m.end():i]
        # The kernel's name is the identifier before its parameter list (the last '(' at depth 0).
        params = head.rfind("(")
        depth = 0
        for j in range(len(head) - 1, -1, -1):
            if head[j] == ")":
                depth += 1
            elif head[j] == "(":
                depth -= 1
                if depth == 0:
                    params = j
                    break
        ident = re.search(r"(\w+)\s*$", head[:params])
        if not ident:
            raise RewriteError(f"{name}:{_line_of(text, m.start())}: a kernel without a name")
        names.append(ident.group(1))
        out += [text[pos:i + 1], " EMU_KERNEL_ENTRY();"]
        pos = i + 1
    out.append(text[pos:])
    return "".join(out), names


@dataclass
class Rewritten:
    """What rewrite() made: per file, the constructs it replaced."""
    files: dict[str, dict[str, int]]
    kernels: dict[str, list[str]]  # source file -> __global__ function (template) names


def rewrite_text(text: str, name: str) -> tuple[str, dict[str, int], list[str]]:
    text, launches = _rewrite_launches(text, name)
    text, shared = _rewrite_shared(text, name)
    text, asm = _rewrite_asm(text, name)
    text, kernels = _kernel_names_and_entries(text, name)
    return text, {"launches": launches, "shared": shared, "asm": asm}, kernels


def rewrite(src: Path, dst: Path, mutate=None) -> Rewritten:
    """Writes the host-compilable copy of every source of ``src`` into ``dst``.

    ``mutate(name, text) -> text``, when given, changes a source before it is rewritten (the
    injected-bug tests)."""
    dst.mkdir(parents=True, exist_ok=True)
    files, kernels = {}, {}
    for path in sorted(src.iterdir()):
        if path.suffix not in SOURCE_SUFFIXES:
            continue
        text = path.read_text()
        if mutate is not None:
            text = mutate(path.name, text)
        new, counts, names = rewrite_text(text, path.name)
        header = f'#line 1 "{path.resolve()}"\n'
        (dst / path.name).write_text(header + new)
        files[path.name] = counts
        if names:
            kernels[path.name] = names
    return Rewritten(files, kernels)
