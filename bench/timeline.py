"""The failover timeline figure: one trial, drawn with matplotlib (Agg, no display)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SERVING, DEAD, SILENT, WAITING, STARTING = "#43a047", "#eeeeee", "#bdbdbd", "#90caf9", "#ffa726"
KILL, TAKEOVER = "#c62828", "#1565c0"


def pick(scenario: Mapping[str, Any]) -> Mapping[str, Any]:
    """The trial whose time to serving is the median one."""
    ordered = sorted(scenario["trials"], key=lambda t: float(t["ready_after"]))
    return ordered[(len(ordered) - 1) // 2]  # type: ignore[no-any-return]


def draw(scenario: Mapping[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    trial = pick(scenario)
    ttl, delay = float(scenario["ttl"]), float(scenario["lock_delay"])
    wait = ttl + delay
    t0 = float(trial["killed"])

    def at(key: str) -> float | None:
        value = trial.get(key)
        return None if value is None else float(value) - t0

    acquired, ready = at("acquired"), at("ready")
    assert acquired is not None and ready is not None
    last_beat = at("last_heartbeat")
    start = -max(4.0, 0.35 * wait)
    end = ready + max(2.5, 0.2 * wait)
    beats = [float(b) - t0 for b in trial.get("heartbeats") or [] if float(b) - t0 >= start]

    fig, ax = plt.subplots(figsize=(12, 4.6), dpi=120)
    h = 0.46

    def bar(x0: float, x1: float, lane: float, color: str, **kw: Any) -> None:
        ax.broken_barh([(x0, x1 - x0)], (lane - h / 2, h), color=color, **kw)

    # The holder: serving and renewing until it is killed, then gone. (It took over in
    # the previous trial, so it may have served only a few seconds.)
    serving_since = max(float(at("holder_ready") or start), start)
    bar(serving_since, 0.0, 2, SERVING)
    bar(0.0, end, 2, DEAD, hatch="//", edgecolor="#cccccc")
    ax.text(serving_since + 0.1, 2, "serving", va="center", fontsize=9)
    ax.text(0.25, 2, "container SIGKILLed: no more heartbeats", va="center", fontsize=9)
    ax.plot([0], [2], marker="X", color=KILL, markersize=13, zorder=5)

    # The lease: heartbeats landing, then silence until the contender replaces it.
    ax.plot(beats, [1] * len(beats), "|", color="black", markersize=18, markeredgewidth=2.5)
    if beats:
        ax.text(beats[0], 1.33, "heartbeats (every TTL/6)", fontsize=8)
    if last_beat is not None:
        bar(last_beat, acquired, 1, SILENT)
        ax.text(
            (max(last_beat, 0.0) + acquired) / 2,
            1,
            f"no heartbeat for {acquired - last_beat:.2f} s",
            ha="center",
            va="center",
            fontsize=9,
        )
    ax.plot([acquired], [1], "|", color=TAKEOVER, markersize=18, markeredgewidth=2.5)
    ax.annotate(
        "",
        xy=(acquired, 0.6),
        xytext=(acquired - wait, 0.6),
        arrowprops={"arrowstyle": "<->", "color": "#555555"},
    )
    ax.text(
        acquired - wait / 2,
        0.64,
        f"TTL + lock-delay = {wait:g} s of silence on the contender's clock "
        f"(it reads the lock every {min(1.0, ttl / 10):g} s)",
        ha="center",
        fontsize=8,
        color="#555555",
    )

    # The contender: waiting, taking over, starting PostgreSQL, serving.
    contender = max(float(at("contender_started") or start), start)
    bar(contender, acquired, 0, WAITING)
    ax.text(
        (max(contender, 0.0) + acquired) / 2,
        0,
        "waiting: watching the heartbeat",
        ha="center",
        va="center",
        fontsize=9,
    )
    bar(acquired, ready, 0, STARTING)
    bar(ready, end, 0, SERVING)
    ax.annotate(
        f"PostgreSQL started, recovered,\nanswering after {ready - acquired:.2f} s",
        xy=((acquired + ready) / 2, -h / 2),
        xytext=(acquired - 0.3, -0.78),
        ha="right",
        fontsize=8,
        arrowprops={"arrowstyle": "->", "color": "#555555"},
    )
    for x, color, label, align in (
        (0.0, KILL, "t0: holder killed ", "right"),
        (acquired, TAKEOVER, f"takeover {acquired:.2f} s ", "right"),
        (ready, SERVING, f" serving {ready:.2f} s", "left"),
    ):
        ax.axvline(x, color=color, linestyle="--", linewidth=1)
        ax.text(x, 2.42, label, color=color, fontsize=8, ha=align)

    ax.set_yticks(
        [2, 1, 0], ["holder\n(container A)", "lease\n(lock file)", "contender\n(container B)"]
    )
    ax.set_ylim(-1.05, 2.6)
    ax.set_xlim(start, end)
    ax.set_xlabel("seconds since the holder's container was SIGKILLed")
    ax.set_title(
        f"One failover ({scenario['backend']} backend, lease mode, TTL {ttl:g} s, lock-delay "
        f"{delay:g} s): the median of {len(scenario['trials'])} trials by time to serving",
        fontsize=10,
    )
    ax.legend(
        handles=[
            Patch(color=SERVING, label="PostgreSQL serving"),
            Patch(color=SILENT, label="lease silent"),
            Patch(color=WAITING, label="contender waiting"),
            Patch(color=STARTING, label="PostgreSQL starting (crash recovery)"),
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        ncol=4,
        fontsize=8,
        frameon=False,
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
