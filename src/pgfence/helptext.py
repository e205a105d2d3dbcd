"""Help text: option tables and exit codes, wrapped to fit 80 columns."""

from __future__ import annotations

from collections.abc import Sequence

from pgfence.config import COMMAND_OPTIONS

HELP_WIDTH = 80
EXIT_CODES_HELP = {
    "run": "Exit codes: the command's own status (128+N when signal N killed it); 64 usage, "
    "65 unreadable lock, 73 fenced out, 74 storage error, 75 fence lost (the server was "
    "killed), 126/127 the command cannot be run / was not found.",
    "status": "Exit codes: 0 the lock was read (free or held), 64 usage, 65 unreadable "
    "lock, 74 storage error.",
    "release": "Exit codes: 0 released, or nothing to release; 64 usage, 65 unreadable lock "
    "(see --force), 73 refused (the holder is alive, or cannot be told dead), 74 storage "
    "error.",
    "check": "Exit codes: 0 healthy (a pgfence run in this container holds the lock, with "
    "a fresh heartbeat), 1 anything else (only 0 or 1: orchestrators give others meaning).",
}


def help_text(command: str) -> str:
    """`pgfence COMMAND --help` below its usage line: options, then exit codes."""
    rows = []
    for option in COMMAND_OPTIONS[command]:
        name = option.flag + (f" {option.metavar}" if option.metavar else "")
        if option.negative:
            name += f", {option.negative}"
        env = f" [{option.env}]" if option.env else ""
        rows.append((name, option.help + env))
    return format_rows(rows) + "\n" + wrap(EXIT_CODES_HELP[command])


def format_rows(rows: Sequence[tuple[str, str]], indent: int = 2, column: int = 30) -> str:
    """Two columns, NAME and TEXT, wrapped to HELP_WIDTH; a long NAME gets its own line."""
    lines = []
    pad = " " * column
    for name, text in rows:
        head = " " * indent + name
        body = _wrap_words(text, HELP_WIDTH - column)
        if len(head) < column - 1:
            lines.append(head.ljust(column) + body[0])
            body = body[1:]
        else:
            lines.append(head)
        lines.extend(pad + line for line in body)
    return "\n".join(lines)


def wrap(text: str) -> str:
    return "\n".join(_wrap_words(text, HELP_WIDTH))


def _wrap_words(text: str, width: int) -> list[str]:
    """Greedy word wrap (textwrap would be one more module to compile into the images);
    a word longer than `width` stands alone on its line."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines
