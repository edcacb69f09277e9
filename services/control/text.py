"""Plain-text tables and sizes for the reports the commands print. Pure."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from services.core.discovery.records import NodeRecord


def table(rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """``rows`` (the first one the header) as left-aligned columns two spaces apart, each line
    prefixed with ``indent``; trailing spaces stripped."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join((indent + "  ".join(c.ljust(w) for c, w in zip(r, widths))).rstrip() for r in rows)


def human_bytes(n: int) -> str:
    """``512 B``, ``1.5 KiB``, ``3.2 MiB``, ``12.0 GiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def node_cells(node: "NodeRecord") -> tuple[str, str, str, str]:
    """A live node's ADDRESS, READY (versions, ``1,2``), SERVING and MAP columns; ``?`` or ``-``
    for what its znode does not say."""
    ready = ",".join(str(v) for v in node.versions_ready) or "-"
    return node.address or "?", ready, _or_dash(node.serving_version), _or_dash(node.map_version)


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)
